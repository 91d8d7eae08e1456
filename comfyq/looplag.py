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
from array import array
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Fine around the 50 ms target (issue 19), so that a burst's p99 and max can be read from the
# difference of two scrapes.
RECENT = 1_000  # samples in the recent maximum (about 10 s)
BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1)
BUCKETS += (0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class LoopLag:
    """A timer that fires every ``interval`` seconds and records how much later it ran."""

    def __init__(self, registry: CollectorRegistry | None = None, interval: float = 0.01) -> None:
        self.interval = interval
        self.max = 0.0
        # A ring of doubles, not a deque of floats: a float object per sample, each living ~10 s,
        # would be sprinkled through the memory a burst of large bodies allocates and keep it
        # from being returned afterwards.
        self.recent = array("d", bytes(8 * RECENT))
        self._at = 0
        self._timer: asyncio.TimerHandle | None = None
        # The histogram's counts, kept here as plain numbers and exported by a collector: a
        # prometheus Histogram takes a lock and walks its buckets on every one of the 100
        # samples a second (most of the probe's cost). Plain ints: no object per sample.
        self._counts = [0] * (len(BUCKETS) + 1)
        self._sum = 0.0
        self._gauge: Gauge | None = None
        if registry is not None:
            registry.register(_LagCollector(self))
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
        if self._timer is None:
            loop = asyncio.get_running_loop()
            due = loop.time() + self.interval
            self._timer = loop.call_at(due, self._tick, loop, due)

    async def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def record(self, lag: float) -> None:
        lag = max(lag, 0.0)
        self.recent[self._at] = lag
        self._at = (self._at + 1) % RECENT
        if lag > self.max:
            self.max = lag
            if self._gauge is not None:
                self._gauge.set(lag)
        self._counts[bisect_left(BUCKETS, lag)] += 1
        self._sum += lag

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        # A timer callback, not a task that sleeps: 100 wake-ups a second, each a plain call.
        now = loop.time()
        self.record(now - due)
        if self._timer is not None:
            nxt = now + self.interval
            self._timer = loop.call_at(nxt, self._tick, loop, nxt)


class _LagCollector(Collector):
    """``comfyq_event_loop_lag_seconds``: the probe's counts as a histogram (cumulative buckets,
    as prometheus_client's Histogram exports them)."""

    def __init__(self, lag: LoopLag) -> None:
        self.lag = lag

    def collect(self) -> Iterable[Metric]:
        bounds = [*BUCKETS, float("inf")]
        total, buckets = 0, []
        for bound, n in zip(bounds, list(self.lag._counts), strict=True):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        yield HistogramMetricFamily(
            "comfyq_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 10 ms)",
            buckets=buckets,
            sum_value=self.lag._sum,
        )


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
