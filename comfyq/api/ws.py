"""``GET /ws``: job events over a websocket.

The client sends ``{"subscribe": ["<id>", ...]}`` or ``{"subscribe": "*"}`` (as often as it likes;
subscriptions add up). For each named job it gets the current state at once (or its final_result
if it has ended), then the same events as SSE, as JSON text frames with an ``id`` field. ComfyUI's
live preview images arrive as binary frames: a 4-byte big-endian length N, N bytes of JSON
(``{"job_id", "node", "mime", "id"}``), then the image bytes. The server pings every
``ws_heartbeat`` seconds; one task per connection reads both the socket and the subscription, so
frames never interleave. On a shared store (several instances), the stored events of the jobs
followed are read again when the link says notifications may have been missed, and those of
jobs subscribed by name also when nothing came for a heartbeat, as SSE streams do. When the server
stops, the socket is closed with 1001 (going away); the client subscribes again after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from comfyq.api.auth import Principal, principal
from comfyq.api.context import Api, get_api
from comfyq.api.stream import JobFeed
from comfyq.events import GAP, Event, Subscription
from comfyq.schemas import ErrorBody, ErrorInfo, FieldError, StreamEvent, WsSubscribe, encoder
from comfyq.store.base import StoreUnavailable
from comfyq.store.model import TERMINAL

log = logging.getLogger("comfyq.api")
MAX_FEEDS = 10_000  # jobs followed at once by one "*" connection before old ones are forgotten
GOING_AWAY_WAIT = 0.1  # seconds a closing frame may take to go out when the server stops


def preview_frame(ev: Event) -> bytes:
    """A binary frame: length-prefixed JSON header naming the job, then the image."""
    head = encoder.encode(
        {
            "job_id": ev.job_id,
            "id": ev.id,
            "node": ev.data.get("node"),
            "mime": ev.data.get("mime") or "image/jpeg",
        }
    )
    return struct.pack(">I", len(head)) + head + (ev.payload or b"")


def _error(message: str, path: str = "$") -> bytes:
    return encoder.encode(
        ErrorBody(ErrorInfo("invalid_request", message, fields=[FieldError(path, message)]))
    )


class _Conn:
    def __init__(self, api: Api, ws: web.WebSocketResponse, who: Principal) -> None:
        self.api = api
        self.ws = ws
        self.who = who
        self.sub: Subscription = api.bus.subscribe(maxsize=api.options.stream_buffer)
        self.feeds: dict[str, JobFeed] = {}
        # Jobs of other clients seen on "*": remembered so that their events cost no read each.
        self.hidden: set[str] = set()

    async def on_text(self, text: str) -> None:
        try:
            msg = msgspec.json.decode(text, type=WsSubscribe)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            hint = 'send {"subscribe": ["<job id>", ...]} or {"subscribe": "*"}'
            await self.ws.send_str(_error(f"{hint}: {exc}").decode())
            return
        if msg.subscribe == "*":
            self.sub.add("*")
            return
        for job_id in msg.subscribe:
            await self._subscribe(job_id)

    async def _subscribe(self, job_id: str) -> None:
        self.sub.add(job_id)  # before the read: nothing committed in between is missed
        async with self.api.stream_setup:
            await self._snapshot(job_id)

    async def _snapshot(self, job_id: str) -> None:
        job = await self.api.reads.head(job_id)
        if job is None or not self.who.can_see(job.owner):
            body = ErrorBody(
                ErrorInfo("not_found", f"job {job_id} not found", details={"job_id": job_id})
            )
            await self.ws.send_str(encoder.encode(body).decode())
            return
        feed = JobFeed(self.api, job)
        self.feeds[job_id] = feed
        rows = await self.api.reads.events(job_id)
        if job.terminal:
            await self._send(await feed.final(rows[-1]["id"] if rows else None))
            return
        if rows:
            se = feed.from_row(rows[-1])  # the current state, not the whole history
            await feed.decorate(se)
            await self._send(se)

    async def _feed(self, job_id: str) -> JobFeed | None:
        feed = self.feeds.get(job_id)
        if feed is not None or (job_id not in self.sub.keys and "*" not in self.sub.keys):
            return feed
        if job_id in self.hidden:
            return None
        job = await self.api.reads.head(job_id)
        if job is None:
            return None
        if not self.who.can_see(job.owner):
            if len(self.hidden) >= MAX_FEEDS:
                self.hidden.clear()
            self.hidden.add(job_id)
            return None
        feed = JobFeed(self.api, job)
        if len(self.feeds) >= MAX_FEEDS:
            self.feeds.pop(next(iter(self.feeds)))
        self.feeds[job_id] = feed
        return feed

    async def catch_up(self, job_ids: list[str]) -> None:
        """Several instances: state changes reach this one by NOTIFY, which a lost connection can
        miss; the jobs' stored events after the last one sent are read and sent."""
        for job_id in job_ids:
            feed = self.feeds.get(job_id)
            if feed is None:
                continue
            rows = await self.api.reads.events(job_id, feed.last_row)
            if feed.last_row == 0:
                rows = rows[-1:]  # seen on "*" by its live events only: its state now, no history
            for row in rows:
                if row["to_state"] in TERMINAL:
                    await self._send(await feed.final(row["id"]))
                    self.feeds.pop(job_id, None)
                    break
                await self._send(feed.from_row(row))

    async def on_event(self, ev: Event) -> None:
        if ev.kind == GAP:  # the link lost its connection: every job followed is read again
            await self.catch_up(list(self.feeds))
            return
        if ev.kind == "preview":
            if self.who.is_admin or await self._feed(ev.job_id) is not None:
                await self.ws.send_bytes(preview_frame(ev))
            return
        feed = await self._feed(ev.job_id)
        if feed is None:
            return
        if feed.is_final(ev):
            await self._send(await feed.final(int(ev.id), ev.job))
            self.feeds.pop(ev.job_id, None)
            return
        se = feed.from_bus(ev)
        if se is None:
            return
        if se.event == "state":
            await feed.decorate(se)
        await self._send(se)

    async def _send(self, se: StreamEvent) -> None:
        await self.ws.send_str(encoder.encode(se).decode())

    async def run(self) -> None:
        # One waiter for both the client's messages and the subscription's events (``also``):
        # no task per event, and no ``asyncio.wait`` (a future and callbacks on both) per event.
        # On a shared store a quiet connection also reads, once per heartbeat, the jobs it was
        # asked for by name (not every job a "*" subscription has seen: those only on a gap).
        quiet = self.api.options.heartbeat if self.api.bus.transport is not None else None
        recv: asyncio.Task[Any] = asyncio.ensure_future(self.ws.receive())
        try:
            while True:
                if recv.done():
                    msg = recv.result()
                    if msg.type == WSMsgType.TEXT:
                        await self.on_text(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await self.ws.send_str(
                            _error("binary frames are not understood; send JSON text").decode()
                        )
                    else:  # close, closing, closed, error
                        return
                    recv = asyncio.ensure_future(self.ws.receive())
                ev = await self.sub.get(quiet, also=recv)
                if ev is not None:
                    await self.on_event(ev)
                elif self.sub.stopping:  # the server stops: closed with 1001 (going away)
                    return
                elif not recv.done():  # quiet for a heartbeat
                    await self.catch_up([j for j in self.feeds if j in self.sub.keys])
        finally:
            recv.cancel()
            await asyncio.gather(recv, return_exceptions=True)
            self.sub.close()


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """GET /ws"""
    api = get_api(request)
    ws = web.WebSocketResponse(
        heartbeat=api.options.ws_heartbeat, max_msg_size=1 << 20, protocols=("comfyq",)
    )
    await ws.prepare(request)
    try:
        await _Conn(api, ws, principal(request)).run()
        if api.bus.stopping:
            # aiohttp reads nothing more from a connection once the server shuts down: the
            # client's closing frame in reply would never be seen (a browser waits 2 s for the
            # socket to close, another client until aiohttp's 10 s). The frame is sent, the
            # socket closed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GOING_AWAY_WAIT):
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")
    except (ConnectionError, RuntimeError):
        log.debug("websocket client went away")
    except StoreUnavailable as exc:
        # The socket is open: no 503 can be sent. It is closed with 1013 (try again later);
        # the client subscribes again, here or on another instance, when the database is back.
        log.warning("websocket closed, the database is away: %s", exc.message)
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"database unavailable")
    return ws
