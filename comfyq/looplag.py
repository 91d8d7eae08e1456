"""Event-loop lag: how late a timer that should fire every ``interval`` seconds actually fires.

While one piece of work holds the loop (a large body decoded, a long walk over a workflow), every
other request waits; the lag is that wait, measured from inside. ``/metrics`` exports it as a
histogram (``comfyq_event_loop_lag_seconds``) and its maximum since start
(``comfyq_event_loop_lag_max_seconds``) and over the last ~10 s
(``comfyq_event_loop_lag_recent_max_seconds``); the hostile-input tests and ``bench_hostile``
read them.
"""

from __future__ import annotations

import asyncio
import contextlib
from array import array

from prometheus_client import CollectorRegistry, Gauge, Histogram

# Fine around the 50 ms target (issue 19), so that a burst's p99 and max can be read from the
# difference of two scrapes.
RECENT = 1_000  # samples in the recent maximum (about 10 s)
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1)
BUCKETS += (0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopLag:
    """A task that sleeps ``interval`` seconds at a time and records how much later it woke."""

    def __init__(self, registry: CollectorRegistry | None = None, interval: float = 0.01) -> None:
        self.interval = interval
        self.max = 0.0
        # A ring of doubles, not a deque of floats: a float object per sample, each living ~10 s,
        # would be sprinkled through the memory a burst of large bodies allocates and keep it
        # from being returned afterwards.
        self.recent = array("d", bytes(8 * RECENT))
        self._at = 0
        self._task: asyncio.Task[None] | None = None
        self._hist: Histogram | None = None
        self._gauge: Gauge | None = None
        if registry is not None:
            self._hist = Histogram(
                "comfyq_event_loop_lag_seconds",
                "How late the event loop ran a timer (sampled every 10 ms)",
                buckets=BUCKETS,
                registry=registry,
            )
            self._gauge = Gauge(
                "comfyq_event_loop_lag_max_seconds",
                "Largest event-loop lag since the server started",
                registry=registry,
            )
            Gauge(
                "comfyq_event_loop_lag_recent_max_seconds",
                "Largest event-loop lag of the last 1,000 samples (about 10 s)",
                registry=registry,
            ).set_function(self.recent_max)

    def recent_max(self) -> float:
        return max(self.recent)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def record(self, lag: float) -> None:
        lag = max(lag, 0.0)
        self.recent[self._at] = lag
        self._at = (self._at + 1) % RECENT
        if lag > self.max:
            self.max = lag
            if self._gauge is not None:
                self._gauge.set(lag)
        if self._hist is not None:
            self._hist.observe(lag)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.record(loop.time() - due)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
