"""Measured stage durations, for wait estimates: the recent completed jobs of each kind (modifier
name or raw workflow) kept in memory, read from the store once and then fed by commits."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from comfyq.store.model import STAGE_MS, STAGES, Stage, State, Transition

MIN_SAMPLES = 3  # fewer jobs of a kind than this: estimate from all kinds


class Durations:
    """Mean seconds per stage over the last ``samples`` completed jobs, per kind and overall."""

    def __init__(self, store: Any, reads: Any, samples: int = 50) -> None:
        self.reads = reads
        self.samples = samples
        self._by_kind: dict[str, deque[dict[Stage, float]]] = {}
        self._all: deque[dict[Stage, float]] = deque(maxlen=samples)
        self._means: dict[str | None, dict[Stage, float] | None] = {}
        self._loading: asyncio.Future[None] | None = None
        self._loaded = False
        store.listen(self.on_transitions)

    def on_transitions(self, trs: list[Transition]) -> None:
        """Store listener: every job that completes is a new measurement."""
        if not self._loaded:
            return  # the first read will see it
        for tr in trs:
            if tr.to_state == State.COMPLETED and tr.job is not None:
                self._add(tr.job.kind, tr.job.timings)

    def _add(self, kind: str, timings: Any) -> None:
        if not isinstance(timings, dict):
            return
        sample = {
            stage: float(v) / 1000.0
            for stage, key in STAGE_MS.items()
            if isinstance(v := timings.get(key), int | float)
        }
        self._by_kind.setdefault(kind, deque(maxlen=self.samples)).append(sample)
        self._all.append(sample)
        self._means.pop(kind, None)
        self._means.pop(None, None)

    async def _load(self) -> None:
        rows = await self.reads.completed_timings(self.samples * 20)
        for kind, timings in reversed(rows):  # oldest first, so the deques keep the newest
            self._add(kind, timings)
        self._loaded = True

    async def means(self, kind: str | None) -> dict[Stage, float] | None:
        """Mean seconds per stage for ``kind`` (None: all kinds); None before any job completed."""
        if not self._loaded:
            fut = self._loading
            if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
                # A load that failed (the database was away) is tried again, not re-raised forever.
                self._loading = fut = asyncio.ensure_future(self._load())
            await asyncio.shield(fut)
        return self.means_now(kind)

    @property
    def loaded(self) -> bool:
        """The recent durations have been read: ``means_now`` answers."""
        return self._loaded

    def means_now(self, kind: str | None) -> dict[Stage, float] | None:
        """``means`` once ``loaded``, without a wait."""
        if kind in self._means:
            return self._means[kind]
        samples = self._by_kind.get(kind) if kind is not None else self._all
        if kind is not None and (samples is None or len(samples) < MIN_SAMPLES):
            samples = self._all
        result = None
        if samples:
            result = {}
            for stage in STAGES:
                vals = [s[stage] for s in samples if stage in s]
                result[stage] = sum(vals) / len(vals) if vals else 0.0
        self._means[kind] = result
        return result
