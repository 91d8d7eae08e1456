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
        v2 = self.v2
        outputs = (await v2.assets.job_outputs([self.job.id])).get(self.job.id, [])
        body = await v2.body(self.request, self.job, outputs)
        out = [frame("output", o) for o in body["outputs"]]
        out.append(frame("status", body))
        return b"".join(out)


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
        await resp.write(await s.final())
        return
    now = clock()
    first += s.progress(now) + s.preview_frame(s.v2.tracker.live(s.job.id), now)
    await resp.write(first)
    if s.job.state == State.PENDING:
        api.queue.watch(sub, s.job.id)
    heartbeat = api.options.heartbeat
    quiet_since = clock()
    while True:
        wait = heartbeat - (clock() - quiet_since)
        if s.pending_progress():
            wait = min(wait, max(0.0, s.progress_at + PROGRESS_GAP - clock()))
        ev = await sub.get(max(0.0, wait))
        now = clock()
        out = b""
        if ev is None:
            out = s.progress(now)
            if not out and now - quiet_since >= heartbeat:
                out = b": keepalive\n\n"
        elif ev.kind == "state" and ev.final:
            fresh = await s.v2.read_job(s.job.id)  # the end: the whole job, with its outputs
            if fresh is None:
                return  # pruned under us: nothing more will happen
            s.job = fresh
            await resp.write(await s.final())
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
            out = await s.status()
        elif ev.kind == GAP:  # another instance's state changes may have been missed: look
            fresh = await s.v2.read_job(s.job.id)
            if fresh is None:
                return
            s.job, s.read_at = fresh, fresh.updated_at
            if fresh.terminal:
                await resp.write(await s.final())
                return
            out = await s.status()
        elif ev.kind == "queue":
            out = await s.status()
        elif ev.kind == "preview":
            out = s.preview_frame(s.v2.tracker.live(s.job.id), now)
        else:
            out = s.progress(now)
        if out:
            await resp.write(out)
            quiet_since = now
