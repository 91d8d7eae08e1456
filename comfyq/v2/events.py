"""``GET /api/v2/jobs/{id}/events``: the v2 live stream, fed by comfyq's own event bus.

On connect: the current ``status`` (with the queue position), the latest ``progress`` and the
latest ``preview``. Then ``status`` whenever the v2 status or the queue position changes,
``progress`` snapshots at most every ``PROGRESS_GAP`` seconds (the newest one is never lost: it
goes out when the gap has passed), ``preview`` at most every ``PREVIEW_GAP``, one ``output`` per
output once they are committed, and the terminal ``status`` (carrying the whole job) last. A status
is terminal only when the store says so. No ComfyUI websocket per stream; no ids, no replay (the
contract's choice: the job itself is the resumable truth).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import logging
from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.sse import HEADERS
from comfyq.events import GAP
from comfyq.store.base import StoreUnavailable
from comfyq.store.model import Job, State
from comfyq.v2 import mapping
from comfyq.v2.context import V2, get_v2, owner_of
from comfyq.v2.errors import V2Error, not_found
from comfyq.v2.progress import Live

log = logging.getLogger("comfyq.v2")

PROGRESS_GAP = 0.5  # about 2 snapshots a second
PREVIEW_GAP = 1.0
_encode = msgspec.json.Encoder().encode


def frame(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


class _Stream:
    """One client's view of one job: what it was last sent."""

    def __init__(self, v2: V2, request: web.Request, job: Job) -> None:
        self.v2 = v2
        self.request = request
        self.job = job
        self.read_at = job.updated_at  # bus events up to this commit are in the row already
        self.sent_status: tuple[str, int | None] | None = None
        self.progress_seq = -1
        self.progress_at = -1e9
        self.preview: bytes | None = None
        self.preview_at = -1e9

    async def status(self, *, force: bool = False) -> bytes:
        st = mapping.status(self.job)
        pos = await self.v2.queue_position(self.job) if st == "queued" else None
        key = (st, pos)
        if key == self.sent_status and not force:
            return b""
        self.sent_status = key
        return frame("status", {"status": st, "queue_position": pos})

    def progress(self, now: float) -> bytes:
        live = self.v2.tracker.live(self.job.id)
        if live is None or live.seq == self.progress_seq:
            return b""
        if now - self.progress_at < PROGRESS_GAP:
            return b""
        snap = mapping.progress(self.job, live, mapping.status(self.job))
        if snap is None:
            return b""
        self.progress_seq, self.progress_at = live.seq, now
        return frame("progress", snap)

    def pending_progress(self) -> bool:
        live = self.v2.tracker.live(self.job.id)
        return live is not None and live.seq != self.progress_seq

    def preview_frame(self, live: Live | None, now: float) -> bytes:
        if live is None or live.preview is None or live.preview[1] is self.preview:
            return b""
        if now - self.preview_at < PREVIEW_GAP:
            return b""
        mime, data, node = live.preview
        self.preview, self.preview_at = data, now
        return frame(
            "preview",
            {
                "node_id": node,
                "content_type": mime,
                "data_base64": base64.b64encode(data).decode("ascii"),
            },
        )

    async def final(self) -> bytes:
        """The outputs, then the terminal status carrying the whole job (the bytes a poll of the
        job answers, built once for both)."""
        data, outputs = await self.v2.answer(self.request, self.job)
        if outputs is None:
            outputs = msgspec.json.decode(data)["outputs"]
        out = [frame("output", o) for o in outputs]
        out.append(b"event: status\ndata: " + data + b"\n\n")
        return b"".join(out)


class _Nodes(msgspec.Struct):
    workflow: dict[str, msgspec.Raw] | None = None


class _Input(msgspec.Struct):
    workflow_json: dict[str, msgspec.Raw] | None = None


class _V2Part(msgspec.Struct):
    metadata: str | None = None


class _Payload(msgspec.Struct):
    input: _Input | None = None
    v2: _V2Part | None = None


