"""The in-memory event bus: job events fanned out to every subscriber (SSE, websockets, sync waits).

State changes arrive from the store after they commit and carry their ``job_events`` row id, so a
client can resume with Last-Event-ID from the table. Progress and previews live only here. Each
subscriber has a bounded buffer: when it is full, progress and previews for it are dropped (and
counted), never state changes and never the final event, and a slow subscriber never delays the
publisher or anyone else.

Several instances on one database: a store adapter that serves more than one instance provides a
``Transport`` (SQLite needs none). The bus sends its live events through it and takes the other
instances' live events from it (``receive``); their committed state changes reach the bus like
local ones, through ``on_transitions``, after the adapter has read them from the shared table.
Preview images stay on the instance whose ComfyUI produced them. When the transport may have
missed some (its connection was lost and made again), ``gap`` sends every subscriber a ``gap``
event: it reads its jobs' stored events after the last one it saw.

When the server stops, ``stop_streams`` wakes every waiting reader and ``get`` answers None at once
from then on (``Subscription.stopping`` says why): a stream ends its response (a client resumes
with Last-Event-ID after the restart), where it would otherwise hold the shutdown until aiohttp's
timeout.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from comfyq.store.model import TERMINAL, State, Transition

ALL = "*"
GAP = "gap"  # the kind of the event that tells subscribers state changes may have been missed


@dataclass(slots=True)
class Event:
    """One thing that happened to one job."""

    job_id: str
    id: str  # SSE id: "<event row id>" for state changes, "<last row id>.<n>" for live events
    kind: str  # "state" | "progress" | "preview" | "text" | "gap"
    data: dict[str, Any] = field(default_factory=dict)
    final: bool = False
    payload: bytes | None = None  # preview image bytes
    # A final state change made here: the job as it committed (its Result needs no job read).
    job: Any = None

    @property
    def droppable(self) -> bool:
        return self.kind != "state" and self.kind != GAP


def flush_time(now: float, coalesce: float) -> float:
    """When output held from ``now`` leaves: on a grid of ``coalesce / 2`` seconds shared by
    every stream, between ``coalesce / 2`` and ``coalesce`` from now (never later). Streams
    holding output at once flush from one wake-up of the loop (the bus's one timer rings every
    subscription waiting for the same deadline), not from one timer and wake-up each."""
    if coalesce <= 0:
        return now
    step = coalesce / 2
    return min(math.floor((now + coalesce) / step) * step, now + coalesce)


class Transport(Protocol):
    """Carries live events to the other instances that share the store."""

    def send_live(self, job_id: str, kind: str, event_id: str, data: dict[str, Any]) -> None:
        """Queue one live event for the other instances; never blocks, may coalesce progress."""
        ...


class Subscription:
    """A subscriber's buffer; iterate it, or ``await get()``."""

    def __init__(
        self, bus: EventBus, keys: set[str], maxsize: int, *, finals_only: bool = False
    ) -> None:
        self._bus = bus
        self.finals_only = finals_only  # a waiter for the end only (sync): nothing else is kept
        self.keys = keys
        self._maxsize = maxsize
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._urgent_only = False
        # ``get(hold=...)``: the first event to arrive is held, not woken for, until the flush
        # time it sets (``held_until``); then the reader takes it with those that came since.
        self._hold: float | None = None
        self.held_until: float | None = None
        # The deadlines of ``get(deadline=...)`` this subscription waits for, each kept until it
        # rings: a reader that waits for several events until one deadline (or goes back and
        # forth between two deadlines) registers it once, not once per wait. They ring from the
        # bus's one timer (``Alarms``), shared by every subscription that has the same deadline.
        self._alarms: set[float] = set()
        self.dropped = 0
        self.closed = False
        bus._open.add(self)

    def push(self, ev: Event) -> None:
        if self.closed or (self.finals_only and not ev.final):
            return
        if len(self._items) >= self._maxsize and ev.droppable:
            self.dropped += 1
            return
        self._items.append(ev)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if not ev.final and len(self._items) < self._maxsize // 2:
                if self._urgent_only:
                    return  # the reader holds what it has until its timeout; this can wait too
                if self._hold is not None and self._held(waiter.get_loop(), self._hold):
                    return
            waiter.set_result(None)

    def _held(self, loop: asyncio.AbstractEventLoop, hold: float) -> bool:
        """The first event of a ``get(hold=...)`` wait: hold it (and those after it) until its
        flush time, unless that is now; the reader is woken then, once for them all."""
        self._hold = None
        now = loop.time()
        at = self.held_until = flush_time(now, hold)
        if at <= now:
            return False
        self._urgent_only = True
        if at not in self._alarms:
            self._alarms.add(at)
            self._bus.alarms.add(loop, at, self)
        return True

    @property
    def buffered(self) -> int:
        """Events buffered and not yet taken."""
        return len(self._items)

    async def get(
        self,
        timeout: float | None = None,
        *,
        urgent: bool = False,
        deadline: float | None = None,
        hold: float | None = None,
        also: asyncio.Future[Any] | None = None,
    ) -> Event | None:
        """The next event, or None when ``timeout`` passes first (or, given ``deadline`` instead,
        when the loop's clock reaches it; then also possibly earlier, when an earlier deadline of
        this subscription rings: the caller looks at its clock). ``urgent``: only a job's final
        event (or a buffer half full) ends the wait early; the others are returned after
        ``timeout``, all at once (a reader that holds its output wakes once, not per event).
        ``hold`` (seconds, with ``deadline``): the first event to arrive does not end the wait
        at once; it ends at that event's ``flush_time(now, hold)``, which ``held_until`` then
        gives (None when the wait did not end so), with every event that came meanwhile (a
        final one, or a buffer half full, still ends it at once). ``also``: a future (a socket's
        read) whose end ends the wait too (None then, unless events came): one waiter for two
        things, where ``asyncio.wait`` on a task of this ``get`` cost a task and four loop
        callbacks per event."""
        self.held_until = None
        if not self._items and self._bus.stopping:
            return None
        # A bare future and a timer handle: asyncio.wait_for would wrap every wait in a task of
        # its own, and a stream waits once per event.
        if not self._items:
            loop = asyncio.get_running_loop()
            timer = None
            if deadline is not None:
                if deadline <= loop.time():
                    return None
                if deadline not in self._alarms:
                    self._alarms.add(deadline)
                    self._bus.alarms.add(loop, deadline, self)
                timeout = deadline  # the wait ends at the first wake-up, as with a timeout
            waiter = self._waiter = loop.create_future()
            self._urgent_only = urgent and timeout is not None
            self._hold = hold if deadline is not None and not self._urgent_only else None
            if timeout is not None and deadline is None:
                timer = loop.call_later(timeout, _expire, waiter)
            if also is not None:
                if also.done():
                    self._waiter = None
                    self._urgent_only = False
                    self._hold = None
                    if timer is not None:
                        timer.cancel()
                    return None
                also.add_done_callback(self._poke)
            try:
                while not self._items:
                    await waiter
                    if timeout is not None or self._items or self._bus.stopping:
                        break
                    if also is not None and also.done():
                        break
                    waiter = self._waiter = loop.create_future()
            finally:
                self._waiter = None
                self._urgent_only = False
                self._hold = None
                if timer is not None:
                    timer.cancel()
                if also is not None:
                    also.remove_done_callback(self._poke)
            if not self._items:
                return None
        return self._items.popleft()

    @property
    def stopping(self) -> bool:
        """The server is stopping: ``get`` no longer waits (None once the buffer is empty)."""
        return self._bus.stopping

    def add(self, key: str) -> None:
        """Also receive events of job ``key`` (or every job, with ``"*"``)."""
        if key not in self.keys:
            self.keys.add(key)
            self._bus._subs.setdefault(key, set()).add(self)

    def _poke(self, _: object = None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _ring(self, deadline: float) -> None:
        # Whichever deadline rang, a waiting reader wakes (None: it looks at its clock).
        self._alarms.discard(deadline)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        for deadline in self._alarms:
            self._bus.alarms.discard(deadline, self)
        self._alarms.clear()
        self._items.clear()
        self._bus._unsubscribe(self)
        self._bus._open.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.get()
            if ev is not None:
                yield ev
            elif self.stopping:
                return


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Alarms:
    """The deadlines of every subscription's ``get(deadline=...)`` under one loop timer, armed
    for the earliest: subscriptions waiting for the same deadline (a stream's flush, placed on a
    shared grid by comfyq.api.sse) ring together, from one wake-up of the loop, and a deadline
    that nobody waits for any more (its stream ended) costs neither a timer nor a wake-up."""

    def __init__(self) -> None:
        self._heap: list[float] = []  # deadlines, some maybe no longer in ``_due``
        self._due: dict[float, list[Subscription]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._at = float("inf")  # what ``_timer`` is armed for
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop ``_timer`` is on

    def pending(self) -> int:
        """Deadlines some subscription still waits for."""
        return len(self._due)

    def add(self, loop: asyncio.AbstractEventLoop, deadline: float, sub: Subscription) -> None:
        if loop is not self._loop:  # a bus used from another loop (tests): start afresh there
            self._loop, self._timer, self._at = loop, None, float("inf")
        subs = self._due.get(deadline)
        if subs is not None:
            subs.append(sub)
            return
        self._due[deadline] = [sub]
        heap = self._heap
        if len(heap) > 64 + 2 * len(self._due):  # drop deadlines nobody waits for any more
            heap[:] = [d for d in heap if d in self._due]
            heapq.heapify(heap)
        heapq.heappush(heap, deadline)
        if deadline < self._at:
            self._arm(loop, deadline)

    def discard(self, deadline: float, sub: Subscription) -> None:
        subs = self._due.get(deadline)
        if subs is None:
            return
        try:
            subs.remove(sub)
        except ValueError:
            return
        if not subs:
            del self._due[deadline]
            if deadline == self._at:  # nobody waits for the armed one: arm for the next
                self._next(asyncio.get_running_loop())

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = deadline
        self._timer = loop.call_at(deadline, self._fire, loop)

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        heap, due = self._heap, self._due
        while heap and heap[0] not in due:
            heapq.heappop(heap)
        if heap:
            if heap[0] != self._at or self._timer is None:
                self._arm(loop, heap[0])
        else:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._at = float("inf")

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._at = float("inf")
        heap, due = self._heap, self._due
        now = loop.time()
        while heap and heap[0] <= now:
            deadline = heapq.heappop(heap)
            for sub in due.pop(deadline, ()):
                sub._ring(deadline)
        self._next(loop)


class EventBus:
    """Publish job events; subscribe to some jobs or to all of them."""

    def __init__(self, buffer: int = 256) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        self._open: set[Subscription] = set()  # every subscription not closed, keys or none
        self.alarms = Alarms()
        self._buffer = buffer
        self._last_row: dict[str, int] = {}
        self._seq = itertools.count(1)
        self.progress: dict[str, dict[str, Any]] = {}  # latest live progress of running jobs
        self.published = 0
        self.transport: Transport | None = None
        self.received = 0  # live events that came from other instances
        self._ended: OrderedDict[str, None] = (
            OrderedDict()
        )  # recently ended jobs (with a transport)
        self.stopping = False  # the server is stopping: readers no longer wait (stop_streams)

    def subscribe(
        self, *keys: str, maxsize: int | None = None, finals_only: bool = False
    ) -> Subscription:
        sub = Subscription(self, set(), maxsize or self._buffer, finals_only=finals_only)
        for key in keys:
            sub.add(key)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        for key in sub.keys:
            subs = self._subs.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[key]

    def stop_streams(self) -> None:
        """The server is stopping: every waiting reader wakes, and no ``get`` waits any more."""
        self.stopping = True
        for sub in list(self._open):
            sub._poke()

    def subscribers(self) -> int:
        return len({s for subs in self._subs.values() for s in subs})

    def publish(self, ev: Event) -> None:
        self.published += 1
        for key in (ev.job_id, ALL):
            for sub in self._subs.get(key, ()):
                sub.push(ev)

    def on_transitions(self, transitions: list[Transition]) -> None:
        """Store listener: publish committed state changes."""
        subs = self._subs
        for tr in transitions:
            self._last_row[tr.job_id] = tr.event_id
            final = tr.to_state in TERMINAL
            if final or tr.to_state == State.PENDING:
                self.progress.pop(tr.job_id, None)
            if final:
                self._last_row.pop(tr.job_id, None)
                if self.transport is not None:
                    self._ended[tr.job_id] = None
                    if len(self._ended) > 4096:
                        self._ended.popitem(last=False)
            if tr.job_id not in subs and ALL not in subs:
                self.published += 1  # nobody listens: the event is not even built
                continue
            self.publish(
                Event(
                    tr.job_id,
                    str(tr.event_id),
                    "state",
                    {
                        "from_state": tr.from_state,
                        "state": tr.to_state,
                        "stage": tr.stage,
                        "status": tr.status,
                        "message": tr.message,
                        "attempt": tr.attempt,
                        "at": tr.at,
                        **({"details": tr.data} if tr.data else {}),
                    },
                    final=final,
                    job=tr.job if final else None,
                )
            )

    def live(
        self, job_id: str, kind: str, data: dict[str, Any], payload: bytes | None = None
    ) -> None:
        """Publish a live (not stored) event: progress, preview, text."""
        if kind == "progress":
            self.progress[job_id] = data
        seq = next(self._seq)
        row = self._last_row.get(job_id, 0)
        if self.transport is not None and payload is None:
            # Subscribers elsewhere are not known here: every live event goes out (the transport
            # coalesces progress); previews (image bytes) stay on this instance.
            self.transport.send_live(job_id, kind, f"{row}.{seq}", data)
        if job_id not in self._subs and ALL not in self._subs:
            self.published += 1
            return
        self.publish(Event(job_id, f"{row}.{seq}", kind, data, payload=payload))

    def gap(self) -> None:
        """The other instances' state changes may have been missed for a while (the transport
        lost its connection): every subscriber gets one ``gap`` event and reads its jobs' event
        rows after the last one it has seen, so that none is missed."""
        for sub in {s for subs in self._subs.values() for s in subs}:
            sub.push(Event("", "", GAP))

    def receive(self, job_id: str, kind: str, event_id: str, data: dict[str, Any]) -> None:
        """A live event of another instance (its id already made there), for local subscribers."""
        self.received += 1
        row = row_of(event_id)
        if row is None:
            return
        if row < self._last_row.get(job_id, 0):
            return  # from before a state change already published here
        if job_id in self._ended:
            return  # a late progress tick of a job that has ended meanwhile
        if kind == "progress":
            self.progress[job_id] = data
        if job_id not in self._subs and ALL not in self._subs:
            return
        self.publish(Event(job_id, event_id, kind, data))


def row_of(event_id: str) -> int | None:
    """The events-table row a live event id ``"<row>.<n>"`` refers to; None if unreadable."""
    head = event_id.split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) < 19 else None
