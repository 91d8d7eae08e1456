"""Websocket side of the simulator: sockets by clientId, routing, feature flags, binary frames."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import WSMsgType, web

SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4


def text_frame(node_id: str, text: str) -> bytes:
    """Binary TEXT frame: [u32 3][u32 len(node_id)][node_id][text]."""
    nid = node_id.encode()
    return struct.pack(">II", TEXT, len(nid)) + nid + text.encode()


def preview_frame(png: bytes) -> bytes:
    """Legacy PREVIEW_IMAGE frame: [u32 1][u32 2=PNG][png]."""
    return struct.pack(">II", PREVIEW_IMAGE, 2) + png


def preview_meta_frame(png: bytes, metadata: dict[str, Any]) -> bytes:
    """PREVIEW_IMAGE_WITH_METADATA frame: [u32 4][u32 json_len][json][png]."""
    meta = json.dumps({**metadata, "image_type": "image/png"}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + png


class _Coalescing:
    """Stands in for a websocket's transport: frames written in one turn of the event loop leave
    in one socket send. ComfyUI sends a burst of small messages per node (executing, progress,
    progress_state, executed...); one send per frame was most of the simulator's CPU per job.
    Byte order is kept, and nothing waits: what is written goes out before the next turn."""

    _DIRECT = 64 << 10  # big frames (previews) go straight through, after what is buffered

    def __init__(self, inner: asyncio.BaseTransport) -> None:
        self.inner: Any = inner
        self.buf: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= self._DIRECT or (len(data) and data[0] == 0x88):  # big, or close
            self.flush()
            self.inner.write(data)
            return
        if not self.buf:
            self.loop.call_soon(self.flush)
        self.buf.append(bytes(data))

    def flush(self) -> None:
        if self.buf:
            data = b"".join(self.buf)
            self.buf.clear()
            if not self.inner.is_closing():
                self.inner.write(data)

    def is_closing(self) -> bool:
        return bool(self.inner.is_closing())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Stalling(Protocol):
    """The fault switch the hub reads: while stall_ws is true no message reaches anyone."""

    stall_ws: bool


class Hub:
    """Connected sockets keyed by sid, with ComfyUI's routing: sid None means everyone."""

    def __init__(self, faults: Stalling, features: dict[str, Any] | None = None) -> None:
        self.features = dict(SERVER_FEATURES if features is None else features)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self._faults = faults  # its stall_ws drops every message (read on each send)
        # Every open socket, including ones replaced by a reconnect under the same clientId.
        self._open: dict[web.WebSocketResponse, web.Request] = {}
        # By id(): WebSocketResponse hashes in Python, a cost on every message.
        self._coalescing: dict[int, _Coalescing] = {}

    def supports_metadata(self, sid: str | None) -> bool:
        """Whether the socket negotiated binary preview frames with metadata."""
        if sid is None or sid not in self.flags:
            return False
        return bool(self.flags[sid].get("feature_flags", {}).get("supports_preview_metadata"))

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        """Send one {"type","data"} message to sid, or to every socket when sid is None."""
        if self._faults.stall_ws:
            return
        if sid is None:
            if not self.sockets:
                return
            text = _dumps({"type": event, "data": data})
            frame = _text_frame(text)  # unmasked and uncompressed: the same bytes for everyone
            for ws in list(self.sockets.values()):
                await self._send_text(ws, text, frame)
        else:
            target = self.sockets.get(sid)
            if target is not None:
                text = _dumps({"type": event, "data": data})
                await self._send_text(target, text, _text_frame(text))

    async def send_encoded(self, text: str, sid: str | None = None) -> None:
        """Like send_json, for a message already encoded as JSON text (as json.dumps writes it)."""
        rest = self.post(text, sid)
        if rest is not None:
            await rest

    def post(self, text: str, sid: str | None = None) -> Awaitable[None] | None:
        """send_encoded without a coroutine in the common case: the frame goes straight into
        each target socket's coalescing buffer and None is returned. Otherwise it returns what
        is left to await (flow control, or a socket aiohttp must write itself); callers await
        it before their next message, so each socket still gets its frames in order."""
        if self._faults.stall_ws:
            return None
        if sid is not None:
            target = self.sockets.get(sid)
            if target is None:
                return None
            payload = text.encode()
            n = len(payload)
            frame = bytes((0x81, n)) + payload if n < 126 else _frame_of(payload)
            done = self._put(target, frame)
            if done is True:
                return None
            return self._finish([(target, done)], text)
        if not self.sockets:
            return None
        frame = _text_frame(text)  # unmasked and uncompressed: the same bytes for everyone
        left: list[tuple[web.WebSocketResponse, bool | None]] = []
        for ws in list(self.sockets.values()):
            done = self._put(ws, frame)
            if done is not True:
                left.append((ws, done))
        return self._finish(left, text) if left else None

    def _put(self, ws: web.WebSocketResponse, frame: bytes) -> bool | None:
        """Queue ``frame`` in ``ws``'s coalescing buffer, as aiohttp would write it (aiohttp's
        send_str costs several calls per frame). True: done; None: done, but the transport is
        paused and the sender must wait (aiohttp's writer's flow control); False: aiohttp must
        write it (no buffer, or compression negotiated). A closing socket drops it, like
        ComfyUI's send_socket_catch_exception."""
        buffered = self._coalescing.get(id(ws))
        writer = ws._writer
        if buffered is None or writer is None or writer.compress:
            return False
        if writer._closing:
            return True  # (a closed transport drops what is buffered at flush time)
        buf = buffered.buf
        if not buf:
            buffered.loop.call_soon(buffered.flush)
        buf.append(frame)
        return None if writer.protocol._paused else True

    async def _finish(
        self, left: list[tuple[web.WebSocketResponse, bool | None]], text: str
    ) -> None:
        for ws, done in left:
            if done is None:
                writer = ws._writer
                if writer is not None:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await writer.protocol._drain_helper()
            else:
                await _send(ws.send_str, text)

    async def _send_text(self, ws: web.WebSocketResponse, text: str, frame: bytes) -> None:
        done = self._put(ws, frame)
        if done is not True:
            await self._finish([(ws, done)], text)

    async def send_bytes(self, payload: bytes, sid: str | None = None) -> None:
        """Send a binary frame to sid, or to every socket when sid is None."""
        if self._faults.stall_ws:
            return
        if sid is None:
            for ws in list(self.sockets.values()):
                await _send(ws.send_bytes, payload)
        else:
            target = self.sockets.get(sid)
            if target is not None:
                await _send(target.send_bytes, payload)

    def abort_all(self) -> None:
        """Cut every websocket's TCP connection without a close frame."""
        for buffered in self._coalescing.values():
            buffered.flush()  # already "sent" when ComfyUI dies: the kernel had it
        for request in list(self._open.values()):
            transport = request.transport
            if transport is not None:
                transport.abort()
        self._open.clear()
        self._coalescing.clear()
        self.sockets.clear()
        self.flags.clear()

    async def close_all(self) -> None:
        """Graceful shutdown: send close frames."""
        for ws in list(self._open):
            await ws.close()

    async def handle(
        self, request: web.Request, on_connect: Callable[[str], Awaitable[None]]
    ) -> web.WebSocketResponse:
        """Serve one /ws connection until it closes."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        writer = ws._writer  # aiohttp writes each frame with one transport.write: coalesce them
        if writer is not None and writer.transport is not None:
            buffered = _Coalescing(writer.transport)
            setattr(writer, "transport", buffered)  # noqa: B010 - typed as asyncio.Transport
            self._coalescing[id(ws)] = buffered
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            # A reconnect replaces the old socket in the routing table but leaves it open.
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.flags[sid] = {"feature_flags": {}}
        self._open[ws] = request
        try:
            await on_connect(sid)
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(data, dict):
                    continue  # ComfyUI logs the error and keeps waiting for a first message
                if first and data.get("type") == "feature_flags":
                    if sid in self.flags:
                        self.flags[sid]["feature_flags"] = data.get("data", {})
                    await self.send_json("feature_flags", dict(self.features), sid)
                first = False
        finally:
            # Like ComfyUI this drops whatever socket is registered under sid now, even if a
            # newer connection with the same clientId replaced this one.
            self.sockets.pop(sid, None)
            self.flags.pop(sid, None)
            self._open.pop(ws, None)
            self._coalescing.pop(id(ws), None)
        return ws


def _make_dumps() -> Callable[[Any], str]:
    # One C encoder for every message (json.dumps builds a new one per call), with dumps'
    # defaults: same text, byte for byte.
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.dumps
    encode = make(
        None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii,
        None, ": ", ", ", False, False, True,
    )  # fmt: skip
    return lambda obj: "".join(encode(obj, 0))


_dumps = _make_dumps()
json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # "..." as dumps writes it


def json_num(x: Any) -> str:
    """A JSON number (or any value) exactly as json.dumps writes it. The floats progress messages
    carry most are spelled out: float.__repr__ is the dearest part of encoding them."""
    if type(x) is float:
        if x == 1.0:
            return "1.0"
        if x == 0.0 and math.copysign(1.0, x) > 0:  # -0.0 == 0.0 but is written "-0.0"
            return "0.0"
    return _dumps(x)


def _text_frame(text: str) -> bytes:
    """A server (unmasked, uncompressed) websocket TEXT frame carrying ``text``."""
    return _frame_of(text.encode())


def _frame_of(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack(">BB", 0x81, n) + payload
    if n < 65536:
        return struct.pack(">BBH", 0x81, 126, n) + payload
    return struct.pack(">BBQ", 0x81, 127, n) + payload


async def _send(fn: Callable[[Any], Awaitable[None]], payload: Any) -> None:
    # A socket that died mid-send is ComfyUI's "send_socket_catch_exception": ignored.
    try:
        await fn(payload)
    except (ConnectionError, RuntimeError):
        pass
