"""The stage runner on a real store: claims, wake-ups, retries, deadlines, cancel, crash, shutdown.

Stage handlers here are small test stages plugged into the real runner (the runner's contract is a
handler per stage); the full ComfyUI path is exercised in the API and crash tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from comfyq.errors import ComfyUIUnreachable, NodeError
from comfyq.events import EventBus
from comfyq.stages.runner import JobContext, Pipeline, RunnerConfig, StageDone
from comfyq.store import Job, JobStore, NewJob, open_store
from comfyq.store.model import STAGES, Stage, State
from comfyq.store.sqlite import SqliteStore


class Recorder:
    """A stage that records what it ran and behaves as each job's payload says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.runs: Counter[str] = Counter()
        self.started: dict[str, asyncio.Event] = {}
        self.cleaned: list[tuple[str, str]] = []

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        self.runs[job.id] += 1
        self.started.setdefault(job.id, asyncio.Event()).set()
        plan: dict[str, Any] = job.payload.get(self.name, {})
        try:
            if plan.get("sleep"):
                await asyncio.sleep(plan["sleep"])
            if plan.get("swallow"):  # a handler that ignores being cancelled
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(plan["swallow"])
            if self.runs[job.id] <= plan.get("fail_retryable", 0):
                raise ComfyUIUnreachable("ComfyUI is down")
            if plan.get("fail"):
                raise NodeError("boom", node_id="5", node_type="LoadImage")
            if plan.get("crash"):
                raise ZeroDivisionError("a bug")
        except asyncio.CancelledError:
            self.cleaned.append((job.id, ctx.cancel_reason or "?"))
            raise
        ctx.progress({"value": 1, "max": 1})
        return StageDone(f"{self.name} done")


Rig = tuple[JobStore, EventBus, Pipeline, dict[Stage, Recorder]]


def job(i: int, **plan: Any) -> NewJob:
    return NewJob(
        id=f"j{i}", payload=plan, payload_hash=str(i), timeout=plan.pop("timeout", 3600.0)
    )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = open_store(tmp_path / "q.db")
    await store.open()
    bus = EventBus()
    store.listen(bus.on_transitions)
    handlers = {s: Recorder(s) for s in STAGES}
    pipe = Pipeline(
        store,
        bus,
        handlers,
        {s: 2 for s in STAGES},
        RunnerConfig(lease=3.0, retry_base=0.05, retry_max=0.2, idle_poll=30.0),
    )
    await pipe.start()
    yield store, bus, pipe, handlers
    await pipe.stop(grace=1)
    await store.close()


async def wait_final(bus: EventBus, store: JobStore, job_id: str, timeout: float = 10) -> Job:
    sub = bus.subscribe(job_id)
    try:
        j = await store.get(job_id)
        while j is not None and not j.terminal:
            ev = await sub.get(timeout)
            assert ev is not None, f"{job_id} did not finish"
            j = await store.get(job_id)
        assert j is not None
        return j
    finally:
        sub.close()


async def test_jobs_flow_through_every_stage_without_polling_delay(rig: Rig) -> None:
    store, bus, _, handlers = rig
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(20):
        await store.create(job(i), 100)
    done = [await wait_final(bus, store, f"j{i}") for i in range(20)]
    assert {j.state for j in done} == {"completed"}
    # idle_poll is 30 s: finishing fast proves workers are woken by new work, not by a timer.
    assert loop.time() - t0 < 10
    for h in handlers.values():
        assert sum(h.runs.values()) == 20


async def test_retryable_error_retries_with_backoff_then_succeeds(rig: Rig) -> None:
    store, bus, _, handlers = rig
    await store.create(job(1, generate={"fail_retryable": 2}), 10)
    j = await wait_final(bus, store, "j1")
    assert (
        j.state == State.COMPLETED and j.attempts == 3 and handlers[Stage.GENERATE].runs["j1"] == 3
    )
    msgs = [e["message"] for e in await store.events("j1")]
    assert sum("retrying" in m for m in msgs) == 2


async def test_retryable_error_fails_once_attempts_are_spent(rig: Rig) -> None:
    store, bus, _, _ = rig
    await store.create(job(1, generate={"fail_retryable": 99}), 10)
    j = await wait_final(bus, store, "j1")
    assert (
        j.state == State.FAILED
        and j.attempts == 3
        and (j.error or {}).get("type") == "comfyui_unreachable"
    )


async def test_non_retryable_error_fails_at_once_with_typed_error(rig: Rig) -> None:
    store, bus, _, handlers = rig
    await store.create(job(1, generate={"fail": True}), 10)
    j = await wait_final(bus, store, "j1")
    assert j.state == State.FAILED and handlers[Stage.GENERATE].runs["j1"] == 1
    assert j.error == {
        "type": "node_error",
        "message": "boom",
        "node_id": "5",
        "node_type": "LoadImage",
    }
    assert j.message.startswith("Generation failed")


