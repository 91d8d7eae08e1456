"""The Job record: columns copied into slots once, JSON columns decoded on first use."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from comfyq.store import NewJob, open_store
from comfyq.store.model import Job, State
from comfyq.store.sqlite.writer import connect


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    s = open_store(tmp_path / "q.db", owner="w1")
    await s.open()
    await s.create(
        NewJob(id="a", payload={"input": {"n": 1}}, payload_hash="h", kind="workflow"), 10
    )
    await s.close()
    return tmp_path / "q.db"


def test_a_full_row_reads_like_its_columns(db: Path) -> None:
    conn = connect(db)
    row = conn.execute("SELECT * FROM jobs").fetchone()
    job = Job.from_row(row)
    columns = row.keys()  # a Row iterates over its values
    for key in columns:
        want = row[key]
        if key in ("payload", "prepared", "result", "error", "timings"):
            want = None if want is None else json.loads(want)
        elif key == "cancel_requested":
            want = bool(want)
        assert getattr(job, key) == want, key
    assert job.cancel_requested is False and job.status == "queued" and not job.terminal
    job.cancel_requested = True
    job.state = State.RUNNING
    assert job.cancel_requested is True and job.status == "processing"


def test_partial_rows_dicts_and_unknown_columns(db: Path) -> None:
    conn = connect(db)
    head = Job.from_row(conn.execute("SELECT id, state, stage FROM jobs").fetchone())
    assert (head.id, head.status) == ("a", "queued")
    with pytest.raises(AttributeError):
        _ = head.payload_hash  # not selected
    with pytest.raises(AttributeError):
        _ = head.payload
    counted = Job.from_row(
        conn.execute("SELECT id, count(*) AS n, 'x' AS \"odd name\" FROM jobs").fetchone()
    )
    assert counted.id == "a" and counted.n == 1 and getattr(counted, "odd name") == "x"
    single = Job.from_row({"id": "b"})
    assert single.id == "b"
    from_dict = Job.from_row(
        {
            "id": "c",
            "state": "completed",
            "stage": "postprocess",
            "timings": '{"total_ms": 5}',
            "cancel_requested": 0,
            "newer_column": [1],
        }
    )
    assert (
        from_dict.terminal
        and from_dict.timings == {"total_ms": 5}
        and from_dict.newer_column == [1]
    )
    assert from_dict.cancel_requested is False


def test_json_columns_are_decoded_once(db: Path) -> None:
    conn = connect(db)
    conn.row_factory = sqlite3.Row
    job = Job.from_row(conn.execute("SELECT * FROM jobs").fetchone())
    assert job.payload == {"input": {"n": 1}}
    assert job.payload is job.payload  # cached, not decoded again
    assert job.prepared is None and job.result is None and job.error is None and job.timings == {}
