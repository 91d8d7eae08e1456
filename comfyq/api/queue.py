"""Queue positions and wait estimates, shared by every stream.

Streams: one query ranks every waiting job of every stage (priority, then age: the claim order)
and the answer is reused until the next state change commits, so a thousand streams woken by one
change cost one query, not a thousand. Everything else asks for less: ``info`` (/queue-info,
/health) needs only the counts per stage (two indexed counts, shared the same way), and the
position of one job (GET /result) is one indexed count of the jobs ahead of it; neither ranks a
deep queue (at 10,000 waiting jobs a ranking costs ~100 ms, a count a few ms). Streams of
waiting jobs are woken when the queue moves, at most every ``min_interval`` seconds. Estimates
come from the measured stage durations of recently completed jobs of the same kind
(``comfyq.api.eta``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from comfyq.api.eta import Durations
from comfyq.clock import parse_iso
from comfyq.events import Event, Subscription
from comfyq.schemas import QueueInfo, QueuePosition
from comfyq.store.model import STAGES, Job, Stage, State, Transition

# Up to this many waiting streams, each places its job by one indexed count; beyond, they share
# one ranking of the whole queue per change.
RANK_FROM_WATCHERS = 32

QueueName = Literal["preprocessing", "generation", "postprocessing"]
QUEUE_NAMES: dict[Stage, QueueName] = {
    Stage.PREPROCESS: "preprocessing",
    Stage.GENERATE: "generation",
    Stage.POSTPROCESS: "postprocessing",
}


@dataclass
class Counts:
    """Waiting and running jobs per stage, at one moment."""

    version: int
    waiting: dict[Stage, int]
    running: dict[Stage, int]


@dataclass
class Snapshot:
    """Where every unfinished job stands, at one moment."""

    version: int
    taken: float
    positions: dict[str, int] = field(default_factory=dict)  # waiting job id -> 1-based position
    waiting: dict[Stage, int] = field(default_factory=dict)
    running: dict[Stage, int] = field(default_factory=dict)


class QueueView:
    """Positions, queue sizes and ETAs; wakes the streams of waiting jobs when the queue moves."""

    def __init__(
        self,
        store: Any,
        reads: Any,
        pipeline: Any,
        *,
        max_queue_size: int,
        min_interval: float = 0.25,
    ) -> None:
        self.store = store
        self.reads = reads
        self.pipeline = pipeline
        self.max_queue_size = max_queue_size
        self.min_interval = min_interval
        self.version = 0
        self._snap: Snapshot | None = None
        self._refreshing: dict[int, asyncio.Future[Snapshot]] = {}
        self._counts: Counts | None = None
        self._counting: dict[int, asyncio.Future[Counts]] = {}
        self.durations = Durations(store, reads)
        self._watchers: dict[Subscription, str] = {}
        self._poke: asyncio.TimerHandle | None = None
        self._last_poke = 0.0
        store.listen(self.on_transitions)

    # --- change tracking ---------------------------------------------------------------------

    def on_transitions(self, trs: list[Transition]) -> None:
        """Store listener: the queue moved; tell watching streams soon (coalesced)."""
        self.version += 1
        if self._watchers and self._poke is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_poke + self.min_interval - loop.time())
            self._poke = loop.call_later(delay, self._wake)

    def _wake(self) -> None:
        self._poke = None
        self._last_poke = asyncio.get_running_loop().time()
        for sub, job_id in list(self._watchers.items()):
            sub.push(Event(job_id, "", "queue"))

    def watch(self, sub: Subscription, job_id: str) -> None:
        """Push a ``queue`` event into ``sub`` whenever positions may have changed."""
        self._watchers[sub] = job_id

    def unwatch(self, sub: Subscription) -> None:
        self._watchers.pop(sub, None)

    # --- queries -----------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Where every unfinished job stands, as of the last committed change (or later)."""
        version = self.version
        snap = self._snap
        if snap is not None and snap.version >= version:
            return snap
        now = self.reads.queue_snapshot_now()
        if now is not None:  # a cheap local read: no task, no wait
            return self._build(version, now)
        # Everyone woken by one change shares one read (a future, not a lock: a lock hands over
        # to its waiters one loop turn at a time, and a thousand waiters make a convoy).
        fut = self._refreshing.get(version)
        if fut is None:
            fut = asyncio.ensure_future(self._take(version))
            self._refreshing[version] = fut
            fut.add_done_callback(lambda _: self._refreshing.pop(version, None))
        return await asyncio.shield(fut)

    async def _take(self, version: int) -> Snapshot:
        return self._build(version, await self.reads.queue_snapshot())

    def _build(self, version: int, rows: list[Any]) -> Snapshot:
        fresh = Snapshot(
            version,
            time.monotonic(),
            waiting={s: 0 for s in STAGES},
            running={s: 0 for s in STAGES},
        )
        for job_id, stage, state, pos in rows:
            if state == State.PENDING:
                fresh.positions[job_id] = pos
                fresh.waiting[stage] += 1
            else:
                fresh.running[stage] += 1
        if self._snap is None or self._snap.version <= version:
            self._snap = fresh
        return fresh

    async def counts(self) -> Counts:
        """Jobs waiting and running per stage, as of the last committed change (or later)."""
        version = self.version
        snap, have = self._snap, self._counts
        if snap is not None and snap.version >= version:
            return Counts(snap.version, snap.waiting, snap.running)
        if have is not None and have.version >= version:
            return have
        fut = self._counting.get(version)
        if fut is None:
            fut = asyncio.ensure_future(self._count(version))
            self._counting[version] = fut
            fut.add_done_callback(lambda _: self._counting.pop(version, None))
        return await asyncio.shield(fut)

    async def _count(self, version: int) -> Counts:
        raw = await self.store.counts()
        fresh = Counts(
            version,
            waiting={s: raw.get(s, {}).get("waiting", 0) for s in STAGES},
            running={s: raw.get(s, {}).get("running", 0) for s in STAGES},
        )
        if self._counts is None or self._counts.version <= version:
            self._counts = fresh
        return fresh

    async def info(self) -> QueueInfo:
        """Queue sizes for /queue-info and stream events."""
        s = await self.counts()
        return QueueInfo(
            preprocess_queue_size=s.waiting[Stage.PREPROCESS],
            generation_queue_size=s.waiting[Stage.GENERATE],
            postprocess_queue_size=s.waiting[Stage.POSTPROCESS],
            preprocess_in_flight=s.running[Stage.PREPROCESS],
            generation_in_flight=s.running[Stage.GENERATE],
            postprocess_in_flight=s.running[Stage.POSTPROCESS],
            unfinished=sum(s.waiting.values()) + sum(s.running.values()),
            max_queue_size=self.max_queue_size,
        )

    async def position(self, job: Job) -> QueuePosition | None:
        """The job's place in its stage, with an ETA; None once it has finished.

        From the shared ranking when it is current (streams keep it so), else from one indexed
        count of the jobs ahead of this one: a lone GET /result never ranks the whole queue."""
        if job.state not in (State.PENDING, State.RUNNING):
            return None
        snap = self._snap
        if snap is not None and snap.version >= self.version:
            return await self.place(job.id, job.state, job.stage, job.kind, job.stage_entered_at)
        c = await self.counts()
        if job.state == State.PENDING:
            pos, size = await self.store.position(job)
        else:
            pos, size = 0, c.waiting[job.stage]
        eta = await self.estimate(
            job.state, job.stage, job.kind, job.stage_entered_at, pos, c.running[job.stage]
        )
        return QueuePosition(QUEUE_NAMES[job.stage], pos, size, eta)

    async def place(
        self,
        job_id: str,
        state: State,
        stage: Stage,
        kind: str,
        entered_at: str,
        order: tuple[int, str] | None = None,
    ) -> QueuePosition | None:
        """Like :meth:`position`, from what a stream already knows (no job read).

        ``order`` (the job's priority and created_at) lets a waiting job be placed by one
        indexed count instead of a ranking of the whole queue, which is cheaper while few
        streams wait (a ranking is shared by every stream woken by one change; the counts are
        not). A running job needs only the counts."""
        if state not in (State.PENDING, State.RUNNING):
            return None
        snap, version = self._snap, self.version
        if snap is None or snap.version < version:
            if state == State.RUNNING:
                c = await self.counts()
                eta = await self.estimate(state, stage, kind, entered_at, 0, c.running[stage])
                return QueuePosition(QUEUE_NAMES[stage], 0, c.waiting[stage], eta)
            if order is not None and len(self._watchers) <= RANK_FROM_WATCHERS:
                now = self.reads.queue_snapshot_now()
                if now is None:  # a long queue (or a shared store): count, don't rank
                    return await self._counted(job_id, stage, kind, entered_at, order)
                snap = self._build(version, now)
        s = snap if snap is not None and snap.version >= version else await self.snapshot()
        pos = s.positions.get(job_id, 0) if state == State.PENDING else 0
        size = s.waiting[stage]
        if state == State.PENDING and pos == 0:
            # Committed after the snapshot: it is at the back, and the queue holds it too.
            size += 1
            pos = size
        eta = await self.estimate(state, stage, kind, entered_at, pos, s.running[stage])
        return QueuePosition(QUEUE_NAMES[stage], pos, size, eta)

    async def _counted(
        self, job_id: str, stage: Stage, kind: str, entered_at: str, order: tuple[int, str]
    ) -> QueuePosition:
        """A waiting job's place by one indexed count of the jobs ahead of it."""
        c = await self.counts()
        priority, created_at = order
        ref = Job({"id": job_id, "stage": stage, "priority": priority, "created_at": created_at})
        pos, size = await self.store.position(ref)
        eta = await self.estimate(State.PENDING, stage, kind, entered_at, pos, c.running[stage])
        return QueuePosition(QUEUE_NAMES[stage], pos, size, eta)

    async def estimate(
        self, state: State, stage: Stage, kind: str, entered_at: str, pos: int, running: int
    ) -> float | None:
        """Seconds until the job should be finished, or None with no measurements yet."""
        means = await self.durations.means(kind)
        if means is None:
            return None
        rest = sum(means[s] for s in STAGES[STAGES.index(stage) + 1 :])
        own = means[stage]
        if state == State.RUNNING:
            spent = max(0.0, float(self.store.clock.now()) - parse_iso(entered_at))
            return round(max(0.0, own - spent) + rest, 1)
        slots = max(1, int(self.pipeline.health().get(stage, {}).get("workers", 1)))
        # Jobs ahead plus those running must pass through ``slots`` workers before this one starts.
        ahead = max(0, pos - 1 + running - slots + 1)
        return round(ahead * own / slots + own + rest, 1)
