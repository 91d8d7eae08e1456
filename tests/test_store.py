"""The store contract, on both adapters (real SQLite files, a real PostgreSQL server): state
machine, claims, leases, retries, cancel, prune."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.store import DB_ERRORS, StoreFactory, database, engine, make_store, raw, store

from comfyq.errors import Conflict, IllegalTransition, LeaseLost, NotFound, QueueFull
from comfyq.store import JobStore, NewJob
from comfyq.store.model import Stage, State
from comfyq.store.postgres import PostgresStore
from comfyq.store.postgres.ops import PRUNE_LOCK
from comfyq.store.sqlite import SqliteStore

__all__ = ["database", "engine", "make_store", "store"]  # fixtures


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


async def test_full_lifecycle_writes_every_event(store: JobStore) -> None:
    job, created = await store.create(new(1), 10)
    assert created and job.status == "queued" and job.attempts == 0
    for stage, msg in ((Stage.PREPROCESS, "p"), (Stage.GENERATE, "g"), (Stage.POSTPROCESS, "pp")):
        (claimed,) = await store.claim(stage, 1, 30, msg)
        assert (
            claimed.stage == stage
            and claimed.state == State.RUNNING
            and claimed.lease_owner == "w1"
        )
        store.clock.advance(1.5)  # type: ignore[attr-defined]
        tr = await store.advance("1", f"{stage} done")
    assert tr.to_state == State.COMPLETED and tr.job is not None
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
    # The same story is in the database for an operator with the sqlite3 shell or psql.
    (row,) = raw(store, "SELECT status, tries, events FROM jobs_overview WHERE id = '1'")
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
    with pytest.raises(DB_ERRORS, match="illegal job transition"):
        raw(store, "UPDATE jobs SET state = 'completed', finished_at = updated_at WHERE id = '1'")
    with pytest.raises(LeaseLost):
        await store.advance("1", "not running")  # pending job: nobody holds it
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.finish("1", State.COMPLETED, "done")
    with pytest.raises(DB_ERRORS, match="illegal job transition"):
        raw(
            store,
            "UPDATE jobs SET state = 'running', lease_owner = 'x', lease_expires_at = updated_at,"
            " finished_at = NULL WHERE id = '1'",
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
    assert job.state == State.RUNNING


async def test_queue_position(store: JobStore) -> None:
    for i, prio in ((1, 0), (2, 0), (3, 9)):
        await store.create(new(i, priority=prio), 10)
        store.clock.advance(0.001)  # type: ignore[attr-defined]
    positions = {j.id: await store.position(j) for j in await store.list_jobs()}
    assert positions == {"3": (1, 3), "1": (2, 3), "2": (3, 3)}


async def test_concurrent_claims_never_share_a_job(make_store: StoreFactory) -> None:
    # Two stores (two processes or instances) on one database, many claimers each.
    a = make_store(owner="a")
    b = make_store(owner="b")
    await a.open()
    await b.open()
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
        tr.to_state == State.FAILED
        and tr.job is not None
        and (tr.job.error or {}).get("type") == "lease_expired"
    )


async def test_retry_with_backoff_then_failure(store: JobStore) -> None:
    await store.create(new(1, max_attempts=2), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    err = {"type": "comfyui_unreachable", "message": "down"}
    tr = await store.retry_later("1", 5.0, err)
    assert tr.to_state == State.PENDING and tr.attempt == 2 and tr.data == {"error": err}
    assert await store.claim(Stage.PREPROCESS, 1, 30, "p") == []  # not before run_after
    store.clock.advance(5)  # type: ignore[attr-defined]
    (job,) = await store.claim(Stage.PREPROCESS, 1, 30, "p")
    assert job.attempts == 2
    tr = await store.retry_later("1", 5.0, err)
    assert tr.to_state == State.FAILED and tr.job is not None and tr.job.error == err


async def test_deadline_fails_waiting_job_with_timeout(store: JobStore) -> None:
    await store.create(new(1, timeout=10), 10)
    store.clock.advance(11)  # type: ignore[attr-defined]
    assert await store.reap(grace=5) == []
    store.clock.advance(5)  # type: ignore[attr-defined]
    (tr,) = await store.reap(grace=5)
    assert (
        tr.to_state == State.FAILED
        and tr.job is not None
        and (tr.job.error or {}).get("type") == "timeout"
    )


async def test_cancel_in_every_state(store: JobStore) -> None:
    for i in range(4):
        await store.create(new(i), 10)
    # pending -> cancelled at once
    job, tr = await store.request_cancel("0")
    assert tr is not None and job.state == State.CANCELLED
    # running -> marked; the worker's next step turns it into cancelled
    await store.claim(Stage.PREPROCESS, 3, 30, "p")
    job, tr = await store.request_cancel("1")
    assert tr is None and job.state == State.RUNNING and job.cancel_requested
    tr = await store.advance("1", "preprocess done")
    assert tr.to_state == State.CANCELLED
    # running, worker dies: reaper cancels instead of requeueing
    await store.request_cancel("2")
    store.clock.advance(31)  # type: ignore[attr-defined]
    trs = await store.reap(grace=30)
    assert {t.job_id: t.to_state for t in trs}["2"] == "cancelled"
    # terminal -> unchanged
    job, tr = await store.request_cancel("0")
    assert tr is None and job.state == State.CANCELLED
    with pytest.raises(NotFound):
        await store.request_cancel("missing")


async def test_recover_resumes_dead_owners_jobs_without_counting_attempts(
    make_store: StoreFactory,
) -> None:
    dead = make_store(owner="dead")
    await dead.open()
    await dead.create(new(1), 10)
    await dead.create(new(2), 10)
    await dead.claim(Stage.PREPROCESS, 1, 30, "p")
    await dead.close()
    alive = make_store(owner="alive")
    if not isinstance(alive, SqliteStore):
        # A shared database cannot tell dead owners from live ones (the instance registry can):
        # another instance's job is left alone, and so is the dead one's until it is named.
        live = make_store(owner="live")
        await live.open()
        await live.claim(Stage.PREPROCESS, 1, 30, "p")
        await alive.open()
        assert await alive.recover() == []

        async def dead_owners() -> list[str]:
            return ["dead"]

        alive.dead_owners = dead_owners  # type: ignore[attr-defined]
    await alive.open()
    (tr,) = await alive.recover()
    assert (tr.job_id, tr.to_state, tr.stage, tr.attempt) == ("1", "pending", "preprocess", 1)
    assert "restart" in tr.message


async def test_retry_job_and_prune(store: JobStore) -> None:
    await store.create(new(1), 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")
    await store.finish("1", State.FAILED, "boom", error={"type": "node_error", "message": "boom"})
    tr = await store.retry_job("1")
    assert tr.to_state == State.PENDING and tr.job is not None and tr.job.error is None
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
    assert raw(store, "SELECT count(*) FROM job_secrets") == [(0,)]


@pytest.mark.parametrize("engine", ["sqlite"])  # the SQLite adapter's writer thread
async def test_group_commit_batches_concurrent_writes(store: JobStore) -> None:
    assert isinstance(store, SqliteStore)
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


@pytest.mark.parametrize("engine", ["sqlite"])  # SQLite's WAL
async def test_checkpoint_truncates_wal(store: JobStore) -> None:
    assert isinstance(store, SqliteStore)
    for i in range(50):
        await store.create(new(i), 1000)
    busy, _, _ = await store.checkpoint()
    assert busy == 0
    wal = Path(str(store.path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


@pytest.mark.parametrize("engine", ["postgres"])  # one database, several instances
async def test_one_instance_prunes_at_a_time(store: JobStore, make_store: StoreFactory) -> None:
    for i in range(3):
        await store.create(new(i), 10)
        await store.request_cancel(str(i))
    store.clock.advance(61)  # type: ignore[attr-defined]
    assert isinstance(store, PostgresStore)
    other = make_store(clock=store.clock, owner="w2")
    await other.open()
    assert isinstance(other, PostgresStore)
    # While one instance holds the pruning lock, another's prune passes without deleting.
    async with other.pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PRUNE_LOCK,))
        assert await store.prune(older_than=60) == []
    assert sorted(await store.prune(older_than=60)) == ["0", "1", "2"]


async def test_dashboard_reads_counts_search_window_and_delete(store: JobStore) -> None:
    """What the dashboard asks of a store: counts per (state, stage) (per owner too), an id
    prefix search, the jobs that finished in a time window, and deleting one finished job."""
    for i, owner in (("a1", "k_a"), ("a2", "k_a"), ("b1", "k_b"), ("c1", None)):
        job = new(i)
        job.owner = owner
        await store.create(job, 10)
    await store.claim(Stage.PREPROCESS, 1, 30, "p")  # a1 runs
    t0 = store.clock.now()
    store.clock.advance(2.0)  # type: ignore[attr-defined]
    await store.finish("a1", State.COMPLETED, "ok")
    await store.request_cancel("b1")
    reads = store.reads()
    try:
        counts = await reads.status_counts(None)
        assert counts == {
            ("completed", ""): 1,
            ("cancelled", ""): 1,
            ("pending", "preprocess"): 2,
        }
        assert await reads.status_counts(["k_a"]) == {
            ("completed", ""): 1,
            ("pending", "preprocess"): 1,
        }
        assert await reads.status_counts([]) == {}
        assert [j.id for j in await reads.page([], 10, None, None, id_prefix="a")] == ["a2", "a1"]
        assert [j.id for j in await reads.page([], 10, None, ["k_b"], id_prefix="a")] == []
        assert [j.id for j in await reads.page(["cancelled"], 10, None, None, id_prefix="b")] == [
            "b1"
        ]
        window = await reads.finished_between(t0 - 1, t0 + 10, 100)
        assert sorted(s for s, _ in window) == ["cancelled", "completed"]
        assert dict(window)["completed"] == pytest.approx(2.0, abs=0.01)
        assert await reads.finished_between(t0 + 10, t0 + 20, 100) == []
        assert await reads.finished_between(t0 - 1, t0 + 10, 1) != []
        assert not await store.delete_finished("a2")  # still waiting
        assert not await store.delete_finished("nope")
        assert await store.delete_finished("a1")
        assert await store.get("a1") is None and await store.events("a1") == []
    finally:
        await reads.close()  # its connection's thread would outlive the test