async def test_a_bug_in_a_stage_fails_that_job_only(rig: Rig) -> None:
    store, bus, pipe, _ = rig
    await store.create(job(1, preprocess={"crash": True}), 10)
    await store.create(job(2), 10)
    assert ((await wait_final(bus, store, "j1")).error or {}).get("type") == "internal_error"
    assert (await wait_final(bus, store, "j2")).state == State.COMPLETED
    assert all(s["alive"] == 2 for s in pipe.health().values())


async def test_deadline_fails_a_running_job_with_timeout(rig: Rig) -> None:
    store, bus, _, handlers = rig
    await store.create(job(1, timeout=0.5, generate={"sleep": 30}), 10)
    j = await wait_final(bus, store, "j1")
    assert j.state == State.FAILED and (j.error or {}).get("type") == "timeout"
    assert handlers[Stage.GENERATE].cleaned == [("j1", "timeout")]


async def test_cancel_waiting_and_running_jobs(rig: Rig) -> None:
    store, bus, pipe, handlers = rig
    await store.create(job(1, generate={"sleep": 30}), 10)
    started = handlers[Stage.GENERATE].started.setdefault("j1", asyncio.Event())
    await asyncio.wait_for(started.wait(), 5)
    j = await pipe.cancel("j1")
    assert j.state == State.RUNNING
    j = await wait_final(bus, store, "j1")
    assert j.state == State.CANCELLED and handlers[Stage.GENERATE].cleaned == [("j1", "cancel")]
    # A waiting job (run_after far away keeps it waiting) is cancelled at once.
    await store.create(job(2), 10)
    j2 = await pipe.cancel("j2")
    assert j2.state in ("cancelled", "running")
    assert (await wait_final(bus, store, "j2")).state in ("cancelled", "completed")
    # Finished: unchanged.
    assert (await pipe.cancel("j1")).state == State.CANCELLED


async def test_cancels_and_deadlines_leave_the_workers_that_ran_the_handlers_intact(
    rig: Rig,
) -> None:
    """A handler runs in its worker's own task: a cancel or a deadline cancels that task while
    the handler runs, and is taken back once it ended. Cancel after cancel and deadline after
    deadline, the same workers go on: none is left cancelling (it would take the next cancel
    for a shutdown and end), none crashed, and the next jobs complete."""
    store, bus, pipe, handlers = rig
    gen = handlers[Stage.GENERATE]
    for i in range(1, 5):
        await store.create(job(i, generate={"sleep": 30}), 10)
        started = gen.started.setdefault(f"j{i}", asyncio.Event())
        await asyncio.wait_for(started.wait(), 5)
        await pipe.cancel(f"j{i}")
        assert (await wait_final(bus, store, f"j{i}")).state == State.CANCELLED
    for i in range(5, 8):
        await store.create(job(i, timeout=0.3, generate={"sleep": 30}), 10)
        j = await wait_final(bus, store, f"j{i}")
        assert j.state == State.FAILED and (j.error or {}).get("type") == "timeout"
    assert gen.cleaned == [(f"j{i}", "cancel") for i in range(1, 5)] + [
        (f"j{i}", "timeout") for i in range(5, 8)
    ]
    workers = [t for t in pipe._tasks if t.get_name().startswith("worker-")]
    assert workers and all(not t.done() and t.cancelling() == 0 for t in workers)
    assert all(s["alive"] == 2 and s["crashes"] == 0 for s in pipe.health().values())
    for i in range(8, 12):
        await store.create(job(i), 10)
    for i in range(8, 12):
        assert (await wait_final(bus, store, f"j{i}")).state == State.COMPLETED
    assert not pipe.running and not [e for e in pipe._deadlines if not e[2].done]


async def test_a_worker_cancelled_while_its_handler_ignores_it_records_the_job_then_ends(
    rig: Rig,
) -> None:
    """The handler runs in the worker's task: a cancel of the worker from outside reaches the
    handler, and a handler that swallows it and returns does not keep the worker alive (as a
    worker awaiting its handler's own task used to be cancelled there): the stage's result is
    recorded, then the worker ends cancelled."""
    store, bus, pipe, handlers = rig
    await store.create(job(1, preprocess={"swallow": 30}), 10)
    started = handlers[Stage.PREPROCESS].started.setdefault("j1", asyncio.Event())
    await asyncio.wait_for(started.wait(), 5)
    entry = pipe.running["j1"]
    entry.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(entry.task), 5)
    assert entry.task.cancelled()
    # Its result was recorded: the job went on through the other stages.
    assert (await wait_final(bus, store, "j1")).state == State.COMPLETED


