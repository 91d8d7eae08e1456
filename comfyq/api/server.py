"""The HTTP server's runner, with deadlines for slow clients.

aiohttp closes a connection that stays idle (``keepalive_timeout``), but a client that sends its
headers or its body a byte at a time holds a connection (and its buffers) for as long as it likes.
Here each connection gets two more deadlines:

- headers: from the first byte of a request until its headers are parsed, ``http_header_timeout``;
  past it the client gets ``408`` and the connection is closed;
- body: from the headers until the whole body is in, ``http_body_timeout`` (plus a second, so the
  handler that reads a JSON body answers its own 408 first); past it the connection is closed.

The idle keep-alive time is ``http_keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from comfyq.schemas import ErrorBody, ErrorInfo

log = logging.getLogger("comfyq.api")

_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
BODY_GRACE = 1.0  # seconds the protocol's body deadline waits after the handler's own


class MaskedFramesOnly:
    """Sits in front of aiohttp's websocket reader and refuses unmasked client frames.

    RFC 6455 5.1: a server must close the connection when a client frame is not masked; aiohttp
    reads it anyway. Only frame headers are looked at (payload bytes are skipped by count), so
    the cost is a few byte operations per frame."""

    def __init__(self, inner: Any, on_unmasked: Callable[[], None]) -> None:
        self._inner = inner
        self._on_unmasked = on_unmasked
        self._head = bytearray()
        self._skip = 0
        self._failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def feed_eof(self) -> None:
        self._inner.feed_eof()

    def feed_data(self, data: bytes | bytearray | memoryview) -> tuple[bool, bytes]:
        if self._failed:
            return False, b""
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            self._head.append(view[i])
            i += 1
            head = self._head
            if len(head) < 2:
                continue
            if not head[1] & 0x80:
                self._failed = True
                self._on_unmasked()
                return False, b""
            short = head[1] & 0x7F
            ext = 2 if short == 126 else 8 if short == 127 else 0
            if len(head) < 2 + ext + 4:
                continue
            self._skip = int.from_bytes(head[2 : 2 + ext], "big") if ext else short
            head.clear()
        result: tuple[bool, bytes] = self._inner.feed_data(data)
        return result


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a header deadline and a body deadline."""

    def __init__(
        self, manager: Server, *, header_timeout: float, body_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._deadline: asyncio.TimerHandle | None = None  # the body's
        # The headers' deadline: when the first bytes of the request whose headers are awaited
        # came (None: none awaited), and one timer, left armed across the requests of a
        # keep-alive connection (no timer made and cancelled per request): when it fires early
        # for a later request it is armed again for that request's own deadline.
        self._headers_since: float | None = None
        self._headers_timer: asyncio.TimerHandle | None = None

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if data and self._headers_since is None and not self._request_in_progress:
            # The first bytes of a request: its headers must be complete in time.
            self._headers_since = now = self._loop.time()
            if self._headers_timer is None:
                self._headers_timer = self._loop.call_at(
                    now + self._header_timeout, self._headers_due
                )
        super().data_received(data)

    def _headers_due(self) -> None:
        self._headers_timer = None
        since = self._headers_since
        if since is None:  # no request's headers awaited (they came in time)
            return
        due = since + self._header_timeout
        if self._loop.time() < due:  # a later request's: its own deadline
            self._headers_timer = self._loop.call_at(due, self._headers_due)
            return
        self._headers_since = None
        self._headers_late()

    def _peer(self) -> str:
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "?"

    def _headers_late(self) -> None:
        if self._request_in_progress or self.transport is None:
            return
        log.info(
            "closed a connection from %s: request headers not complete after %gs"
            " (setting http_header_timeout)",
            self._peer(),
            self._header_timeout,
        )
        self.transport.write(_408)
        self.force_close()

    def _body_late(self, request: BaseRequest) -> None:
        self._deadline = None
        if request.content.is_eof() or self.transport is None:
            return
        log.info(
            "closed a connection from %s: request body not complete after %gs"
            " (setting http_body_timeout)",
            self._peer(),
            self._body_timeout,
        )
        self.force_close()

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        if type(parser).__name__ == "WebSocketReader":
            parser = MaskedFramesOnly(parser, self._unmasked_frame)
        super().set_parser(parser, data_received_cb)

    def _unmasked_frame(self) -> None:
        log.info("closed a websocket from %s: unmasked client frame (RFC 6455 5.1)", self._peer())
        if self.transport is not None:
            self.transport.write(b"\x88\x02" + (1002).to_bytes(2, "big"))  # close: protocol error
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_deadline()
        self._headers_since = None
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        super().connection_lost(exc)

    def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # A plain function: a request whose body is in (most: a GET, or a small body that came
        # with its headers) is aiohttp's own coroutine, with no frame of ours around it.
        self._headers_since = None  # the headers are in
        if request.body_exists and not request.content.is_eof():
            return self._body_in_time(request, start_time, request_handler)
        return super()._handle_request(request, start_time, request_handler)

    async def _body_in_time(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        # Body bytes that came between the headers and this task's start are no new request's.
        self._headers_since = None
        self._deadline = self._loop.call_later(
            self._body_timeout + BODY_GRACE, self._body_late, request
        )
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._cancel_deadline()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (bad header, bad request line...):
        a client's doing, so one INFO line and a 4xx with the error envelope, no traceback."""
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        text = getattr(exc, "message", None) or message or "malformed HTTP request"
        text = " ".join(str(text).split())  # aiohttp's message spans lines (a caret under the byte)
        log.info("bad HTTP request from %s: %s", request.remote, text)
        body = ErrorBody(ErrorInfo("invalid_request", f"malformed HTTP request: {text}"[:500]))
        resp = web.Response(
            status=status, body=msgspec.json.encode(body), content_type="application/json"
        )
        resp.force_close()
        return resp


class GuardedServer(Server):
    """aiohttp's Server making :class:`GuardedHandler` connections."""

    header_timeout = 10.0
    body_timeout = 60.0

    def __call__(self) -> RequestHandler:
        return GuardedHandler(
            self,
            loop=self._loop,
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            **self._kwargs,
        )


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections have the slow-client deadlines of ``settings``."""

    def __init__(self, app: web.Application, settings: Any, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", settings.http_keepalive_timeout)
        super().__init__(app, **kwargs)
        self._header_timeout = float(settings.http_header_timeout)
        self._body_timeout = float(settings.http_body_timeout)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # The app builds a plain Server (with its request factory and handler); only the kind of
        # connection it makes changes, so the instance is turned into the subclass.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server.header_timeout = self._header_timeout
        server.body_timeout = self._body_timeout
        return server