def ended(full: Job) -> Job | None:
    """The job as a v2 read gives it (``v2_metadata``, ``nodes_total``), made from the whole row
    its final state change committed (the final bus event carries it): no read. None when the
    row's documents are not in the shape this knows (the caller reads the job instead)."""
    try:
        prepared = full.view("prepared", _Nodes)
        payload = full.view("payload", _Payload) or _Payload()
    except (msgspec.ValidationError, msgspec.DecodeError, AttributeError):
        return None
    if prepared is not None:
        nodes = prepared.workflow
    else:
        nodes = payload.input.workflow_json if payload.input is not None else None
    job = copy.copy(full)
    job._decoded = {}
    extra = {
        "v2_metadata": payload.v2.metadata if payload.v2 is not None else None,
        "nodes_total": len(nodes) if nodes is not None else 0,
    }
    object.__setattr__(job, "_extra", extra)  # the columns a v2 read adds (Job.__getattr__)
    return job


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/v2/jobs/{id}/events"""
    v2 = get_v2(request)
    api = v2.api
    owner = owner_of(request)
    cap = v2.settings.v2_streams_per_key
    if v2.streams[owner] >= cap:
        raise V2Error(
            429,
            "too_many_streams",
            f"{cap} event streams are open for this key; close one,"
            " or poll GET /api/v2/jobs/{id}",
            headers={"Retry-After": "1"},
        )
    job_id = request.match_info["id"]
    v2.streams[owner] += 1
    sub = api.bus.subscribe(job_id, maxsize=api.options.stream_buffer)
    try:
        job = await v2.read_job(job_id, request)
        if job is None:
            raise not_found()
        s = _Stream(v2, request, job)
        resp = web.StreamResponse(status=200, headers=HEADERS)
        await resp.prepare(request)
        try:
            await _run(s, sub, resp)
        except (ConnectionError, RuntimeError):
            log.debug("v2 stream of job %s: client went away", job_id)  # the job goes on
        except StoreUnavailable as exc:  # headers sent, no 503 can follow: the stream ends
            log.warning("v2 stream of job %s ended, the database is away: %s", job_id, exc)
        return resp
    finally:
        api.queue.unwatch(sub)
        sub.close()
        v2.streams[owner] -= 1
        if v2.streams[owner] <= 0:
            del v2.streams[owner]


async def _run(s: _Stream, sub: Any, resp: web.StreamResponse) -> None:
    api = s.v2.api
    clock = asyncio.get_running_loop().time
    first = await s.status(force=True)
    if s.job.terminal:
        await resp.write_eof(await s.final())  # the stream's end in the same send
        return
    now = clock()
    # Frames other than the last are held up to ``stream_coalesce`` seconds and leave together
    # (as comfyq's own stream does): a short job's whole story goes out in one send instead of
    # one per frame (each send wakes the client and costs the server a syscall); the terminal
    # status never waits.
    coalesce = api.options.stream_coalesce
    out = [first + s.progress(now) + s.preview_frame(s.v2.tracker.live(s.job.id), now)]
    flush_at = now + coalesce
    if s.job.state == State.PENDING:
        api.queue.watch(sub, s.job.id)
    heartbeat = api.options.heartbeat
    quiet_since = now
    while True:
        now = clock()
        if out and not sub.buffered and now >= flush_at:
            await resp.write(b"".join(out))
            out.clear()
            quiet_since = now
        wait = heartbeat - (now - quiet_since)
        if out:
            wait = min(wait, flush_at - now)
        if s.pending_progress():
            wait = min(wait, max(0.0, s.progress_at + PROGRESS_GAP - now))
        # While holding, only the terminal change wakes the stream early; the rest wait their turn.
        ev = await sub.get(max(0.0, wait), urgent=bool(out))
        if ev is None and sub.stopping:  # the server stops: the client polls or reconnects
            await resp.write_eof(b"".join(out))
            return
        now = clock()
        got = b""
        if ev is None:
            got = s.progress(now)
            if not got and not out and now - quiet_since >= heartbeat:
                got = b": keepalive\n\n"
        elif ev.kind == "state" and ev.final:
            # The end: the whole job, with its outputs; the row it committed came with the event.
            fresh = ended(ev.job) if ev.job is not None else None
            if fresh is None or s.v2.expired(fresh):
                fresh = await s.v2.read_job(s.job.id)
            if fresh is None:
                if out:
                    await resp.write(b"".join(out))
                return  # pruned under us: nothing more will happen
            s.job = fresh
            await resp.write_eof(b"".join(out) + await s.final())
            return
        elif ev.kind == "state":
            if ev.data["at"] <= s.read_at:
                continue  # committed before the job was read: already in what was sent
            # A committed transition carries what the status needs (state and stage): no read.
            s.job.state, s.job.stage = ev.data["state"], ev.data["stage"]
            if s.job.state == State.PENDING:
                api.queue.watch(sub, s.job.id)
            else:
                api.queue.unwatch(sub)
            got = await s.status()
        elif ev.kind == GAP:  # another instance's state changes may have been missed: look
            fresh = await s.v2.read_job(s.job.id)
            if fresh is None:
                if out:
                    await resp.write(b"".join(out))
                return
            s.job, s.read_at = fresh, fresh.updated_at
            if fresh.terminal:
                await resp.write_eof(b"".join(out) + await s.final())
                return
            got = await s.status()
        elif ev.kind == "queue":
            got = await s.status()
        elif ev.kind == "preview":
            got = s.preview_frame(s.v2.tracker.live(s.job.id), now)
        else:
            got = s.progress(now)
        if got:
            if not out:
                flush_at = now + coalesce
            out.append(got)
