"""The stage runner: per stage, a task group of supervised workers that claim jobs from the store.

Idle workers register as waiters; one claimer per stage claims as many jobs as there are waiters
in a single statement and hands them out. New work (any commit that leaves a job pending in the
stage) wakes the claimer at once; when a retry is scheduled it sleeps until that time; otherwise it
looks again only every ``idle_poll`` seconds, for work written by another process (the CLI).

Delivery guarantee: a job's stage may run more than once (after a crash or an expired lease);
stages make their side effects idempotent (the ComfyUI prompt id is stored before submitting).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from comfyq.backoff import backoff
from comfyq.clock import parse_iso
from comfyq.errors import ComfyqError, JobError, LeaseLost
from comfyq.events import EventBus
from comfyq.limits import HEAP_TRIM
from comfyq.logs import job_context
from comfyq.store import Job, JobStore, Stage, State, Transition
from comfyq.store.base import StoreUnavailable
from comfyq.store.model import NEXT_STAGE, prompt_message

T = TypeVar("T")
log = logging.getLogger("comfyq.pipeline")

CLAIM_MESSAGES = {
    Stage.PREPROCESS: "Preprocessing",
    Stage.GENERATE: "Waiting for ComfyUI",
    Stage.POSTPROCESS: "Post-processing",
}


@dataclass
class StageDone:
    """What a stage hands back when it finished its part of a job."""

    message: str
    fields: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] | None = None  # output rows, written in the same commit


class JobContext:
    """What a stage handler may use while it holds a job."""

    def __init__(self, job: Job, pipeline: Pipeline) -> None:
        self.job = job
        self.pipeline = pipeline
        self.store = pipeline.store
        self.bus = pipeline.bus
        self.cancel_reason: str | None = None  # "cancel" | "timeout" | "shutdown" once cancelled
        # The columns this stage's ``assign`` had set in the commit that handed the job over
        # (generate: the prompt id it submits under, not submitted yet); None otherwise.
        self.assigned: dict[str, Any] | None = None

    async def update(self, **fields: Any) -> Job:
        """Durably set columns of this job (e.g. comfy_prompt_id before submitting)."""
        self.job = await self.store.update(self.job.id, fields)
        return self.job

    def progress(self, data: dict[str, Any]) -> None:
        self.bus.live(self.job.id, "progress", data)

    def live(self, kind: str, data: dict[str, Any], payload: bytes | None = None) -> None:
        self.bus.live(self.job.id, kind, data, payload)


class StageHandler(Protocol):
    async def __call__(self, job: Job, ctx: JobContext) -> StageDone: ...


class Assigner(Protocol):
    """A handler that may name columns to set in the commit that hands it a job (an optional
    ``assign`` method): the generate stage's prompt id, stored before it submits, without a
    write of its own."""

    def assign(self, job: Job) -> dict[str, Any] | None: ...


class _Running:
    """A job whose stage runs in a worker (in the worker's own task: no task per stage)."""

    __slots__ = ("_settled", "cancels", "ctx", "done", "handling", "task")

    def __init__(self, task: asyncio.Task[Any], ctx: JobContext) -> None:
        self.task = task  # the worker's task, which runs the handler itself
        self.ctx = ctx
        self.handling = True  # the handler runs: a cancel interrupts it (then the write doesn't)
        self.cancels = 0  # cancels this pipeline made of ``task`` (taken back by ``uncancel``)
        self._settled: asyncio.Event | None = None
        self.done = False  # outcome recorded

    @property
    def settled(self) -> asyncio.Event:
        """Set once the outcome is recorded (made only when someone waits for it: shutdown)."""
        if self._settled is None:
            self._settled = asyncio.Event()
            if self.done:
                self._settled.set()
        return self._settled

    def finish(self) -> None:
        self.done = True
        self.handling = False
        if self._settled is not None:
            self._settled.set()


@dataclass
class RunnerConfig:
    lease: float = 30.0
    retry_base: float = 2.0
    retry_max: float = 60.0
    idle_poll: float = 5.0
    restart_delay: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


class StageRunner:
    """Workers and the claimer of one stage."""

    def __init__(
        self, name: Stage, workers: int, handler: StageHandler, pipeline: Pipeline
    ) -> None:
        self.name = name
        self.size = workers
        self.handler = handler
        self.p = pipeline
        self._waiters: deque[asyncio.Future[Job]] = deque()
        self._work = asyncio.Event()
        self._waiter_added = asyncio.Event()
        self.claiming = True
        self.alive = 0
        self.busy = 0
        self.crashes = 0

    def notify(self) -> None:
        self._work.set()

    def pause(self) -> None:
        """Stop claiming new jobs of this stage (they wait in its queue); running ones go on."""
        self.claiming = False

    def resume(self) -> None:
        self.claiming = True
        self._waiter_added.set()
        self._work.set()

    def take_waiter(self) -> asyncio.Future[Job] | None:
        """An idle worker of this stage, taken from the claimer's hands (for a direct hand-off)."""
        if not self.claiming:
            return None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                return fut
        return None

    def return_waiter(self, fut: asyncio.Future[Job]) -> None:
        if not fut.done():
            self._waiters.appendleft(fut)
            self._waiter_added.set()

    # --- admission's hand-off (comfyq.store.base.Intake; the first stage only) ----------------

    @property
    def lease(self) -> float:
        return self.p.cfg.lease

    @property
    def message(self) -> str:
        return CLAIM_MESSAGES[self.name]

    def take(self) -> object | None:
        return self.take_waiter()

    def hand(self, ticket: object, job: Job | None) -> None:
        fut: asyncio.Future[Job] = ticket  # type: ignore[assignment]
        if job is None:
            self.return_waiter(fut)
        elif fut.done():  # the worker went away meanwhile (shutdown): back to the queue
            self.p.spawn(self.p.store.release(job.id, "Returned to the queue"))
        else:
            fut.set_result(job)

    async def claimer(self) -> None:
        while True:
            while not self._waiters or not self.claiming:
                self._waiter_added.clear()
                await self._waiter_added.wait()
            self._work.clear()
            # Take the waiters out of the queue for the claim: while it is awaited, a hand-off
            # must not give one of them a job as well, which would leave a claimed job with no
            # worker (released again: an extra commit and event per job).
            taken = deque(
                f
                for f in (self._waiters.popleft() for _ in range(len(self._waiters)))
                if not f.done()
            )
            want = len(taken)
            if not want:
                continue
            jobs: list[Job] = []
            free = getattr(self.handler, "free_backend", None)
            backend: str | None = free() if free is not None else None
            try:
                jobs = await self.p.store.claim(
                    self.name, want, self.p.cfg.lease, CLAIM_MESSAGES[self.name], backend
                )
                if backend is not None:
                    self._note_assigned(jobs)
                self.p.store_back()
                await self._hand_out(jobs, taken)
            except StoreUnavailable as exc:
                await self.p.store_lost(exc)  # claims pause until the database answers again
                continue
            finally:
                for fut in reversed(taken):
                    self.return_waiter(fut)
            got = len(jobs)
            jobs.clear()  # not held while idle: a job keeps its decoded workflow (see worker)
            if got < want:
                try:
                    await self._sleep_until_work()
                except StoreUnavailable as exc:
                    await self.p.store_lost(exc)

    def _note_assigned(self, jobs: list[Job]) -> None:
        """The jobs this claim gave a prompt id (the claim wrote the message that names it; a
        job that already had one kept it and got the claim's message): ``JobContext.assigned``."""
        for job in jobs:
            pid = job.comfy_prompt_id
            if pid is not None and job.message == prompt_message(pid):
                self.p.assigned[job.id] = {
                    "comfy_prompt_id": pid,
                    "comfy_backend": job.comfy_backend,
                }

    async def _hand_out(self, jobs: list[Job], taken: deque[asyncio.Future[Job]]) -> None:
        for job in jobs:
            while taken and taken[0].done():
                taken.popleft()
            if not taken:
                # The workers went away between asking and getting: give the job back.
                self.p.assigned.pop(job.id, None)
                await self.p.store.release(job.id, "Returned to the queue")
                continue
            taken.popleft().set_result(job)

    async def _sleep_until_work(self) -> None:
        timeout = self.p.cfg.idle_poll
        nxt = await self.p.store.next_run_after(self.name)
        if nxt is not None:
            timeout = max(0.0, min(timeout, parse_iso(nxt) - self.p.clock.now()) + 0.001)
        try:
            # asyncio.timeout, not wait_for: wait_for (3.11) runs the wait in a task of its own,
            # and a claimer sleeps here after nearly every claim.
            async with asyncio.timeout(timeout):
                await self._work.wait()
        except TimeoutError:
            pass

    def ask(self) -> asyncio.Future[Job] | None:
        """A worker asks for its next job: a future the claimer (or a hand-off) resolves."""
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._waiter_added.set()
        return fut

    def unask(self, fut: asyncio.Future[Job] | None) -> None:
        """A worker that asked early goes away: a job handed to it meanwhile goes back."""
        if fut is None:
            return
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled() and fut.exception() is None:
            job = fut.result()
            self.p.assigned.pop(job.id, None)
            self.p.spawn(self.p.store.release(job.id, "Returned to the queue"))

    async def _next(self, fut: asyncio.Future[Job] | None = None) -> Job:
        if fut is None:
            fut = self.ask()
        assert fut is not None
        try:
            return await fut
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    async def worker(self, index: int) -> None:
        """A supervised worker: a crash is logged and the worker starts again."""
        while True:
            self.alive += 1
            early: asyncio.Future[Job] | None = None
            try:
                while True:
                    job = await self._next(early)
                    early = None
                    self.busy += 1
                    try:
                        # A worker whose job went on asks for its next one as it commits that
                        # (the asking, see Pipeline._advance): its claim joins the same commit.
                        early = await self.p.run_job(self, job)
                    finally:
                        self.busy -= 1
                        # Not held while waiting for the next one: a job keeps its decoded
                        # payload (a 5,000-node workflow: ~100k objects, 7 MB), measured
                        # holding RSS 1.5x idle after a burst of large workflows.
                        del job
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes += 1
                log.exception("worker %s-%d crashed; restarting it", self.name, index)
            finally:
                self.unask(early)
                self.alive -= 1
            await asyncio.sleep(self.p.cfg.restart_delay)


class Pipeline:
    """Three stages, their workers, leases, the reaper and cancellation."""

    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        handlers: Mapping[Stage, StageHandler],
        workers: Mapping[Stage, int],
        cfg: RunnerConfig | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = store.clock
        self.cfg = cfg or RunnerConfig()
        self.stages = {
            name: StageRunner(name, workers[name], h, self) for name, h in handlers.items()
        }
        self.running: dict[str, _Running] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.on_cleanup: list[Callable[[Job, str], Awaitable[None]]] = []
        self._store_down = 0  # consecutive StoreUnavailable waits (0: the store answers)
        # Job id -> the columns the next stage's ``assign`` set in the hand-off (JobContext).
        self.assigned: dict[str, dict[str, Any]] = {}
        self._spawned: set[asyncio.Task[Any]] = set()
        # Deadlines of the running stages: (loop time, seq, entry), one timer for the earliest.
        self._deadlines: list[tuple[float, int, _Running]] = []
        self._deadline_seq = itertools.count()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = float("inf")
        store.listen(self.wake)
        first = self.stages.get(Stage.PREPROCESS)
        if first is not None:
            store.intake = first  # admission hands new jobs to its idle workers

    def spawn(self, aw: Awaitable[Any]) -> None:
        """Run a store write in the background (a rare give-back), keeping a reference."""
        task = asyncio.ensure_future(aw)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    # --- a database that went away -----------------------------------------------------------

    async def store_lost(self, exc: StoreUnavailable) -> None:
        """Wait before trying the store again: capped exponential backoff with jitter."""
        if self._store_down == 0:
            log.warning("store unavailable, workers pause and retry: %s", exc.message)
        self._store_down += 1
        await asyncio.sleep(backoff(self._store_down, 0.5, 10.0))

    def store_back(self) -> None:
        if self._store_down:
            log.warning("store available again after %d retries", self._store_down)
            self._store_down = 0

    async def durably(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` (a store write whose outcome is known only here), retried until the
        store answers: a job's result is never dropped because the database was away."""
        while True:
            try:
                result = await fn()
            except StoreUnavailable as exc:
                await self.store_lost(exc)
                continue
            self.store_back()
            return result

    def wake(self, trs: list[Transition]) -> None:
        """Wake the claimer of every stage a committed change left a job pending in (not for a
        job claimed in the same commit: a hand-off, or an admission to an idle worker, leaves
        nothing for the claimer, which would otherwise claim in vain)."""
        last = len(trs) - 1
        for i, tr in enumerate(trs):
            if tr.to_state == State.PENDING and tr.stage in self.stages:
                after = trs[i + 1] if i < last else None
                if (
                    after is not None
                    and after.job_id == tr.job_id
                    and after.to_state == State.RUNNING
                ):
                    continue  # claimed in the same commit
                self.stages[tr.stage].notify()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume what a dead process left, then start claimers, workers and the reaper."""
        recovered = await self.store.recover()
        if recovered:
            log.info("resumed %d job(s) left mid-stage by a previous process", len(recovered))
        for st in self.stages.values():
            self._tasks.append(asyncio.create_task(st.claimer(), name=f"claimer-{st.name}"))
            for i in range(st.size):
                self._tasks.append(asyncio.create_task(st.worker(i), name=f"worker-{st.name}-{i}"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="reaper"))

    async def stop(self, grace: float) -> None:
        """Stop claiming, let in-flight jobs finish for ``grace`` seconds, release the rest."""
        for st in self.stages.values():
            st.claiming = False
        if self.store.intake is self.stages.get(Stage.PREPROCESS):
            self.store.intake = None
        if self.running:
            log.info("shutting down: waiting up to %.0fs for %d job(s)", grace, len(self.running))
            await self._settled(grace)
        for job_id in list(self.running):
            self._cancel_local(job_id, "shutdown")
        await self._settled(10)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadline_at = float("inf")
        self._deadlines.clear()

    async def _settled(self, timeout: float) -> None:
        waits = [asyncio.create_task(r.settled.wait()) for r in self.running.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for w in pending:
                w.cancel()

    def health(self) -> dict[str, dict[str, int]]:
        return {
            n: {"workers": st.size, "alive": st.alive, "busy": st.busy, "crashes": st.crashes}
            for n, st in self.stages.items()
        }

    # --- cancellation ------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job in any state; a running one is interrupted by its worker."""
        job, _ = await self.store.request_cancel(job_id)
        if job.state == State.RUNNING:
            self._cancel_local(job_id, "cancel")
        return job

    def _cancel_local(self, job_id: str, reason: str, only: _Running | None = None) -> bool:
        r = self.running.get(job_id)
        if r is None or r.ctx.cancel_reason is not None or (only is not None and r is not only):
            return False
        r.ctx.cancel_reason = reason
        # Only while the handler runs: once it has returned, the worker is writing its result
        # (as a cancel of the handler's own task, done by then, used to leave it).
        if r.handling and r.task.cancel():
            r.cancels += 1
        return True

    # --- running one job ---------------------------------------------------------------------

    async def run_job(self, stage: StageRunner, job: Job) -> asyncio.Future[Job] | None:
        """Run one stage of ``job``; the worker's request for its next job if it made one
        already (see ``_advance``)."""
        # Every line logged while this job runs (its handler task copies the context) names it;
        # the worker's context is restored afterwards, so the next job starts without it.
        with job_context(job.id):
            return await self._run_job(stage, job)

    async def _run_job(self, stage: StageRunner, job: Job) -> asyncio.Future[Job] | None:
        # The handler runs in the worker's own task, not in a task of its own: a task per stage
        # (its first step, the future that woke the worker when it ended, that wake-up) cost
        # three loop callbacks per stage of every job. A cancel (the client's, the deadline's,
        # shutdown's) cancels the worker's task while the handler runs (``_cancel_local``), and
        # is taken back here (``uncancel``) once the handler has ended.
        ctx = JobContext(job, self)
        ctx.assigned = self.assigned.pop(job.id, None)
        task = asyncio.current_task()
        assert task is not None
        entry = _Running(task, ctx)
        self.running[job.id] = entry
        self._watch_deadline(entry, parse_iso(job.deadline_at) - self.clock.now())
        try:
            if job.cancel_requested:
                # Cancelled before it started: the handler does not run at all.
                entry.handling = False
                ctx.cancel_reason = "cancel"
                await self._settle(job, ctx, None, stage)
                return None
            try:
                done = await stage.handler(job, ctx)
            except asyncio.CancelledError:
                entry.handling = False
                external = self._take_back(entry)
                if external:
                    # This worker itself is being cancelled (shutdown): record, then go.
                    if ctx.cancel_reason is None:
                        ctx.cancel_reason = "shutdown"
                    await self._settle(job, ctx, None, stage)
                    raise
                await self._settle(job, ctx, None, stage)
                return None
            # Whatever the handler raised (a bug included) fails this job only; _settle records it.
            except BaseException as exc:
                entry.handling = False
                external = self._take_back(entry)
                await self._settle(job, ctx, exc, stage)
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise  # not the job's: they stop the loop, as they did from the handler's task
                if external:
                    raise asyncio.CancelledError from None  # see below
                return None
            entry.handling = False
            external = self._take_back(entry)
            early = await self._advance(job, done, stage)
            if external:
                # The worker was cancelled from outside (shutdown) while its handler ran, and the
                # handler went on regardless: its result is recorded; now the worker goes.
                stage.unask(early)
                raise asyncio.CancelledError
            return early
        finally:
            self.running.pop(job.id, None)
            entry.finish()
            # A failed handler's exception has a traceback starting in this frame: nothing of
            # this frame may hold that exception (the cycle kept the handler's frames and their
            # locals, the decoded workflow, until a full garbage collection).
            del entry
            # The stage decoded the job's payload (or its prepared workflow) and has freed it.
            HEAP_TRIM.after(job.stored("payload"))

    def _take_back(self, entry: _Running) -> bool:
        """Undo the cancels this pipeline made of the worker's task for this job (the handler
        has ended); True when the task is still being cancelled by someone else (shutdown)."""
        task = entry.task
        for _ in range(entry.cancels):
            task.uncancel()
        entry.cancels = 0
        return task.cancelling() > 0

    # --- deadlines: one heap, one timer ------------------------------------------------------

    def _watch_deadline(self, entry: _Running, delay: float) -> None:
        """Cancel ``entry``'s job ``delay`` seconds from now (if its stage still runs then).
        Every running stage's deadline is in one heap under one loop timer, armed for the
        earliest: jobs admitted later end later, so a new stage arms no timer of its own."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        heap = self._deadlines
        if len(heap) > 64 + 2 * len(self.running):
            # Entries of stages that ended stay until their time comes; drop them at once
            # when they outnumber the running ones (amortised: a few per stage at most).
            heap[:] = [item for item in heap if not item[2].done]
            heapq.heapify(heap)
        heapq.heappush(heap, (when, next(self._deadline_seq), entry))
        if when < self._deadline_at:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_at = when
            self._deadline_timer = loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        self._deadline_at = float("inf")
        loop = asyncio.get_running_loop()
        heap = self._deadlines
        now = loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done):
            _, _, entry = heapq.heappop(heap)
            if not entry.done:
                self._cancel_local(entry.ctx.job.id, "timeout", entry)
        if heap:
            self._deadline_at = heap[0][0]
            self._deadline_timer = loop.call_at(self._deadline_at, self._on_deadline)

    async def _advance(
        self, job: Job, done: StageDone, stage: StageRunner
    ) -> asyncio.Future[Job] | None:
        """Record a finished stage (handing the job to an idle worker of the next one when
        there is one); the worker's request for its next job, made before the commit."""
        next_stage = NEXT_STAGE[job.stage]
        nxt = self.stages.get(next_stage) if next_stage is not None else None
        waiter = nxt.take_waiter() if nxt is not None else None
        assign = getattr(nxt.handler, "assign", None) if nxt is not None and waiter else None
        claim_fields = assign(job) if assign is not None else None
        # The worker asks for its next job now, not after this commit: the claimer wakes before
        # the write below is handed to the writer thread and its claim joins the same group
        # commit (one commit, and the next job starts a commit earlier). A job handed to it
        # meanwhile waits for it; if the write fails, the worker takes it back (``unask``).
        early = stage.ask() if stage.claiming else None
        try:
            early = await self._advance_write(job, done, nxt, waiter, claim_fields, early)
        except BaseException:
            stage.unask(early)
            raise
        return early

    async def _advance_write(
        self,
        job: Job,
        done: StageDone,
        nxt: StageRunner | None,
        waiter: asyncio.Future[Job] | None,
        claim_fields: dict[str, Any] | None,
        early: asyncio.Future[Job] | None,
    ) -> asyncio.Future[Job] | None:
        try:
            if waiter is None:
                await self.durably(
                    lambda: self.store.advance(job.id, done.message, done.fields, done.outputs)
                )
                return early
            assert nxt is not None
            trs = await self.durably(
                lambda: self.store.advance_and_claim(
                    job.id,
                    done.message,
                    done.fields,
                    self.cfg.lease,
                    CLAIM_MESSAGES[nxt.name],
                    done.outputs,
                    claim_fields,
                )
            )
        except LeaseLost:
            log.warning(
                "job %s: lease lost before its %s result could be saved",
                job.id,
                job.stage,
                extra={"job_id": job.id},
            )
            trs = []
        except BaseException:
            if waiter is not None and nxt is not None:
                nxt.return_waiter(waiter)
            raise
        if nxt is None or waiter is None:
            return early  # the lease was lost before a plain advance: nothing to hand over
        claimed = trs[-1].job if len(trs) == 2 else None
        if claimed is None:
            nxt.return_waiter(waiter)
        elif waiter.done():
            await self.store.release(claimed.id, "Returned to the queue")
        else:
            if claim_fields:
                self.assigned[claimed.id] = claim_fields
            waiter.set_result(claimed)
        return early

    async def _settle(
        self, job: Job, ctx: JobContext, exc: BaseException | None, stage: StageRunner
    ) -> None:
        """Record how a handler that did not return normally ended (``exc``: what it raised,
        None when it was cancelled)."""
        reason = ctx.cancel_reason

        async def record() -> None:
            if isinstance(exc, StoreUnavailable) and reason is None:
                # The handler lost the database, not the job: back to its queue, no attempt.
                await self.store.release(job.id, "Store unavailable; will resume")
            elif exc is None and reason in (
                "shutdown",
                None,
            ):  # cancelled by shutdown, or from outside
                await self.store.release(job.id, "Interrupted by shutdown; will resume")
            elif exc is None and reason == "cancel":
                await self.store.finish(
                    job.id,
                    State.CANCELLED,
                    "Request cancelled by client",
                    error={"type": "cancelled", "message": "Request cancelled by client"},
                )
            elif exc is None and reason == "timeout":
                await self.store.finish(
                    job.id,
                    State.FAILED,
                    "Job timed out",
                    error={"type": "timeout", "message": "job deadline passed"},
                )
            elif isinstance(exc, JobError) and exc.retryable and reason is None:
                delay = backoff(job.attempts, self.cfg.retry_base, self.cfg.retry_max)
                log.info(
                    "job %s: %s in %s (attempt %d): %s",
                    job.id,
                    exc.type,
                    job.stage,
                    job.attempts,
                    exc.message,
                    extra={"job_id": job.id},
                )
                await self.store.retry_later(job.id, delay, exc.to_dict())
            elif isinstance(exc, ComfyqError):
                await self.store.finish(
                    job.id, State.FAILED, _fail_message(job.stage, exc.message), error=exc.to_dict()
                )
            elif exc is not None:
                log.error(
                    "job %s: unexpected error in %s",
                    job.id,
                    job.stage,
                    exc_info=exc,
                    extra={"job_id": job.id},
                )
                err = {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
                await self.store.finish(
                    job.id, State.FAILED, _fail_message(job.stage, err["message"]), error=err
                )

        try:
            await self.durably(record)
        except LeaseLost:
            log.warning(
                "job %s: lease lost while recording its outcome", job.id, extra={"job_id": job.id}
            )
        for fn in self.on_cleanup:
            try:
                await fn(job, reason or ("error" if exc else "done"))
            except Exception:
                log.exception("cleanup hook failed for job %s", job.id)

    # --- housekeeping ------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        period = max(0.2, min(5.0, self.cfg.lease / 3))
        while True:
            await asyncio.sleep(period)
            try:
                await self.housekeep()
            except StoreUnavailable:
                pass  # the claimers say so, and everything is retried when it returns
            except Exception:
                log.exception("housekeeping failed")

    async def housekeep(self) -> None:
        """Renew leases, reap expired ones, and pick up cancels written by other processes."""
        await self.store.renew(self.cfg.lease)
        reaped = await self.store.reap(grace=self.cfg.lease)
        for tr in reaped:
            log.warning("job %s: %s", tr.job_id, tr.message, extra={"job_id": tr.job_id})
            self._cancel_local(tr.job_id, "cancel" if tr.to_state == State.CANCELLED else "timeout")
        for job_id in await self.store.cancel_requested():
            self._cancel_local(job_id, "cancel")


_FAILED_IN = {
    Stage.PREPROCESS: "Preprocessing",
    Stage.GENERATE: "Generation",
    Stage.POSTPROCESS: "Post-processing",
}


def _fail_message(stage: Stage, message: str) -> str:
    return f"{_FAILED_IN[stage]} failed: {message}"
