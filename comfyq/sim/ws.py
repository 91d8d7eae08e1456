"""Websocket side of the simulator: sockets by clientId, routing, feature flags, binary frames."""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

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


class Hub:
    """Connected sockets keyed by sid, with ComfyUI's routing: sid None means everyone."""

    def __init__(self, stalled: Callable[[], bool], features: dict[str, Any] | None = None) -> None:
        self.features = dict(SERVER_FEATURES if features is None else features)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.flags: dict[str, dict[str, Any]] = {}
        self._stalled = stalled
        # Every open socket, including ones replaced by a reconnect under the same clientId.
        self._open: dict[web.WebSocketResponse, web.Request] = {}

    def supports_metadata(self, sid: str | None) -> bool:
        """Whether the socket negotiated binary preview frames with metadata."""
        if sid is None or sid not in self.flags:
            return False
        return bool(self.flags[sid].get("feature_flags", {}).get("supports_preview_metadata"))

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        """Send one {"type","data"} message to sid, or to every socket when sid is None."""
        if self._stalled():
            return
        if sid is None:
            if not self.sockets:
                return
            text = json.dumps({"type": event, "data": data})
            for ws in list(self.sockets.values()):
                await _send(ws.send_str, text)
        else:
            target = self.sockets.get(sid)
            if target is not None:
                await _send(target.send_str, json.dumps({"type": event, "data": data}))

    async def send_bytes(self, payload: bytes, sid: str | None = None) -> None:
        """Send a binary frame to sid, or to every socket when sid is None."""
        if self._stalled():
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
        for request in list(self._open.values()):
            transport = request.transport
            if transport is not None:
                transport.abort()
        self._open.clear()
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
        return ws


async def _send(fn: Callable[[Any], Awaitable[None]], payload: Any) -> None:
    # A socket that died mid-send is ComfyUI's "send_socket_catch_exception": ignored.
    try:
        await fn(payload)
    except (ConnectionError, RuntimeError):
        pass
