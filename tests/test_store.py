"""The store on real SQLite files: state machine, claims, leases, retries, cancel, prune."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from comfyq.clock import ManualClock
from comfyq.errors import Conflict, IllegalTransition, LeaseLost, NotFound, QueueFull
from comfyq.store import JobStore, NewJob
from comfyq.store.model import Stage, State
from comfyq.store.writer import connect


def new(i: int | str, priority: int = 0, timeout: float = 3600.0, max_attempts: int = 3) -> NewJob:
    return NewJob(
        id=str(i),
        payload={"input": {"n": i}},
        payload_hash=f"h{i}",
        priority=priority,
        timeout=timeout,
        max_attempts=max_attempts,
        kind="workflow",
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    s = JobStore(tmp_path / "q.db", clock=ManualClock(), owner="w1")
    await s.open()
    yield s
    await s.close()


async def test_full_lifecycle_writes_every_event(store: JobStore) -> None:
    job, created = await store.create(new(1), 10)
    assert created and job.status == "queued" and job.attempts == 0
    for stage, msg in ((Stage.PREPROCESS, "p"), (Stage.GENERATE, "g"), (Stage.POSTPROCESS, "pp")):
        (claimed,) = await store.claim(stage, 1, 30, msg)
        assert claimed.stage == stage and claimed.state == "running" and claimed.lease_owner == "w1"
        store.clock.advance(1.5)  # type: ignore[attr-defined]
        tr = await store.advance("1", f"{stage} done")
    assert tr.to_state == "completed" and tr.job is not None
    assert tr.job.timings["preprocess_ms"] == 1500 and tr.job.timings["total_ms"] == 4500
    events = await store.events("1")
    assert [(e["from_state"], e["to_state"], e["stage"]) for e in events] == [
        (None, "pending", "preprocess"),
        ("pending", "running", "preprocess"),
        ("running", "pending", "generate"),
        ("pending", "running", "generate"),
        ("running", "pending", "postprocess"),
        ("pending", "running", "postprocess"),
        ("running", "completed", "postprocess"),
    ]
    # The same story is in the file for an operator with the sqlite3 shell.
    conn = sqlite3.connect(store.path)
    row = conn.execute("SELECT status, tries, events FROM jobs_overview WHERE id = '1'").fetchone()
    assert row == ("completed", "1/3", 7)


async def test_idempotent_create_and_conflict(store: JobStore) -> None:
    await store.create(new(1), 10)
    again, created = await store.create(new(1), 10)
    assert not created and again.id == "1"
    other = new(1)
    other.payload_hash = "different"
    with pytest.raises(Conflict):
        await store.create(other, 10)


async def test_queue_limit_counts_every_unfinished_job(store: JobStore) -> None:
    await store.create(new(1), 2)
    await store.create(new(2), 2)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.advance("1", "to generate")
    with pytest.raises(QueueFull):
        await store.create(new(3), 2)


async def test_illegal_transitions_are_refused(store: JobStore) -> None:
    await store.create(new(1), 10)
    conn = connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="illegal job transition"):
        conn.execute("UPDATE jobs SET state = 'completed', finished_at = 'x' WHERE id = '1'")
    with pytest.raises(LeaseLost):
        await store.advance("1", "not running")  # pending job: nobody holds it
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.finish("1", State.COMPLETED, "done")
    with pytest.raises(sqlite3.IntegrityError, match="illegal job transition"):
        conn.execute(
            "UPDATE jobs SET state = 'running', lease_owner = 'x', lease_expires_at = 'y',"
            " finished_at = NULL WHERE id = '1'"
        )
    with pytest.raises(IllegalTransition):
        await store.retry_job("1")  # completed jobs are not retried
    with pytest.raises(NotFound):
        await store.advance("nope", "x")


async def test_claim_order_priority_then_age(store: JobStore) -> None:
    for i, prio in ((1, 0), (2, 5), (3, 0), (4, 5)):
        await store.create(new(i, priority=prio), 10)
        store.clock.advance(0.001)  # type: ignore[attr-defined]
    got = await store.claim(Stage.PREPROCESS, 4, 30, "p")
    assert [j.id for j in got] == ["2", "4", "1", "3"]
    (job,) = [j for j in await store.list_jobs() if j.id == "3"]
    assert job.state == "running"


async def test_queue_position(store: JobStore) -> None:
    for i, prio in ((1, 0), (2, 0), (3, 9)):
        await store.create(new(i, priority=prio), 10)
        store.clock.advance(0.001)  # type: ignore[attr-defined]
    positions = {j.id: await store.position(j) for j in await store.list_jobs()}
    assert positions == {"3": (1, 3), "1": (2, 3), "2": (3, 3)}


async def test_concurrent_claims_never_share_a_job(tmp_path: Path) -> None:
    # Two stores (two writers, two connections) on one file, many claimers each.
    a = JobStore(tmp_path / "q.db", owner="a")
    b = JobStore(tmp_path / "q.db", owner="b")
    await a.open()
    await b.open()
    try:
        for i in range(300):
            await a.create(new(i), 1000)
        seen: list[str] = []

        async def claimer(s: JobStore) -> None:
            while True:
                got = await s.claim(Stage.PREPROCESS, 3, 30, "p")
                if not got:
                    return
                seen.extend(j.id for j in got)

        await asyncio.gather(*(claimer(s) for s in (a, b) for _ in range(8)))
        assert len(seen) == 300 and len(set(seen)) == 300
    finally:
        await a.close()
        await b.close()


async def test_expired_lease_is_requeued_then_failed_when_attempts_spent(store: JobStore) -> None:
    await store.create(new(1, max_attempts=2), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    store.clock.advance(10)  # type: ignore[attr-defined]
    await store.renew(30)  # a live owner keeps its lease
    store.clock.advance(25)  # type: ignore[attr-defined]  # past the first lease, not the renewed one
    assert await store.reap(grace=30) == []
    store.clock.advance(6)  # type: ignore[attr-defined]  # now past the renewed lease
    (tr,) = await store.reap(grace=30)
    assert (tr.to_state, tr.stage, tr.attempt) == ("pending", "preprocess", 2)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    store.clock.advance(31)  # type: ignore[attr-defined]
    (tr,) = await store.reap(grace=30)
    assert (
        tr.to_state == "failed"
        and tr.job is not None
        and (tr.job.error or {}).get("type") == "lease_expired"
    )


async def test_retry_with_backoff_then_failure(store: JobStore) -> None:
    await store.create(new(1, max_attempts=2), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    err = {"type": "comfyui_unreachable", "message": "down"}
    tr = await store.retry_later("1", 5.0, err)
    assert tr.to_state == "pending" and tr.attempt == 2 and tr.data == {"error": err}
    assert await store.claim(Stage.PREPROCESS, 1, 30, "p") == []  # not before run_after
    store.clock.advance(5)  # type: ignore[attr-defined]
    (job,) = await store.claim(Stage.PREPROCESS, 1, 30, "p")
    assert job.attempts == 2
    tr = await store.retry_later("1", 5.0, err)
    assert tr.to_state == "failed" and tr.job is not None and tr.job.error == err


async def test_deadline_fails_waiting_job_with_timeout(store: JobStore) -> None:
    await store.create(new(1, timeout=10), 10)
    store.clock.advance(11)  # type: ignore[attr-defined]
    assert await store.reap(grace=5) == []
    store.clock.advance(5)  # type: ignore[attr-defined]
    (tr,) = await store.reap(grace=5)
    assert (
        tr.to_state == "failed"
        and tr.job is not None
        and (tr.job.error or {}).get("type") == "timeout"
    )


async def test_cancel_in_every_state(store: JobStore) -> None:
    for i in range(4):
        await store.create(new(i), 10)
    # pending -> cancelled at once
    job, tr = await store.request_cancel("0")
    assert tr is not None and job.state == "cancelled"
    # running -> marked; the worker's next step turns it into cancelled
    await store.claim(Stage.PREPROCESS, 3, 30, "p")
    job, tr = await store.request_cancel("1")
    assert tr is None and job.state == "running" and job.cancel_requested
    tr = await store.advance("1", "preprocess done")
    assert tr.to_state == "cancelled"
    # running, worker dies: reaper cancels instead of requeueing
    await store.request_cancel("2")
    store.clock.advance(31)  # type: ignore[attr-defined]
    trs = await store.reap(grace=30)
    assert {t.job_id: t.to_state for t in trs}["2"] == "cancelled"
    # terminal -> unchanged
    job, tr = await store.request_cancel("0")
    assert tr is None and job.state == "cancelled"
    with pytest.raises(NotFound):
        await store.request_cancel("missing")


async def test_recover_resumes_dead_owners_jobs_without_counting_attempts(tmp_path: Path) -> None:
    dead = JobStore(tmp_path / "q.db", owner="dead")
    await dead.open()
    await dead.create(new(1), 10)
    await dead.claim(Stage.PREPROCESS, 1, 30, "p")
    await dead.close()
    alive = JobStore(tmp_path / "q.db", owner="alive")
    await alive.open()
    try:
        (tr,) = await alive.recover()
        assert (tr.to_state, tr.stage, tr.attempt) == ("pending", "preprocess", 1)
        assert "restart" in tr.message
    finally:
        await alive.close()


async def test_retry_job_and_prune(store: JobStore) -> None:
    await store.create(new(1), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.finish("1", State.FAILED, "boom", error={"type": "node_error", "message": "boom"})
    tr = await store.retry_job("1")
    assert tr.to_state == "pending" and tr.job is not None and tr.job.error is None
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.finish("1", State.COMPLETED, "ok")
    assert await store.prune(older_than=60) == []
    store.clock.advance(61)  # type: ignore[attr-defined]
    assert await store.prune(older_than=60) == ["1"]
    assert await store.get("1") is None and await store.events("1") == []


async def test_secrets_are_erased_when_the_job_ends(store: JobStore) -> None:
    n = new(1)
    n.secrets = {"s3": {"secret_access_key": "SECRET"}}
    await store.create(n, 10)
    assert (await store.secrets("1"))["s3"]["secret_access_key"] == "SECRET"
    await store.request_cancel("1")
    assert await store.secrets("1") == {}
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT count(*) FROM job_secrets").fetchone() == (0,)


async def test_group_commit_batches_concurrent_writes(store: JobStore) -> None:
    before = store.writer.commits
    await asyncio.gather(*(store.create(new(i), 1000) for i in range(200)))
    commits = store.writer.commits - before
    assert commits < 200  # many creates shared a commit (one fsync)


async def test_a_failing_write_does_not_undo_its_neighbours(store: JobStore) -> None:
    await store.create(new(1), 10)
    dup = new(1)
    dup.payload_hash = "other"
    results = await asyncio.gather(
        store.create(new(2), 10),
        store.create(dup, 10),
        store.create(new(3), 10),
        return_exceptions=True,
    )
    assert isinstance(results[1], Conflict)
    assert {j.id for j in await store.list_jobs()} == {"1", "2", "3"}


async def test_checkpoint_truncates_wal(store: JobStore) -> None:
    for i in range(50):
        await store.create(new(i), 1000)
    busy, _, _ = await store.checkpoint()
    assert busy == 0
    wal = Path(str(store.path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
