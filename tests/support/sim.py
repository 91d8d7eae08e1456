"""The ComfyUI simulator in tests: its fixtures, a websocket recorder and shape helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyq.sim import Simulator
from comfyq.sim.generation import NEWEST


@dataclass
class Frame:
    """One received websocket frame: JSON text (type/data) or binary (raw bytes)."""

    kind: str  # "text" or "binary"
    type: str  # message type, or "<binary N>" with the u32 event type
    data: Any
    raw: bytes = b""


def _binary_name(payload: bytes) -> str:
    event = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else -1
    names = {1: "PREVIEW_IMAGE", 3: "TEXT", 4: "PREVIEW_IMAGE_WITH_METADATA"}
    return f"<binary {names.get(event, event)}>"


class WsRecorder:
    """Connects to /ws and records every frame in the background."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, client_id: str | None = None
    ) -> None:
        self.session = session
        self.url = base_url + "/ws" + (f"?clientId={client_id}" if client_id else "")
        self.frames: list[Frame] = []
        self.closed: aiohttp.WSMessage | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def connect(self, first_message: dict[str, Any] | None = None) -> WsRecorder:
        """Open the socket (optionally sending a first message) and start recording."""
        self.ws = await self.session.ws_connect(self.url, autoclose=False, heartbeat=None)
        if first_message is not None:
            await self.ws.send_str(json.dumps(first_message))
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                d = json.loads(msg.data)
                self.frames.append(Frame("text", d["type"], d["data"]))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.frames.append(Frame("binary", _binary_name(msg.data), None, msg.data))
            else:
                self.closed = msg
                self._changed.set()
                return
            self._changed.set()

    async def wait_for(self, pred: Callable[[list[Frame]], bool], timeout: float = 10.0) -> None:
        """Wait until pred(frames) holds (or the socket closed, then pred must hold)."""

        async def loop() -> None:
            while not pred(self.frames):
                if self.closed is not None:
                    raise AssertionError(f"socket closed ({self.closed.type}) before condition")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)

    async def wait_closed(self, timeout: float = 10.0) -> aiohttp.WSMessage:
        """Wait for the connection to end; returns the closing message."""

        async def loop() -> None:
            while self.closed is None:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)
        assert self.closed is not None
        return self.closed

    async def wait_done(self, prompt_id: str, timeout: float = 10.0) -> None:
        """Wait for the final `executing {node: null, prompt_id}` of a prompt."""
        await self.wait_for(lambda fs: any(is_done(f, prompt_id) for f in fs), timeout)

    def types(self) -> list[str]:
        """Message types in arrival order."""
        return [f.type for f in self.frames]

    def of_type(self, kind: str) -> list[Frame]:
        """Frames of one message type."""
        return [f for f in self.frames if f.type == kind]

    async def close(self) -> None:
        """Close the socket and stop recording."""
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def is_done(frame: Frame, prompt_id: str) -> bool:
    """True for the final `executing` message of prompt_id."""
    return (
        frame.type == "executing"
        and frame.data.get("node") is None
        and frame.data.get("prompt_id") == prompt_id
    )


def shape(value: Any) -> Any:
    """Structure of a JSON value: dict keys recursively, lists by their first item, leaf types."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


async def wait_history(
    session: aiohttp.ClientSession, base_url: str, prompt_id: str, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll GET /history/{id} until the entry exists; returns the entry."""

    async def loop() -> dict[str, Any]:
        while True:
            async with session.get(f"{base_url}/history/{prompt_id}") as r:
                body = await r.json()
            if prompt_id in body:
                return body[prompt_id]  # type: ignore[no-any-return]
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(loop(), timeout)


def find_traces(start: Path) -> Path | None:
    """The recorded-protocol folder (shared/comfyui-protocol) beside an enclosing directory."""
    for parent in [start, *start.parents]:
        candidate = parent / "shared" / "comfyui-protocol"
        if candidate.is_dir():
            return candidate
    return None


def data_of(frames: list[Frame], kind: str) -> list[Any]:
    """Payloads of the frames of one message type."""
    return [f.data for f in frames if f.type == kind]


async def post_prompt(
    session: aiohttp.ClientSession, base_url: str, body: dict[str, Any], status: int = 200
) -> dict[str, Any]:
    """POST /prompt and check the status; returns the JSON body."""
    async with session.post(base_url + "/prompt", json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def run_workflow(
    session: aiohttp.ClientSession,
    base_url: str,
    workflow: dict[str, Any],
    client_id: str,
    first: dict[str, Any] | None = None,
) -> tuple[WsRecorder, str]:
    """Open a socket, submit with that client id, wait for the final `executing` message."""
    rec = await WsRecorder(session, base_url, client_id).connect(first)
    await rec.wait_for(lambda fs: len(fs) >= (2 if first else 1))
    body = await post_prompt(session, base_url, {"prompt": workflow, "client_id": client_id})
    await rec.wait_done(body["prompt_id"])
    return rec, body["prompt_id"]


async def upload_image(
    session: aiohttp.ClientSession, base_url: str, name: str | None, data: bytes, **fields: str
) -> aiohttp.ClientResponse:
    """POST /upload/image with an `image` file part (omitted when name is None)."""
    form = aiohttp.FormData()
    for key, value in fields.items():
        form.add_field(key, value)
    if name is not None:
        form.add_field("image", data, filename=name, content_type="image/png")
    return await session.post(base_url + "/upload/image", data=form)


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Decode an 8-bit RGB PNG as the simulator writes it: (width, height, filtered rows)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert (depth, ctype) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


@pytest.fixture
def comfyui_version() -> str:
    """The ComfyUI generation the simulator speaks: the newest, unless a module overrides this
    fixture (``0.3.64`` for the recorded-traffic tests) or parametrizes it over both
    (``@pytest.fixture(params=comfyq.sim.generation.VERSIONS)``)."""
    return NEWEST


@pytest.fixture
async def simulator(tmp_path: Path, comfyui_version: str) -> AsyncIterator[Simulator]:
    sim = Simulator(port=0, data_dir=tmp_path / "sim", comfyui_version=comfyui_version)
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
async def sim(simulator: Simulator) -> Simulator:
    """The simulator under its short name (the ComfyUI-side tests' habit)."""
    return simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to the simulator or a server directly."""
    async with aiohttp.ClientSession() as s:
        yield s
