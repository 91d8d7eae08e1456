"""One job's story as stream events, for SSE and websockets alike.

State events come from the ``job_events`` table (replay) or the bus (live) and carry the table's
row id, so a client that resumes with Last-Event-ID misses no state change. Live events (progress,
execution_start, ...) carry ``<row>.<n>``; they are not stored and are only sent live. The last
event of a job is ``final_result`` with its Result.
"""

from __future__ import annotations

import time
from typing import Any

from comfyq.api.context import Api
from comfyq.clock import iso, parse_iso
from comfyq.errors import NotFound
from comfyq.events import Event
from comfyq.result import progress_of
from comfyq.schemas import StreamEvent
from comfyq.store.model import TERMINAL, Job, Stage, State, status_of


def row_of(event_id: str | None) -> int | None:
    """The events-table row an SSE id refers to (``"12"`` or ``"12.7"``); None if unreadable."""
    if not event_id:
        return None
    head = event_id.strip().split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) < 19 else None


class JobFeed:
    """Renders one job's events; remembers its last state for the live events that follow."""

    def __init__(self, api: Api, job: Job) -> None:
        self.api = api
        self.job_id = job.id
        self.created = parse_iso(job.created_at)
        self.status = job.status
        self.message = job.message
        self.stage = job.stage
        self.state = job.state
        self.attempt = job.attempts
        self.kind = job.kind
        self.entered_at = job.stage_entered_at
        # Its place among the waiting jobs (the claim order), when the row read has the column.
        priority = getattr(job, "priority", None)
        self.order = None if priority is None else (priority, job.created_at)
        self.last_row = 0
        self.finished = False
        self._queue_key: tuple[Any, ...] | None = None

    def _elapsed(self, at: float | None = None) -> float:
        return round(max(0.0, (time.time() if at is None else at) - self.created), 1)

    def _state(
        self, row: int, to_state: str, stage: str, message: str, attempt: int, at: str
    ) -> StreamEvent:
        self.last_row = max(self.last_row, row)
        # A stored row holds text; a bus event the members (State(member) is the member).
        self.state, self.stage = State(to_state), Stage(stage)
        self.message, self.attempt, self.entered_at = message, attempt, at
        self.status = status_of(self.state, self.stage)
        return StreamEvent(
            request_id=self.job_id,
            status=self.status,
            event="state",
            message=message,
            elapsed_time=self._elapsed(parse_iso(at)),
            timestamp=at,
            id=str(row),
            stage=self.stage,
            attempt=attempt,
        )

    def from_row(self, row: dict[str, Any]) -> StreamEvent:
        """A stored ``job_events`` row as an event."""
        return self._state(
            row["id"], row["to_state"], row["stage"], row["message"], row["attempt"], row["at"]
        )

    def from_bus(self, ev: Event) -> StreamEvent | None:
        """A live bus event as a stream event; None when it should not be sent."""
        if ev.kind == "state":
            row = row_of(ev.id) or 0
            if row <= self.last_row:
                return None  # already sent from the table
            d = ev.data
            return self._state(
                row, d["state"], d["stage"], d.get("message", ""), d.get("attempt", 0), d["at"]
            )
        if ev.kind in ("preview", "queue"):
            return None
        row = row_of(ev.id) or 0
        if row < self.last_row or self.state in TERMINAL:
            return None  # progress from before a state change we already sent
        se = StreamEvent(
            request_id=self.job_id,
            status=self.status,
            event=ev.kind,
            message=self.message,
            elapsed_time=self._elapsed(),
            timestamp=iso(time.time()),
            id=ev.id,
        )
        if ev.kind == "progress":
            se.progress = progress_of(ev.data)
        else:
            se.data = ev.data
        return se

    def is_final(self, ev: Event) -> bool:
        return ev.kind == "state" and ev.final and (row_of(ev.id) or 0) > self.last_row

    async def _place(self) -> Any:
        return await self.api.queue.place(
            self.job_id, self.state, self.stage, self.kind, self.entered_at, self.order
        )

    async def decorate(self, se: StreamEvent) -> None:
        """Add queue position and sizes to an event about the current state of an unfinished job."""
        if self.state in TERMINAL:
            return
        se.queue_position = await self._place()
        se.queue_info = await self.api.queue.info()
        if se.queue_position is not None:
            qp = se.queue_position
            self._queue_key = (self.state, self.stage, qp.position, qp.queue_size)

    async def queue_moved(self) -> StreamEvent | None:
        """An event when the job's place in the queue changed since the last one sent."""
        if self.state != State.PENDING:
            return None
        last = self._queue_key
        got = await self.api.queue.moved(
            self.job_id,
            self.stage,
            self.kind,
            self.entered_at,
            self.order,
            self.last_row,
            last[2:] if last is not None and last[:2] == (self.state, self.stage) else None,
        )
        if got is None:
            return None
        qp, info = got
        self._queue_key = (self.state, self.stage, qp.position, qp.queue_size)
        return StreamEvent(
            request_id=self.job_id,
            status=self.status,
            event="queue",
            message=self.message,
            elapsed_time=self._elapsed(),
            timestamp=iso(time.time()),
            id=f"{self.last_row}.q",
            queue_position=qp,
            queue_info=info,
        )

    async def final(self, row: int | None = None, job: Job | None = None) -> StreamEvent:
        """The ``final_result`` event, with the job's Result (``job``: as its end committed it,
        carried by the final bus event; None: read)."""
        self.finished = True
        if row is not None:
            self.last_row = max(self.last_row, row)
        loaded = await self.api.results.shared(self.job_id, job)
        if loaded is None:
            raise NotFound(f"job {self.job_id} no longer exists")
        job, result = loaded
        return StreamEvent(
            request_id=self.job_id,
            status="final_result",
            event="final_result",
            message=job.message,
            elapsed_time=self._elapsed(parse_iso(job.finished_at or job.updated_at)),
            timestamp=job.finished_at or job.updated_at,
            id=str(self.last_row),
            result=result,
        )

    async def replay(self, after: int) -> tuple[list[StreamEvent], bool]:
        """Stored state changes after row ``after`` (then the final event if the job ended)."""
        self.last_row = after
        ended = self.state in TERMINAL  # as of the job read this feed was made from
        rows = await self.api.reads.events(self.job_id, after)
        out: list[StreamEvent] = []
        for row in rows:
            if row["to_state"] in TERMINAL:
                out.append(await self.final(row["id"]))
                return out, True
            out.append(self.from_row(row))
        if self.api.bus.transport is None and not ended:
            # One instance: every commit is announced on this loop after it is visible, and the
            # subscription (opened before the job was read) has any end that came after it.
            if out:
                await self.decorate(out[-1])
            return out, False
        # The job had ended (the client resumes after its end), or several instances: another
        # instance's end reaches this one by NOTIFY, which can be missed; look once more.
        job = await self.api.reads.head(self.job_id)
        if job is not None and job.terminal:
            # Ended between the two reads, or the client resumes after the end: look once more.
            for row in await self.api.reads.events(self.job_id, self.last_row):
                if row["to_state"] in TERMINAL:
                    out.append(await self.final(row["id"]))
                    return out, True
                out.append(self.from_row(row))
            out.append(await self.final())
            return out, True
        if out:
            await self.decorate(out[-1])
        return out, False
