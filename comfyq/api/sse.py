"""Server-sent events: ``POST /generate/stream`` and ``GET /jobs/{id}/events``.

The subscription is opened before anything is read, so nothing that commits meanwhile is lost:
stored state changes after Last-Event-ID are replayed first, then live events follow, with state
events already replayed skipped by row id. A comment heartbeat goes out whenever nothing else was
sent for ``heartbeat`` seconds. A client going away ends only its stream, never its job. When the
server stops, the stream ends (what it held is sent first); the client resumes with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from comfyq.api.auth import visible
from comfyq.api.context import Api, get_api
from comfyq.api.stream import JobFeed, row_of
from comfyq.errors import NotFound
from comfyq.events import GAP, Subscription, flush_time
from comfyq.schemas import StreamEvent, encoder
from comfyq.store.base import StoreUnavailable
from comfyq.store.model import TERMINAL, State

log = logging.getLogger("comfyq.api")

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}
HEARTBEAT = b": ping\n\n"


class EventStream(web.StreamResponse):
    """A stream response whose headers leave with its first bytes (one send, not two)."""

    _send_headers_immediately = False  # aiohttp's own switch (web.Response sets it so too)


def frame(se: StreamEvent) -> bytes:
    """One SSE event: ``id:`` then a single ``data:`` line of JSON."""
    return b"id: " + (se.id or "").encode() + b"\ndata: " + encoder.encode(se) + b"\n\n"


def last_event_id(request: web.Request) -> int | None:
    """Where a client resumes: the Last-Event-ID header, or ``?last_event_id=`` (plain clients)."""
    return row_of(request.headers.get("Last-Event-ID") or request.query.get("last_event_id"))


async def stream_job(
    request: web.Request,
    job_id: str,
    *,
    after: int | None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Stream one job's events to the client until its final_result."""
    api = get_api(request)
    sub = api.bus.subscribe(job_id, maxsize=api.options.stream_buffer)
    try:
        async with api.stream_setup:
            job = await api.reads.head(job_id)
            if job is None or not visible(request, job.owner):
                raise NotFound(f"job {job_id} not found", details={"job_id": job_id})
            feed = JobFeed(api, job)
            del job
            first, done = await feed.replay(after or 0)
        if done and after and len(first) == 1 and (row_of(first[0].id) or 0) <= after:
            # The client already has the final event: 204 tells an EventSource to stop reconnecting.
            return web.Response(status=204)
        resp = EventStream(status=status, headers={**HEADERS, **(headers or {})})
        await resp.prepare(request)
        try:
            head = b"retry: 3000\n\n" + b"".join(frame(se) for se in first)
            del first
            if done:
                await resp.write_eof(head)  # the stream's end in the same send
            else:
                await _live(api, feed, sub, resp, head)
        except (ConnectionError, RuntimeError):
            log.debug("stream of job %s: client went away", job_id)  # the job goes on
        except StoreUnavailable as exc:
            # Its headers are sent: no 503 can follow them. The stream ends, and the client
            # resumes with Last-Event-ID (here or on another instance) when the database is back.
            log.warning("stream of job %s ended, the database is away: %s", job_id, exc.message)
        return resp
    finally:
        api.queue.unwatch(sub)
        sub.close()


def _backlog(sub: Subscription) -> int:
    # Events already buffered: those are framed now and sent with this one in a single write
    # (one syscall and one wake-up of the client instead of one per event; the bytes are the same).
    return sub.buffered


async def _live(
    api: Api, feed: JobFeed, sub: Subscription, resp: web.StreamResponse, head: bytes
) -> None:
    if feed.state == State.PENDING:
        api.queue.watch(sub, feed.job_id)
    loop = asyncio.get_running_loop()
    # Events other than the last are held up to ``stream_coalesce`` seconds and leave together:
    # a short job's whole story goes out in one send (with the response's headers) instead of
    # one per event (each send wakes the client and costs the server a syscall); the final
    # event never waits. The replayed head is held the same way.
    # Waits end at a deadline on the loop's clock (registered once per deadline, not once per
    # wait, with the bus's one timer): the held output's flush time (``flush_time``, on a grid
    # shared by every stream), else the heartbeat's. The heartbeat is due ``heartbeat`` seconds
    # after the last send (``quiet_at``), but its timer (``beat_at``) moves only when it rings:
    # a send does not re-arm it.
    heartbeat = api.options.heartbeat
    coalesce = api.options.stream_coalesce
    out: list[bytes] = [head]
    flush_at = flush_time(loop.time(), coalesce)
    held_at: float | None = None  # the flush time the subscription held the next events for
    quiet_at = beat_at = loop.time() + heartbeat
    while True:
        deadline = beat_at
        if out:
            deadline = flush_at
            if not _backlog(sub) and flush_at <= loop.time():
                await resp.write(b"".join(out))
                out.clear()
                deadline = beat_at
                quiet_at = loop.time() + heartbeat
        # While holding, only the final event wakes the stream early; the rest wait their turn.
        # Holding nothing, the first event to come is held by the subscription itself until
        # its flush time, not woken for (one wake-up per flush, not two).
        ev = await sub.get(urgent=bool(out), deadline=deadline, hold=None if out else coalesce)
        if sub.held_until is not None:
            held_at = sub.held_until
        if ev is None:
            if sub.stopping:  # the server stops: the client resumes with Last-Event-ID
                await resp.write_eof(b"".join(out))
                return
            held_at = None
            if out:
                continue  # time to send what is held (or an earlier timer rang: look again)
            now = loop.time()
            if now < beat_at:
                continue  # an earlier timer (a flush's) rang, not the heartbeat's
            if now < quiet_at:
                beat_at = quiet_at  # something was sent since: the heartbeat is due later
                continue
            if api.bus.transport is not None and await _caught_up(api, feed, resp):
                return
            await resp.write(HEARTBEAT)
            quiet_at = beat_at = loop.time() + heartbeat
            continue
        if ev.kind == GAP:  # the link may have missed state changes: read them from the table
            if out:
                await resp.write(b"".join(out))
                out.clear()
            if await _caught_up(api, feed, resp):
                return
            quiet_at = loop.time() + heartbeat
            continue
        if feed.is_final(ev):
            out.append(frame(await feed.final(row_of(ev.id), ev.job)))
            await resp.write_eof(b"".join(out))  # the stream's end in the same send
            return
        se = await feed.queue_moved() if ev.kind == "queue" else feed.from_bus(ev)
        if se is None:
            continue
        if se.event == "state":
            await feed.decorate(se)
            if feed.state == State.PENDING:
                api.queue.watch(sub, feed.job_id)
            else:
                api.queue.unwatch(sub)
        if not out:
            flush_at = held_at if held_at is not None else flush_time(loop.time(), coalesce)
            held_at = None
        out.append(frame(se))


async def _caught_up(api: Api, feed: JobFeed, resp: web.StreamResponse) -> bool:
    """Several instances: state changes reach this one by NOTIFY, which a lost connection can
    miss; a stream looks at the table when the link says it lost its connection (a ``gap``
    event) and when quiet, once per heartbeat. True when the job has ended."""
    for row in await api.reads.events(feed.job_id, feed.last_row):
        if row["to_state"] in TERMINAL:
            await resp.write_eof(frame(await feed.final(row["id"])))
            return True
        await resp.write(frame(feed.from_row(row)))
    return False


async def job_events(request: web.Request) -> web.StreamResponse:
    """GET /jobs/{id}/events"""
    return await stream_job(request, request.match_info["id"], after=last_event_id(request))