async def test_shutdown_releases_running_jobs_for_the_next_start(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q.db")
    await store.open()
    handlers = {s: Recorder(s) for s in STAGES}
    pipe = Pipeline(store, EventBus(), handlers, {s: 1 for s in STAGES}, RunnerConfig(lease=3.0))
    await pipe.start()
    await store.create(job(1, generate={"sleep": 30}), 10)
    started = handlers[Stage.GENERATE].started.setdefault("j1", asyncio.Event())
    await asyncio.wait_for(started.wait(), 5)
    await pipe.stop(grace=0.2)
    j = await store.get("j1")
    assert j is not None and (j.state, j.stage, j.attempts) == ("pending", "generate", 1)
    assert handlers[Stage.GENERATE].cleaned == [("j1", "shutdown")]
    await store.close()
    assert store.intake is None  # a stopped pipeline takes no admissions


async def test_idle_workers_take_admissions_and_hand_offs_in_the_same_commits(rig: Rig) -> None:
    """With a worker idle in every stage, a job costs four writes (admitted claimed, two
    hand-offs, the end) and no claim of the claimers: the same seven events as ever."""
    store, bus, _, handlers = rig
    assert isinstance(store, SqliteStore)
    await asyncio.sleep(0.05)  # the workers are waiting
    writes = store.writer.ops
    await store.create(job(1), 100)
    done = await wait_final(bus, store, "j1")
    assert done.state == State.COMPLETED and done.attempts == 1
    await asyncio.sleep(0.05)  # any wake-up of a claimer would have written by now
    assert store.writer.ops - writes == 4
    assert [(e["from_state"], e["to_state"], e["stage"]) for e in await store.events("j1")] == [
        (None, "pending", "preprocess"),
        ("pending", "running", "preprocess"),
        ("running", "pending", "generate"),
        ("pending", "running", "generate"),
        ("running", "pending", "postprocess"),
        ("pending", "running", "postprocess"),
        ("running", "completed", "postprocess"),
    ]
    for h in handlers.values():
        assert h.runs["j1"] == 1


async def test_admissions_beyond_the_idle_workers_wait_in_claim_order(tmp_path: Path) -> None:
    store = open_store(tmp_path / "q.db")
    await store.open()
    order: list[str] = []

    class Ordered(Recorder):
        async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
            order.append(job.id)
            return await super().__call__(job, ctx)

    handlers = {s: Recorder(s) for s in STAGES}
    handlers[Stage.PREPROCESS] = Ordered(Stage.PREPROCESS)
    pipe = Pipeline(
        store,
        EventBus(),
        handlers,
        {s: 1 for s in STAGES},
        RunnerConfig(lease=3.0, idle_poll=30.0),
    )
    await pipe.start()
    try:
        await asyncio.sleep(0.05)
        # j0 goes to the idle worker; the rest wait, and a later, higher-priority job is run
        # before them (claim order), never an admission past a waiting job of its priority.
        await store.create(job(0, preprocess={"sleep": 0.3}), 100)
        for i in range(1, 4):
            await store.create(job(i), 100)
        await store.create(NewJob(id="urgent", payload={}, payload_hash="u", priority=5), 100)
        async with asyncio.timeout(10):
            while len(order) < 5:
                await asyncio.sleep(0.02)
        assert order == ["j0", "urgent", "j1", "j2", "j3"]
    finally:
        await pipe.stop(grace=1)
        await store.close()


async def test_a_busy_stage_claims_a_workers_next_job_in_the_commit_of_its_last(
    tmp_path: Path,
) -> None:
    """A worker asks for its next job as it commits the last one's hand-off: with jobs waiting
    in its stage, the claim joins that commit (one commit per job there, not two)."""
    store = open_store(tmp_path / "q.db")
    await store.open()
    assert isinstance(store, SqliteStore)
    handlers = {s: Recorder(s) for s in STAGES}
    pipe = Pipeline(
        store,
        EventBus(),
        handlers,
        {Stage.PREPROCESS: 4, Stage.GENERATE: 1, Stage.POSTPROCESS: 1},
        RunnerConfig(lease=10.0, idle_poll=30.0),
    )
    await pipe.start()
    try:
        n = 8
        for i in range(n):
            await store.create(job(i, generate={"sleep": 0.1}), 100)
        async with asyncio.timeout(10):  # every job is waiting for the one generate worker
            while len(handlers[Stage.GENERATE].runs) < 1 or any(
                j.state == State.RUNNING and j.stage == Stage.PREPROCESS
                for j in await store.list_jobs()
            ):
                await asyncio.sleep(0.01)
        commits = store.writer.commits
        async with asyncio.timeout(20):
            while sum(handlers[Stage.POSTPROCESS].runs.values()) < n:
                await asyncio.sleep(0.01)
            while any(not j.terminal for j in await store.list_jobs()):
                await asyncio.sleep(0.01)
        # Per job: its generate worker's hand-off to postprocess with the claim of the next
        # generate job (one commit), and postprocess's end (one): 2n, measured 16 for 8 jobs.
        # Asked after the commit, the claim took a commit of its own: measured 21.
        assert store.writer.commits - commits < 2.5 * n
        assert {j.state for j in await store.list_jobs()} == {State.COMPLETED}
    finally:
        await pipe.stop(grace=1)
        await store.close()
