"""The store's one-statement paths (hand-off, completion, update, admission) write exactly what the
step-by-step paths write, and refuse what those refuse."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.store import StoreFactory, database, engine, make_store, rows

from comfyq.clock import ManualClock, iso
from comfyq.errors import Conflict, LeaseLost, NotFound, QueueFull
from comfyq.store import JobStore, NewJob
from comfyq.store.model import Stage, State
from comfyq.store.sqlite import SqliteStore
from comfyq.store.sqlite.journal import stamp

__all__ = ["database", "engine", "make_store"]  # fixtures

T0 = 1_800_000_000.0
GEN_RESULT = {
    "outputs": {"2": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}
}
OUTPUT = {
    "filename": "a.png",
    "node_id": "2",
    "output_type": "images",
    "comfy_type": "output",
    "subfolder": "",
    "mimetype": "image/png",
    "size": 3,
    "sha256": "ab",
    "local_path": "/x/a.png",
    "url": "/outputs/j/a.png",
    "upload_error": None,
}


def new(job_id: str, **kw: Any) -> NewJob:
    return NewJob(
        id=job_id,
        payload={"input": kw.pop("inp", {"n": job_id})},
        payload_hash="h",
        kind="workflow",
        **kw,
    )


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[JobStore]:
    s = make_store(clock=ManualClock(T0), owner="w1")
    await s.open()
    yield s


async def _to_generate_with_a_retry(store: JobStore, job_id: str, hand_off: bool) -> None:
    """Preprocess, then a failed generate attempt and a second claim: timings gain a wait key."""
    clock: ManualClock = store.clock  # type: ignore[assignment]
    await store.create(new(job_id), 100)
    clock.advance(0.25)
    await store.claim(Stage.PREPROCESS, 1, 30, "Preprocessing")
    clock.advance(1.5)
    if hand_off:
        await store.advance_and_claim(
            job_id, "pre done", {"prepared": {"workflow": {}}}, 30, "Waiting"
        )
    else:
        await store.advance(job_id, "pre done", {"prepared": {"workflow": {}}})
        await store.claim(Stage.GENERATE, 1, 30, "Waiting")
    clock.advance(0.5)
    await store.retry_later(job_id, 1.0, {"type": "comfyui_unreachable", "message": "down"})
    clock.advance(2.0)
    await store.claim(Stage.GENERATE, 1, 30, "Waiting")
    clock.advance(0.75)


async def test_hand_off_writes_what_advance_then_claim_writes(store: JobStore) -> None:
    clock: ManualClock = store.clock  # type: ignore[assignment]
    for job_id, hand_off in (("steps", False), ("merged", True)):
        clock.t = T0
        await _to_generate_with_a_retry(store, job_id, hand_off)
        if hand_off:
            trs = await store.advance_and_claim(
                job_id, "gen done", {"result": GEN_RESULT}, 30, "Post-processing"
            )
            assert [(t.from_state, t.to_state, t.stage) for t in trs] == [
                ("running", "pending", "postprocess"),
                ("pending", "running", "postprocess"),
            ]
            assert (
                trs[0].job is not None
                and trs[0].job.state == State.PENDING
                and trs[0].job.lease_owner is None
            )
            assert trs[1].job is not None and trs[1].job.lease_owner == "w1"
            assert trs[0].event_id + 1 == trs[1].event_id
        else:
            await store.advance(job_id, "gen done", {"result": GEN_RESULT})
            await store.claim(Stage.POSTPROCESS, 1, 30, "Post-processing")
        clock.advance(0.5)
        done = await store.advance(job_id, "Processing complete.", None, [OUTPUT])
        assert done.to_state == State.COMPLETED
    a, b = rows(store, "SELECT * FROM jobs WHERE id IN ('steps', 'merged') ORDER BY id DESC")
    for r in (a, b):
        r.pop("id")
        r.pop("payload")
    assert a == b
    timings = json.loads(a["timings"])
    assert timings["generate_wait_ms"] == 2000 and timings["postprocess_wait_ms"] == 0
    ev = [
        rows(
            store,
            "SELECT at, from_state, to_state, stage, attempt, message, data FROM job_events"
            " WHERE job_id = ? ORDER BY id",
            j,
        )
        for j in ("steps", "merged")
    ]
    assert ev[0] == ev[1] and len(ev[0]) == 9


async def test_hand_off_refuses_what_advance_refuses(
    store: JobStore, make_store: StoreFactory
) -> None:
    other = make_store(clock=store.clock, owner="w2")
    await other.open()
    for job_id in ("held", "cancelled", "waiting"):
        await store.create(new(job_id), 100)
    await store.claim(Stage.PREPROCESS, 2, 30, "p")
    before = rows(store, "SELECT count(*) AS n FROM job_events")[0]["n"]
    with pytest.raises(LeaseLost):
        await other.advance_and_claim("held", "done", None, 30, "g")
    with pytest.raises(LeaseLost):
        await store.advance_and_claim("waiting", "done", None, 30, "g")
    with pytest.raises(NotFound):
        await store.advance_and_claim("nope", "done", None, 30, "g")
    assert rows(store, "SELECT count(*) AS n FROM job_events")[0]["n"] == before
    await store.request_cancel("cancelled")
    (tr,) = await store.advance_and_claim("cancelled", "done", {"prepared": {}}, 30, "g")
    assert tr.to_state == State.CANCELLED
    assert rows(store, "SELECT prepared FROM jobs WHERE id = 'cancelled'") == [{"prepared": None}]


async def test_completion_erases_secrets_and_queues_the_webhook_in_its_commit(
    store: JobStore,
) -> None:
    inp = {"webhook": {"url": "http://hooks.example:8080/in?t=1"}}
    await store.create(
        new("j", inp=inp, secrets={"webhook_secret": "whsec", "s3": {"k": "v"}}), 100
    )
    for stage in Stage:
        await store.claim(stage, 1, 30, stage)
        store.clock.advance(1.0)  # type: ignore[attr-defined]
        if stage != "postprocess":
            await store.advance("j", f"{stage} done")
    tr = await store.advance("j", "Processing complete.", {"result": {"warnings": []}}, [OUTPUT])
    assert tr.to_state == State.COMPLETED and tr.job is not None
    assert tr.job.timings["postprocess_ms"] == 1000 and tr.job.timings["total_ms"] == 3000
    assert tr.job.finished_at == tr.at and tr.job.result == {"warnings": []}
    assert rows(store, "SELECT count(*) AS n FROM job_secrets") == [{"n": 0}]
    assert rows(store, "SELECT host, secret, event FROM webhook_deliveries") == [
        {"host": "hooks.example:8080", "secret": "whsec", "event": "completed"}
    ]
    assert [o["filename"] for o in await store.outputs("j")] == ["a.png"]
    with pytest.raises(LeaseLost):
        await store.advance("j", "again")


async def test_update_sets_columns_of_a_held_job_only(
    store: JobStore, make_store: StoreFactory
) -> None:
    await store.create(new("j"), 100)
    with pytest.raises(LeaseLost, match="pending, not running"):
        await store.update("j", {"comfy_prompt_id": "p"})
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    job = await store.update(
        "j", {"comfy_prompt_id": "p1", "comfy_backend": "http://b", "message": "started"}
    )
    assert (job.comfy_prompt_id, job.comfy_backend, job.message) == ("p1", "http://b", "started")
    other = make_store(clock=store.clock, owner="w2")
    await other.open()
    with pytest.raises(LeaseLost, match="no longer held"):
        await other.update("j", {"comfy_prompt_id": "p2"})
    with pytest.raises(NotFound):
        await store.update("nope", {"comfy_prompt_id": "p"})
    assert (await store.get("j")).comfy_prompt_id == "p1"  # type: ignore[union-attr]


async def test_a_full_queue_still_answers_repeated_requests(store: JobStore) -> None:
    for i in range(3):
        _, created = await store.create(new(f"q{i}"), 3)
        assert created
    with pytest.raises(QueueFull, match=r"3 unfinished jobs, limit 3"):
        await store.create(new("q9"), 3)
    again, created = await store.create(new("q1"), 3)
    assert again.id == "q1" and not created
    changed = new("q1")
    changed.payload_hash = "other"
    with pytest.raises(Conflict):
        await store.create(changed, 3)
    assert rows(store, "SELECT count(*) AS n FROM jobs") == [{"n": 3}]
    assert rows(store, "SELECT count(*) AS n FROM job_events") == [{"n": 3}]


@pytest.mark.parametrize("engine", ["sqlite"])  # the SQLite adapter's writer thread
async def test_writes_asked_for_in_one_loop_turn_share_one_commit(store: JobStore) -> None:
    assert isinstance(store, SqliteStore)
    before = store.writer.commits
    created = await asyncio.gather(*(store.create(new(f"g{i}"), 1000) for i in range(50)))
    assert all(c for _, c in created)
    assert store.writer.commits - before == 1  # handed to the writer thread together


@pytest.mark.parametrize("engine", ["sqlite"])
async def test_an_operation_outside_transactions_keeps_its_place_in_the_turn(
    store: JobStore,
) -> None:
    assert isinstance(store, SqliteStore)
    order: list[str] = []

    def mark(conn: sqlite3.Connection, name: str) -> str:
        order.append(f"{name}:{'txn' if conn.in_transaction else 'alone'}")
        return name

    before = store.writer.commits
    got = await asyncio.gather(
        store.writer.run(mark, "a"),
        store.writer.run_outside(mark, "b"),
        store.writer.run(mark, "c"),
    )
    assert list(got) == ["a", "b", "c"] and order == ["a:txn", "b:alone", "c:txn"]
    assert store.writer.commits - before == 2


@pytest.mark.parametrize("engine", ["sqlite"])
async def test_stop_finishes_writes_not_yet_handed_over(make_store: StoreFactory) -> None:
    s = make_store(clock=ManualClock(T0), owner="w1")
    await s.open()
    pending = asyncio.ensure_future(s.create(new("late"), 10))
    await asyncio.sleep(0)  # submitted, not yet handed to the thread
    await s.close()
    job, created = await pending
    assert created and job.id == "late"
    assert rows(s, "SELECT id FROM jobs") == [{"id": "late"}]


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=0, max_value=4e9))
@example(T0 + 0.9999995)
@example(T0 + 0.99999949)
@example(0.0)
@example(5e-7)
@example(1.5e-6)
@example(math.nextafter(T0 + 5e-7, 0))
def test_the_stores_timestamp_text_is_clock_iso(t: float) -> None:
    assert stamp(t) == iso(t)


@given(st.integers(min_value=-500_000, max_value=500_000))
def test_half_microsecond_ties_round_as_clock_iso(k: int) -> None:
    t = T0 + k / 1e6 + 5e-7  # exactly between two microseconds, as nearly as a float gets
    assert stamp(t) == iso(t)
