"""Live progress of running jobs as the Comfy API v2 counts it, followed on comfyq's event bus.

The generate stage publishes ComfyUI's node and sampler-step events (and previews) on the bus; this
tracker folds them per job into what a v2 ``Progress`` snapshot needs: nodes done, the node now
running with its class, its step and steps, and keeps the latest preview. It is one bus subscriber
that does its work inside ``push`` (no task, no buffer), so by the time any stream reads a job's
snapshot, the event that woke the stream is already counted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from comfyq.events import ALL, Event, EventBus, Subscription
from comfyq.store.model import State

MOVES = 8192  # jobs whose state changes are counted (the oldest forgotten: their polls read)


@dataclass
class Live:
    """What is known of one running job's execution."""

    done: set[str] = field(default_factory=set)
    current: str | None = None
    current_class: str | None = None
    step: int | None = None
    steps: int | None = None
    preview: tuple[str, bytes, str] | None = None  # (mime, bytes, node id)
    seq: int = 0  # bumps on every change: streams send a snapshot only when it moved


class Tracker(Subscription):
    """Per-job v2 progress, updated synchronously from the bus."""

    def __init__(self, bus: EventBus, ended: dict[str, Any] | None = None) -> None:
        super().__init__(bus, set(), 1)
        self.jobs: dict[str, Live] = {}
        self.ended = ended if ended is not None else {}  # per-job entries dropped at the job's end
        # A number per job that moves with every state change this process hears of (its own,
        # and other instances' through the bus): a poll answer built before it moved is stale
        # (one built after may still be: the job's row says, comfyq.v2.context.V2.reuse).
        self.moves: dict[str, int] = {}
        self._move = itertools.count(1)
        self.add(ALL)

    def version(self, job_id: str) -> tuple[int, int]:
        """(state changes heard of, live progress seq) of a job, to compare with a later one."""
        live = self.jobs.get(job_id)
        return self.moves.get(job_id, 0), -1 if live is None else live.seq

    def push(self, ev: Event) -> None:
        kind = ev.kind
        if kind == "state":
            self.moves[ev.job_id] = next(self._move)
            if len(self.moves) > MOVES:
                del self.moves[next(iter(self.moves))]
        if kind == "state":
            if ev.final or ev.data.get("state") == State.PENDING:
                self.jobs.pop(ev.job_id, None)  # a retry starts its count again
            if ev.final:
                self.ended.pop(ev.job_id, None)
            return
        if kind not in ("progress", "preview", "execution_start", "execution_cached"):
            return
        live = self.jobs.get(ev.job_id)
        if live is None:
            live = self.jobs[ev.job_id] = Live()
        live.seq += 1
        data = ev.data
        if kind == "progress":
            node = data.get("node")
            if node is None:
                return
            node = str(node)
            if node != live.current:
                if live.current is not None:
                    live.done.add(live.current)
                live.current = node
                live.current_class = _text(data.get("node_type"))
                live.step = live.steps = None
            most = data.get("max")
            if isinstance(most, int | float) and most > 1:
                live.step, live.steps = int(data.get("value") or 0), int(most)
        elif kind == "execution_cached":
            live.done.update(str(n) for n in data.get("nodes") or ())
        elif kind == "execution_start":
            live.done.clear()
            live.current = live.current_class = None
            live.step = live.steps = None
        elif ev.payload is not None:  # preview
            live.preview = (
                str(data.get("mime") or "image/jpeg"),
                ev.payload,
                str(data.get("node") or ""),
            )

    def live(self, job_id: str) -> Live | None:
        return self.jobs.get(job_id)


def _text(v: Any) -> str | None:
    return None if v is None else str(v)
