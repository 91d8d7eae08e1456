"""bench_scaling's database seeding: copies of a job a real ``comfyq serve`` ran (against the
simulator), written straight into the migrated SQLite file, must be rows comfyq itself reads
back: schema checks hold, indexes are the migrations' own, counters and queue positions agree."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is a folder of the checkout, not part of the package

from bench.bench_scaling import seed, template_job
from bench.common import simulator
from comfyq.store.factory import open_store
from comfyq.store.model import Stage


def _schema(db: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(db)) as con:
        return con.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"
        ).fetchall()


@pytest.mark.parametrize("rebuild", [False, True])
def test_seeded_rows_are_comfyqs_own(tmp_path: Path, rebuild: bool) -> None:
    with simulator(tmp_path / "sim") as comfy:
        template_job(tmp_path, comfy)
    db = tmp_path / "q.db"
    before = _schema(db)
    with closing(sqlite3.connect(db)) as con:
        (tid,) = con.execute("SELECT id FROM jobs").fetchone()
        per_job = con.execute("SELECT count(*) FROM job_events WHERE job_id = ?", (tid,)).fetchone()
    got = seed(db, 300, 20, rebuild_indexes=rebuild)
    assert got["jobs_by_state"] == {"completed": 301, "pending": 20}
    assert got["events"] == per_job[0] * 301 + 20
    assert _schema(db) == before  # same indexes, same SQL
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert con.execute("SELECT unfinished FROM queue_stats").fetchone() == (20,)
        assert con.execute("SELECT count(DISTINCT id) FROM jobs").fetchone() == (321,)
        # every finished copy has its output row, every job its events
        assert con.execute(
            "SELECT count(*) FROM jobs j WHERE state = 'completed'"
            " AND NOT EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = j.id)"
        ).fetchone() == (0,)
        assert con.execute(
            "SELECT count(*) FROM jobs j"
            " WHERE NOT EXISTS (SELECT 1 FROM job_events e WHERE e.job_id = j.id)"
        ).fetchone() == (0,)
        newest_done, oldest_done = con.execute(
            "SELECT max(id), min(id) FROM jobs WHERE state = 'completed' AND id <> ?", (tid,)
        ).fetchone()
        pending = [r[0] for r in con.execute("SELECT id FROM jobs WHERE state = 'pending'")]

    async def read_back() -> None:
        store = open_store(db)
        await store.open()
        try:
            job = await store.get(newest_done)
            assert job is not None and job.state == "completed"
            assert len(await store.outputs(oldest_done)) == 1
            assert len(await store.events(oldest_done)) == per_job[0]
            counts = await store.counts()
            assert counts[Stage.PREPROCESS]["waiting"] == 20
            first = await store.get(min(pending))
            assert first is not None and first.state == "pending"
            assert await store.position(first) == (1, 20)
            page = await store.list_jobs(limit=5)
            assert len(page) == 5
        finally:
            await store.close()

    asyncio.run(read_back())
