"""A failure after a response's head was sent (a started SSE stream, a websocket) is never answered
with a second response inside the first: the error handlers (comfyq's and the Comfy API v2's) raise
it on, aiohttp closes the connection, and the client sees a cut stream it can resume.

The server is comfyq's own app on its production runner, on loopback, with one extra route per
API surface whose handler starts a stream and then fails; the client is a raw socket, so that
what went over the wire is seen byte for byte (a second status line, a hung keep-alive).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.servers import settings_for

from comfyq.api.server import Runner
from comfyq.app import create_app
from comfyq.errors import BadRequest, NotFound
from comfyq.services import Services
from comfyq.sim import Simulator
from comfyq.store.base import StoreUnavailable

# Long enough for a loaded machine; a regression (an answer kept alive) waits this long, then fails.
READ_TIMEOUT = 15.0
BEFORE = b"data: before the failure\n\n"


def _failure(kind: str) -> BaseException:
    failures: dict[str, Callable[[], BaseException]] = {
        "comfyq": lambda: NotFound("job gone mid-stream"),
        "bad_request": lambda: BadRequest("a field went bad mid-stream"),
        "store": lambda: StoreUnavailable("the database went away"),
        "http": lambda: web.HTTPNotFound(),
        "redirect": lambda: web.HTTPFound("/elsewhere"),
        "bug": lambda: KeyError("a bug"),
        "connection": lambda: ConnectionResetError("a backend hung up"),
    }
    return failures[kind]()


KINDS = ["comfyq", "bad_request", "store", "http", "redirect", "bug", "connection"]


async def _stream_then_fail(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(BEFORE)
    raise _failure(request.match_info["kind"])


async def _fail_at_once(request: web.Request) -> web.StreamResponse:
    raise _failure(request.match_info["kind"])


async def _ws_then_fail(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str("before the failure")
    raise _failure(request.match_info["kind"])


@pytest.fixture
async def url(tmp_path: Path, simulator: Simulator) -> AsyncIterator[str]:
    settings = settings_for(tmp_path, simulator.url)
    app = create_app(Services(settings))
    for prefix in ("/api/v2/test", "/test"):  # the v2 guard's surface, and comfyq's own
        app.router.add_get(prefix + "/stream/{kind}", _stream_then_fail)
        app.router.add_get(prefix + "/ws/{kind}", _ws_then_fail)
        app.router.add_get(prefix + "/plain/{kind}", _fail_at_once)
    runner = Runner(app, settings, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def _raw_get(url: str, path: str) -> bytes:
    """Everything the server sends for one keep-alive GET, up to its closing the connection."""
    host, port = url.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {url}\r\nConnection: keep-alive\r\n\r\n".encode()
        )
        await writer.drain()
        chunks: list[bytes] = []

        async def read_to_eof() -> None:
            while chunk := await reader.read(65536):
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read_to_eof(), READ_TIMEOUT)
        except TimeoutError:
            got = b"".join(chunks)
            raise AssertionError(f"connection still open after the failure; got {got!r}") from None
        return b"".join(chunks)
    finally:
        writer.close()


@pytest.mark.parametrize("surface", ["/api/v2/test", "/test"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_failing_after_its_head_is_cut_not_answered_twice(
    url: str, surface: str, kind: str
) -> None:
    wire = await _raw_get(url, f"{surface}/stream/{kind}")
    assert wire.startswith(b"HTTP/1.1 200 "), wire[:200]
    assert wire.count(b"HTTP/1.1 ") == 1, wire  # no second status line inside the stream
    assert BEFORE in wire  # what was sent before the failure arrived
    assert b'"error"' not in wire  # no error envelope written into the stream
    # The chunked body is not terminated: the client can tell a cut stream from a finished one.
    assert b"Transfer-Encoding: chunked" in wire
    assert not wire.endswith(b"0\r\n\r\n"), wire[-60:]


@pytest.mark.parametrize("surface", ["/api/v2/test", "/test"])
@pytest.mark.parametrize("kind", ["comfyq", "http", "bug"])
async def test_an_sse_client_sees_a_cut_stream(url: str, surface: str, kind: str) -> None:
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://{url}{surface}/stream/{kind}") as r,
    ):
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


@pytest.mark.parametrize("surface", ["/api/v2/test", "/test"])
@pytest.mark.parametrize("kind", ["comfyq", "http", "redirect", "bug"])
async def test_a_websocket_failing_after_its_handshake_is_closed(
    url: str, surface: str, kind: str
) -> None:
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.ws_connect(f"http://{url}{surface}/ws/{kind}") as ws,
    ):
        first = await ws.receive(timeout=READ_TIMEOUT)
        assert first.type == aiohttp.WSMsgType.TEXT and first.data == "before the failure"
        # Then the connection ends; no HTTP answer is written into the websocket's bytes
        # (which the client would read as a protocol error frame).
        last = await ws.receive(timeout=READ_TIMEOUT)
        assert last.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), last


@pytest.mark.parametrize("surface", ["/api/v2/test", "/test"])
async def test_the_access_line_says_the_stream_was_cut(
    url: str, surface: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfyq.access")
    await _raw_get(url, f"{surface}/stream/http")
    lines = [r for r in caplog.records if r.name == "comfyq.access"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert getattr(lines[0], "error_type", None) == "stream_cut", lines[0].getMessage()
    assert "HTTPNotFound after the response's head" in lines[0].getMessage()


# Before its head is sent a failure is still answered, in the envelope of its surface.
ANSWERS = {
    "comfyq": (404, "not_found", "not_found"),
    "bad_request": (422, "invalid_request", "invalid_request"),
    "store": (503, "store_unavailable", "store_unavailable"),
    "http": (404, "not_found", "not_found"),
    "bug": (500, "upstream_error", "internal_error"),
    "connection": (500, "upstream_error", "internal_error"),
}


@pytest.mark.parametrize("surface", ["/api/v2/test", "/test"])
@pytest.mark.parametrize("kind", sorted(ANSWERS))
async def test_a_failure_before_the_head_is_answered_in_its_envelope(
    url: str, surface: str, kind: str
) -> None:
    timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://{url}{surface}/plain/{kind}") as r,
    ):
        status, v2_code, own_type = ANSWERS[kind]
        body = await r.json()
        if surface.startswith("/api/v2/"):
            assert (r.status, body["error"]["code"]) == (status, v2_code), body
        else:
            own_status = 400 if kind == "bad_request" else status  # v2 says 422, comfyq 400
            assert (r.status, body["error"]["type"]) == (own_status, own_type), body
