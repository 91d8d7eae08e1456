"""Queue positions and wait estimates, shared by every stream.

Counts (waiting and running jobs per stage: ``info`` for /queue-info, /health and every stream
event) are kept from the committed transitions the store reports to its listeners, on top of one
count read that says which changes it includes (the events table's high-water mark): a queue
change then costs no query. They are read again every ``recount_every`` seconds when asked (a
write by another process on the same file, the CLI's, shows within that time) and when a change
cannot be placed (a job left running by an earlier process moves on). A store shared by several
servers (PostgreSQL) cannot say which changes a count includes (their commits interleave): there
the counts are read again after each change, one read shared by everyone who asks.

A job's place, three ways:

- running: the counts alone;
- waiting, while every waiting job of its stage is known (their claim keys, priority then age
  then id, up to ``KEEP_WAITING`` per stage, kept from the transitions; jobs this process did not
  see enter their queue, after a restart or another process's write, are read once with the
  next count): in memory, one pass over the keys, or one ranking per change shared by every
  stream when many wait;
- waiting otherwise (PostgreSQL, a queue past ``KEEP_WAITING``): one indexed count of the jobs
  ahead of it while few streams wait, else one query that ranks every waiting job of every stage,
  reused until the next change (a thousand streams woken by one change cost one query).

At 10,000 waiting jobs a ranking query costs ~100 ms, an indexed count a few ms. Estimates come
from the measured stage durations of recently completed jobs of the same kind
(``comfyq.api.eta``).

Streams of waiting jobs are woken when the queue moves, coalesced: at most every
``min_interval`` seconds, and with many streams waiting at most ``FANOUT_PER_S`` wake-ups per
second in all (W streams: every W / FANOUT_PER_S seconds, up to ``MAX_INTERVAL``). Otherwise
every job that leaves the queue would move every one behind it, and n streams opened at once
would cost n x (n / jobs per second / interval) messages while they drain: n squared. While
every waiting job's claim key is known, one wake-up places every watched job at once (one ranking
per stage) and wakes only the streams whose job's place (stage, position, queue size) changed
since the last wake-up, or that were (re)watched since; those streams send what that wake-up
computed instead of each placing its job again. A place computed for an event is reused by the
other streams of the same job (a job followed by a thousand clients) while nothing changed.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from comfyq.api.eta import Durations
from comfyq.clock import parse_iso
from comfyq.events import Event, Subscription
from comfyq.schemas import QueueInfo, QueuePosition
from comfyq.store.model import STAGES, Job, Stage, State, Transition

# Up to this many waiting streams, each places its job by itself (a pass over the kept keys, or
# one indexed count); beyond, they share one ranking per change.
RANK_FROM_WATCHERS = 32
# Claim keys of waiting jobs kept per stage; past it the stage's jobs are placed by counts.
KEEP_WAITING = 20_000
MAX_SEEN = 100_000  # event ids kept for the audit of kept counts (comfyq.api.queue._audit)
RECOUNT_EVERY = 5.0  # seconds: kept counts are read again, when asked, after this long
# Queue-position wake-ups per second, all waiting streams together, that the coalescing aims at
# (up to 50 streams waiting: every min_interval; 200: every second, as often as the original
# wrapper polled; 2,000 and more: every MAX_INTERVAL seconds).
FANOUT_PER_S = 200.0
MAX_INTERVAL = 10.0  # seconds: the longest a waiting stream goes without hearing the queue moved
PLACE_TTL = 0.1  # seconds a job's computed place is reused (no change since) by its other streams

Key = tuple[int, str, str]  # (-priority, created_at, id): the claim order, smallest first
Change = tuple[bool, Stage, int]  # (waiting, not running; stage; +1 or -1)

QueueName = Literal["preprocessing", "generation", "postprocessing"]
QUEUE_NAMES: dict[Stage, QueueName] = {
    Stage.PREPROCESS: "preprocessing",
    Stage.GENERATE: "generation",
    Stage.POSTPROCESS: "postprocessing",
}


@dataclass
class Counts:
    """Waiting and running jobs per stage, at one moment (kept ones: as of now; read them before
    the next await)."""

    version: int
    waiting: dict[Stage, int]
    running: dict[Stage, int]


@dataclass
class Moved:
    """Where every watched waiting job stood at one wake-up (kept keys and counts): job id ->
    (stage, position, queue size, running in that stage); ``hw``: the highest event id the
    wake-up had seen; ``info``: the queue sizes then."""

    hw: int
    places: dict[str, tuple[Stage, int, int, int]]
    info: QueueInfo


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
        recount_every: float = RECOUNT_EVERY,
    ) -> None:
        self.store = store
        self.reads = reads
        self.pipeline = pipeline
        self.max_queue_size = max_queue_size
        self.min_interval = min_interval
        self.recount_every = recount_every
        self.version = 0
        self._snap: Snapshot | None = None
        self._refreshing: dict[int, asyncio.Future[Snapshot]] = {}
        self._counts: Counts | None = None
        self._counting: dict[int, asyncio.Future[Counts]] = {}
        # Kept counts (one server on its store): exact as of every transition with an event id
        # above ``_hw`` applied on top of a count that includes every one up to ``_hw``.
        self.keeps = not getattr(store, "shared", False)
        self._kept: Counts | None = None
        self._hw = 0
        self._checked = -math.inf  # monotonic time of the last count read
        self._stale = True  # a change could not be placed: read the counts again
        self._recounting: asyncio.Future[None] | None = None
        self._during: list[tuple[int, list[Change]]] | None = None  # changes while a read runs
        self._lost = False  # a change a running read may not include could not be placed
        # Event ids seen above ``_mark``: every id up to a count's high-water mark should be seen
        # (each commit here is reported); one that never shows was written by another process.
        self._seen: list[int] = []
        self._mark: int | None = None
        self._last_hw: tuple[int, float] | None = None  # (high-water mark, when) of the last read
        self.recounts = 0
        self._running: dict[str, Stage] = {}  # jobs seen claimed -> their stage
        self._keys: dict[Stage, dict[str, Key]] = {s: {} for s in STAGES}  # known waiting jobs
        self._ranked: dict[Stage, dict[str, int] | None] = dict.fromkeys(STAGES)
        # Key changes while the waiting jobs' keys are read: (event id, stage, job id, key|None).
        self._key_log: list[tuple[int, Stage, str, Key | None]] | None = None
        self.key_loads = 0
        self.durations = Durations(store, reads)
        self._watchers: dict[Subscription, str] = {}
        self._fresh: set[Subscription] = set()  # (re)watched since the last wake-up
        self._moved: Moved | None = None  # the last wake-up's places (None: each stream places)
        self._woke_at: dict[str, tuple[Stage, int, int]] = {}  # watched job -> its place then
        self._hw_seen = 0  # the highest event id among the reported transitions
        self._poke: asyncio.TimerHandle | None = None
        self._last_poke = 0.0
        # place(): computed places by their arguments, for the current version only.
        self._placed: dict[tuple[Any, ...], tuple[float, QueuePosition | None]] = {}
        self._placed_version = -1
        self._info: tuple[Counts, int, QueueInfo] | None = None  # info() of one counts version
        self._health: tuple[int, dict[str, Any]] | None = None  # the pipeline's, of one version
        store.listen(self.on_transitions)

    # --- change tracking ---------------------------------------------------------------------

    def on_transitions(self, trs: list[Transition]) -> None:
        """Store listener (and the cluster's, for other instances' changes): keep the counts;
        the queue moved, tell watching streams soon (coalesced)."""
        self.version += 1
        self._hw_seen = max([self._hw_seen, *(tr.event_id for tr in trs)])
        if self.keeps:
            self._keep(trs)
        if self._watchers and self._poke is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_poke + self.interval() - loop.time())
            self._poke = loop.call_later(delay, self._wake)

    def interval(self) -> float:
        """Seconds between two wake-ups of the waiting streams: ``min_interval``, longer when
        so many wait that they would get more than ``FANOUT_PER_S`` messages a second."""
        return max(self.min_interval, min(MAX_INTERVAL, len(self._watchers) / FANOUT_PER_S))

    def _keep(self, trs: list[Transition]) -> None:
        kept, during = self._kept, self._during
        for tr in trs:
            changes = self._move(tr)
            if kept is None:
                continue
            if changes is None:  # its stage before is unknown: read the counts again
                self._stale = True
                self._lost = during is not None
                continue
            if during is not None:
                during.append((tr.event_id, changes))
            if self._mark is not None and tr.event_id > self._mark:
                self._seen.append(tr.event_id)
                if len(self._seen) > MAX_SEEN:  # nobody asked for a long while: audit afresh
                    self._seen.clear()
                    self._mark = self._last_hw = None
                    for stage in STAGES:
                        self._keys[stage].clear()
                        self._ranked[stage] = None
            if tr.event_id > self._hw:
                for waiting, stage, d in changes:
                    n = (kept.waiting if waiting else kept.running)[stage] + d
                    (kept.waiting if waiting else kept.running)[stage] = n
                    if n < 0:
                        self._stale = True
        if kept is not None:
            kept.version = self.version

    def _move(self, tr: Transition) -> list[Change] | None:
        """What ``tr`` changes in the counts (None when its stage before is unknown); keeps the
        stage of running jobs and the claim keys of waiting ones."""
        job_id, stage, before, after = tr.job_id, tr.stage, tr.from_state, tr.to_state
        out: list[Change] = []
        unknown = False
        log = self._key_log
        if before == State.PENDING:  # claimed, cancelled or failed where it waited
            out.append((True, stage, -1))
            if self._keys[stage].pop(job_id, None) is not None:
                self._ranked[stage] = None
            if log is not None:
                log.append((tr.event_id, stage, job_id, None))
        elif before == State.RUNNING:
            was = self._running.pop(job_id, None)
            if was is None and (after != State.PENDING or stage == Stage.PREPROCESS):
                was = stage  # it ended where it ran; or it waits again in the first stage
            if was is None:
                unknown = True  # the next stage, or the same one again
            else:
                out.append((False, was, -1))
        if after == State.PENDING:
            out.append((True, stage, 1))
            job = tr.job
            priority = getattr(job, "priority", None)
            created_at = getattr(job, "created_at", None)
            keys = self._keys[stage]
            if priority is not None and created_at is not None and len(keys) < KEEP_WAITING:
                keys[job_id] = (-priority, created_at, job_id)
                self._ranked[stage] = None
                if log is not None:
                    log.append((tr.event_id, stage, job_id, keys[job_id]))
        elif after == State.RUNNING:
            out.append((False, stage, 1))
            self._running[job_id] = stage
        return None if unknown else out

    def _wake(self) -> None:
        self._poke = None
        self._last_poke = asyncio.get_running_loop().time()
        fresh, self._fresh = self._fresh, set()
        moved = self._moved = self._place_watched()
        if moved is None:  # each stream places its job itself
            self._woke_at = {}
            for sub, job_id in list(self._watchers.items()):
                sub.push(Event(job_id, "", "queue"))
            return
        before, now = self._woke_at, {}
        for sub, job_id in list(self._watchers.items()):
            place = moved.places.get(job_id)
            if place is None:
                continue  # no longer waiting: the stream hears it from the job's state change
            key = now[job_id] = place[:3]
            if sub in fresh or before.get(job_id) != key:
                sub.push(Event(job_id, "", "queue"))
        self._woke_at = now

    def _place_watched(self) -> Moved | None:
        """Every watched waiting job's place, from the kept keys (one ranking per stage); None
        when the keys of some stage are not all known (each stream then places its own job)."""
        kept = self._kept_now() if self.keeps else None
        if kept is None or any(len(self._keys[s]) != kept.waiting[s] for s in STAGES):
            return None
        places: dict[str, tuple[Stage, int, int, int]] = {}
        ranked: dict[Stage, dict[str, int]] = {}
        for job_id in set(self._watchers.values()):
            for stage in STAGES:
                if job_id in self._keys[stage]:
                    r = ranked.get(stage)
                    if r is None:
                        r = ranked[stage] = self._rank(stage)
                    places[job_id] = (stage, r[job_id], kept.waiting[stage], kept.running[stage])
                    break
        return Moved(self._hw_seen, places, self._info_of(kept))

    def _rank(self, stage: Stage) -> dict[str, int]:
        """1-based position of every known waiting job of ``stage`` (kept until its keys change)."""
        ranked = self._ranked[stage]
        if ranked is None:
            ordered = sorted(self._keys[stage].values())
            ranked = self._ranked[stage] = {k[2]: i for i, k in enumerate(ordered, 1)}
        return ranked

    def watch(self, sub: Subscription, job_id: str) -> None:
        """Push a ``queue`` event into ``sub`` whenever its job's place may have changed."""
        self._watchers[sub] = job_id
        self._fresh.add(sub)

    def unwatch(self, sub: Subscription) -> None:
        self._watchers.pop(sub, None)
        self._fresh.discard(sub)

    async def moved(
        self,
        job_id: str,
        stage: Stage,
        kind: str,
        entered_at: str,
        order: Any,
        after: int,
        sent: tuple[int, int] | None = None,
    ) -> tuple[QueuePosition, QueueInfo] | None:
        """A waiting job's place and the queue sizes for its stream's ``queue`` event: as the
        last wake-up placed it when it could, else computed now. ``after``: the last event row
        the stream has rendered; ``sent``: the (position, queue size) it last sent in this
        stage. None: nothing to send (the place is the one sent; or the job no longer waits
        there, as far as the wake-up knew; or the stream has already rendered a newer state of
        it than the wake-up saw, and the next wake-up wakes it again)."""
        moved = self._moved
        if moved is None:
            qp = await self.place(job_id, State.PENDING, stage, kind, entered_at, order)
            if qp is None or (qp.position, qp.queue_size) == sent:
                return None
            return qp, await self.info()
        if after > moved.hw:
            return None
        place = moved.places.get(job_id)
        if place is None or place[0] != stage or place[1:3] == sent:
            return None
        _, pos, size, running = place
        eta = await self.estimate(State.PENDING, stage, kind, entered_at, pos, running)
        return QueuePosition(QUEUE_NAMES[stage], pos, size, eta), moved.info

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

    def _kept_now(self) -> Counts | None:
        """The kept counts while they can be trusted without a read."""
        kept = self._kept
        if (
            kept is None
            or self._stale
            or time.monotonic() - self._checked >= self.recount_every
            or self._recounting is not None
        ):
            return None
        return kept

    async def counts(self) -> Counts:
        """Jobs waiting and running per stage, as of the last committed change (or later)."""
        if self.keeps:
            kept = self._kept_now()
            if kept is not None:
                return kept
            await self._recount()
            if self.keeps and self._kept is not None:
                return self._kept
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

    async def _recount(self) -> None:
        """Read the counts with the high-water mark they include; one read for every caller."""
        fut = self._recounting
        if fut is None:
            fut = self._recounting = asyncio.ensure_future(self._read_kept())

            def done(_: object) -> None:
                self._recounting = None

            fut.add_done_callback(done)
        await asyncio.shield(fut)

    async def _read_kept(self) -> None:
        self._during, self._lost = [], False
        try:
            raw, hw = await self.store.counts_at()
        finally:
            during, self._during = self._during or [], None
        if hw is None:  # the adapter cannot tell: count after each change instead
            self.keeps = False
            return
        fresh = Counts(
            self.version,
            waiting={s: raw.get(s, {}).get("waiting", 0) for s in STAGES},
            running={s: raw.get(s, {}).get("running", 0) for s in STAGES},
        )
        for event_id, changes in during:  # committed after the read: not in it
            if event_id > hw:
                for waiting, stage, d in changes:
                    (fresh.waiting if waiting else fresh.running)[stage] += d
        self._audit(hw)
        self._kept, self._hw = fresh, hw
        self._stale = self._lost
        self._checked = time.monotonic()
        self.recounts += 1
        unknown = any(len(self._keys[s]) < fresh.waiting[s] for s in STAGES)
        if unknown and sum(fresh.waiting.values()) <= KEEP_WAITING:
            await self._load_keys()

    async def _load_keys(self) -> None:
        """Waiting jobs this process has not seen enter their queue (they waited before it
        started, or another process queued them): read their claim keys once, so that their
        stages are placed from memory too."""
        log: list[tuple[int, Stage, str, Key | None]] = []
        self._key_log = log
        try:
            got = await self.store.waiting_at()
        finally:
            self._key_log = None
        if got is None:
            return
        rows, hw = got
        keys: dict[Stage, dict[str, Key]] = {s: {} for s in STAGES}
        for job_id, stage, priority, created_at in rows:
            keys[Stage(stage)][job_id] = (-priority, created_at, job_id)
        for event_id, stage, job_id, key in log:  # committed after the read: not in it
            if event_id > hw:
                if key is None:
                    keys[stage].pop(job_id, None)
                else:
                    keys[stage][job_id] = key
        self._keys = keys
        self._ranked = dict.fromkeys(STAGES)
        self.key_loads += 1

    def _audit(self, hw: int) -> None:
        """Every change up to the previous read's high-water mark (a second or more ago: its
        reports have all arrived) was seen here, or another process wrote the file (the CLI's
        cancel or retry) and the known claim keys are dropped (the counts were just read)."""
        now = time.monotonic()
        last = self._last_hw
        if self._mark is None:
            self._mark = hw  # everything up to here is in the counts just read
        elif last is not None and now - last[1] >= 1.0:
            upto = last[0]
            seen = [i for i in self._seen if self._mark < i <= upto]
            if len(seen) != upto - self._mark:
                for stage in STAGES:
                    self._keys[stage].clear()
                    self._ranked[stage] = None
            self._seen = [i for i in self._seen if i > upto]
            self._mark = upto
        if last is None or now - last[1] >= 1.0:
            self._last_hw = (hw, now)

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
        """Queue sizes for /queue-info and stream events (one object per counts version: do not
        change it)."""
        return self._info_of(await self.counts())

    def _info_of(self, s: Counts) -> QueueInfo:
        got = self._info
        if got is not None and got[0] is s and got[1] == s.version:
            return got[2]
        w, r = s.waiting, s.running
        info = QueueInfo(
            preprocess_queue_size=w[Stage.PREPROCESS],
            generation_queue_size=w[Stage.GENERATE],
            postprocess_queue_size=w[Stage.POSTPROCESS],
            preprocess_in_flight=r[Stage.PREPROCESS],
            generation_in_flight=r[Stage.GENERATE],
            postprocess_in_flight=r[Stage.POSTPROCESS],
            unfinished=sum(w.values()) + sum(r.values()),
            max_queue_size=self.max_queue_size,
        )
        self._info = (s, s.version, info)
        return info

    async def position(self, job: Job) -> QueuePosition | None:
        """The job's place in its stage, with an ETA; None once it has finished (GET /result:
        never a ranking of the whole queue for one job)."""
        return await self.place(
            job.id,
            job.state,
            job.stage,
            job.kind,
            job.stage_entered_at,
            (job.priority, job.created_at),
        )

    async def place(
        self,
        job_id: str,
        state: State,
        stage: Stage,
        kind: str,
        entered_at: str,
        order: tuple[int, str] | None = None,
    ) -> QueuePosition | None:
        """The job's place in its stage with an ETA, from what a stream knows (no job read);
        None once it has finished.

        ``order`` (the job's priority and created_at) lets a waiting job be placed by one
        indexed count when its stage's waiting jobs are not all known.

        The same question asked again (another stream of the same job) while nothing changed
        and within ``PLACE_TTL`` seconds gets the same answer, not computed again (do not
        change it)."""
        version = self.version
        if self._placed_version != version:
            self._placed.clear()
            self._placed_version = version
        key = (job_id, state, stage, kind, entered_at, order)
        now = time.monotonic()
        hit = self._placed.get(key)
        if hit is not None and now - hit[0] < PLACE_TTL:
            return hit[1]
        qp = await self._place(job_id, state, stage, kind, entered_at, order)
        if self.version == version:
            self._placed[key] = (now, qp)
        return qp

    async def _place(
        self,
        job_id: str,
        state: State,
        stage: Stage,
        kind: str,
        entered_at: str,
        order: tuple[int, str] | None,
    ) -> QueuePosition | None:
        if state == State.RUNNING:
            c = await self.counts()
            size, running = c.waiting[stage], c.running[stage]
            eta = await self.estimate(state, stage, kind, entered_at, 0, running)
            return QueuePosition(QUEUE_NAMES[stage], 0, size, eta)
        if state != State.PENDING:
            return None
        c = await self.counts()
        placed = self._kept_place(job_id, stage, order)
        if placed is not None:
            pos, size = placed
            running = c.running[stage]
        elif (
            order is not None
            and len(self._watchers) <= RANK_FROM_WATCHERS
            and (self._snap is None or self._snap.version < self.version)
        ):
            pos, size = await self._counted(job_id, stage, order)
            running = c.running[stage]
        else:
            s = await self.snapshot()
            pos, size, running = s.positions.get(job_id, 0), s.waiting[stage], s.running[stage]
            if pos == 0:
                # Committed after the snapshot: it is at the back, and the queue holds it too.
                size += 1
                pos = size
        eta = await self.estimate(state, stage, kind, entered_at, pos, running)
        return QueuePosition(QUEUE_NAMES[stage], pos, size, eta)

    def _kept_place(
        self, job_id: str, stage: Stage, order: tuple[int, str] | None = None
    ) -> tuple[int, int] | None:
        """(position, waiting) of a waiting job from the kept keys, when every waiting job of
        its stage is known; None otherwise. A job no longer among them (claimed since the
        event a stream is rendering) is placed by its ``order`` as the indexed count would."""
        kept = self._kept_now() if self.keeps else None
        if kept is None:
            return None
        keys = self._keys[stage]
        size = kept.waiting[stage]
        if len(keys) != size:
            if len(keys) > size:  # jobs that left unseen (another process): start again
                keys.clear()
                self._ranked[stage] = None
            return None
        mine = keys.get(job_id)
        if mine is None:
            if order is None:
                return None
            mine = (-order[0], order[1], job_id)
            return 1 + sum(1 for k in keys.values() if k < mine), size
        ranked = self._ranked[stage]
        if ranked is None and len(self._watchers) > RANK_FROM_WATCHERS:
            ranked = self._rank(stage)
        if ranked is not None:
            return ranked[job_id], size
        return 1 + sum(1 for k in keys.values() if k < mine), size

    async def _counted(self, job_id: str, stage: Stage, order: tuple[int, str]) -> tuple[int, int]:
        """(position, waiting) of a waiting job by one indexed count of the jobs ahead of it."""
        priority, created_at = order
        ref = Job({"id": job_id, "stage": stage, "priority": priority, "created_at": created_at})
        pos, size = await self.store.position(ref)
        return pos, size

    async def estimate(
        self, state: State, stage: Stage, kind: str, entered_at: str, pos: int, running: int
    ) -> float | None:
        """Seconds until the job should be finished, or None with no measurements yet."""
        d = self.durations
        means = d.means_now(kind) if d.loaded else await d.means(kind)
        if means is None:
            return None
        rest = sum(means[s] for s in STAGES[STAGES.index(stage) + 1 :])
        own = means[stage]
        if state == State.RUNNING:
            spent = max(0.0, float(self.store.clock.now()) - parse_iso(entered_at))
            return round(max(0.0, own - spent) + rest, 1)
        slots = self._slots(stage)
        # Jobs ahead plus those running must pass through ``slots`` workers before this one starts.
        ahead = max(0, pos - 1 + running - slots + 1)
        return round(ahead * own / slots + own + rest, 1)

    def _slots(self, stage: Stage) -> int:
        """Workers of ``stage`` (the pipeline's health, read once per version)."""
        got = self._health
        if got is None or got[0] != self.version:
            got = self._health = (self.version, self.pipeline.health())
        return max(1, int(got[1].get(stage, {}).get("workers", 1)))
