"""The simulator writes some websocket messages without json.dumps (progress_state by hand, every
frame through one cached encoder): the text must be exactly what json.dumps writes, since
ComfyUI's own messages are json.dumps output and clients may compare bytes."""

from __future__ import annotations

import json
import math
import mimetypes
import uuid
import zlib
from typing import Any

import pytest

from comfyq.sim.exec import (
    _SEED_COMPLETED,
    _SEED_STARTED,
    executing_text,
    progress_state_text,
    prompt_message_text,
)
from comfyq.sim.files import guess_type
from comfyq.sim.generation import is_canonical_uuid, uuid4_text
from comfyq.sim.graph import signatures
from comfyq.sim.png import encode_png, sniff_image
from comfyq.sim.queue import status_text
from comfyq.sim.ws import _dumps, _text_frame, json_num, json_str


def _reference(pid: str, progress: dict[str, dict[str, Any]]) -> str:
    # What the simulator sent before: the node map built as dicts, then json.dumps.
    nodes = {
        nid: {
            "value": st["value"],
            "max": st["max"],
            "state": st["state"],
            "node_id": nid,
            "prompt_id": pid,
            "display_node_id": nid,
            "parent_node_id": None,
            "real_node_id": nid,
        }
        for nid, st in progress.items()
        if st["state"] != "pending"
    }
    for nid, st in progress.items():
        if "activity" in st and nid in nodes:
            nodes[nid]["activity"] = st["activity"]
    return json.dumps({"type": "progress_state", "data": {"prompt_id": pid, "nodes": nodes}})


NUMBERS: list[Any] = [0.0, 1.0, -0.0, 0.5, 1e-7, 123456789.125, 1e300, 0, 1, 20, True, None]


@pytest.mark.parametrize("value", NUMBERS + [math.inf, -math.inf, math.nan, "x", [1.0]])
def test_json_num_is_json_dumps(value: Any) -> None:
    assert json_num(value) == json.dumps(value)


@pytest.mark.parametrize("text", ["", "12", 'a"b\\c', "é", "\u2028\x00\n", "日本"])
def test_json_str_is_json_dumps(text: str) -> None:
    assert json_str(text) == json.dumps(text)


def test_progress_state_text_is_json_dumps() -> None:
    pid = "8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
    progress: dict[str, dict[str, Any]] = {}
    assert progress_state_text(pid, progress) == _reference(pid, progress)
    progress["1"] = {"state": "pending", "value": 0, "max": 1}
    assert progress_state_text(pid, progress) == _reference(pid, progress)
    for i, (value, maximum) in enumerate(
        [(0.0, 1.0), (1.0, 1.0), (3, 20), (0.25, 4.0), (-0.0, 1.0), (7, 7.0)]
    ):
        nid = ["1", "10", 'odd "id"', "é", "5:3", "7"][i]
        progress[nid] = {"state": "running", "value": value, "max": maximum}
        assert progress_state_text(pid, progress) == _reference(pid, progress)
        progress[nid]["state"] = "finished"
        assert progress_state_text(pid, progress) == _reference(pid, progress)
    progress["10"]["activity"] = "loading"
    assert progress_state_text(pid, progress) == _reference(pid, progress)
    assert json.loads(progress_state_text(pid, progress))["data"]["nodes"]["10"]["activity"] == (
        "loading"
    )


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_is_an_unmasked_websocket_text_frame(size: int) -> None:
    message = {"type": "x", "data": "a" * size}
    text = _dumps(message)
    assert text == json.dumps(message)
    frame = _text_frame(text)
    payload = text.encode()
    assert frame[0] == 0x81  # FIN + text opcode
    n = frame[1]
    assert n & 0x80 == 0  # a server never masks
    if n < 126:
        head = 2
        assert n == len(payload)
    elif n == 126:
        head = 4
        assert int.from_bytes(frame[2:4], "big") == len(payload) and len(payload) >= 126
    else:
        head = 10
        assert int.from_bytes(frame[2:10], "big") == len(payload) and len(payload) >= 65536
    assert frame[head:] == payload


@pytest.mark.parametrize("nid", [None, "1", "12:3", 'q"uote', "é"])
def test_executing_text_is_json_dumps(nid: str | None) -> None:
    pid = "8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
    data: dict[str, Any] = {"node": None, "prompt_id": pid}
    if nid is not None:
        data = {"node": nid, "display_node": nid, "prompt_id": pid}
    assert executing_text(nid, pid) == json.dumps({"type": "executing", "data": data})


@pytest.mark.parametrize("n", [0, 1, 2, 12345])
def test_status_text_is_json_dumps(n: int) -> None:
    data = {"status": {"exec_info": {"queue_remaining": n}}}
    assert status_text(n) == json.dumps({"type": "status", "data": data})


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (25, 26), (27, 27), (300, 7), (1024, 1024)])
@pytest.mark.parametrize("level", [1, 4])
def test_png_idat(size: tuple[int, int], level: int) -> None:
    # Small images (raw rows up to 2 KiB) are stored in the zlib stream uncompressed; the rest
    # are the bytes of the streamed compressobj, whichever path encode_png takes (so a file's
    # bytes, hashes and sizes depend only on the image). Either way zlib reads back the rows.
    width, height = size
    rgb = (12, 200, 7)
    png = encode_png(width, height, rgb, {"prompt": "{}"}, level)
    row = b"\x00" + bytes(rgb) * width
    at = png.index(b"IDAT")
    length = int.from_bytes(png[at - 4 : at], "big")
    idat = png[at + 4 : at + 4 + length]
    assert int.from_bytes(png[at + 4 + length : at + 8 + length], "big") == zlib.crc32(
        png[at : at + 4 + length]
    )
    assert zlib.decompress(idat) == row * height
    if len(row) * height <= 2048:
        assert idat[:2] == b"\x78\x01" and len(idat) == 2 + 5 + len(row) * height + 4
    else:
        comp = zlib.compressobj(level)
        assert idat == comp.compress(row * height) + comp.flush()
    assert sniff_image(png).rgb == rgb


def test_png_decodes_with_pillow() -> None:
    pil = pytest.importorskip("PIL.Image")
    import io

    for size in [(16, 16), (300, 7)]:
        png = encode_png(*size, (12, 200, 7), {"prompt": '{"1": {}}'}, 4)
        with pil.open(io.BytesIO(png)) as im:
            im.load()
            assert im.size == size and im.mode == "RGB"
            pixels = {im.getpixel((x, y)) for x in range(size[0]) for y in range(size[1])}
            assert pixels == {(12, 200, 7)}
            assert im.info["prompt"] == '{"1": {}}'


UUID_CASES = [
    "8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b",
    "8F4C0A1E-2B3D-4E5F-8A9B-0C1D2E3F4A5B",
    "8f4c0a1e2b3d4e5f8a9b0c1d2e3f4a5b",
    "{8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b}",
    "urn:uuid:8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b",
    "8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b\n",
    " 8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b",
    "8f4c0a1e-2b3d-4e5f-8a9b0-c1d2e3f4a5b",
    "8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5g",
    "00000000-0000-0000-0000-000000000000",
    "",
    "x",
    "８f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b",
    12,
    None,
]


@pytest.mark.parametrize("value", UUID_CASES)
def test_is_canonical_uuid_is_the_uuid_round_trip(value: Any) -> None:
    def reference(v: Any) -> bool:  # what the newer ComfyUI checks
        if not isinstance(v, str):
            return False
        try:
            return str(uuid.UUID(v)) == v
        except ValueError:
            return False

    assert is_canonical_uuid(value) == reference(value)


def test_uuid4_text_is_a_canonical_version_4_uuid() -> None:
    seen = set()
    for _ in range(2000):
        text = uuid4_text()
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 2000


@pytest.mark.parametrize("nodes", [None, [], ["1"], ["1", "10", 'q"uote', "é"]])
@pytest.mark.parametrize("event", ["execution_start", "execution_cached", "execution_success"])
def test_prompt_message_text_is_json_dumps(event: str, nodes: list[str] | None) -> None:
    pid = "8f4c0a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
    data: dict[str, Any] = {"prompt_id": pid, "timestamp": 1765000000123}
    if nodes is not None:
        data = {"nodes": nodes, **data}
    text = prompt_message_text(event, pid, 1765000000123, nodes)
    assert text == json.dumps({"type": event, "data": data})


def test_asset_scan_texts_are_json_dumps() -> None:
    started = {"roots": ["output"], "phase": "fast"}
    done = {"phase": "fast", "total": 0, "created": 0, "enriched": 0, "skipped": 0}
    assert _SEED_STARTED == json.dumps({"type": "assets.seed.started", "data": started})
    assert _SEED_COMPLETED == json.dumps(
        {"type": "assets.seed.completed", "data": {**done, "elapsed": 0.0}}
    )


@pytest.mark.parametrize(
    "name",
    ["a.png", "A.PNG", "x.webp", "x.jpeg", "x.svg", "x.html", "x.tar.gz", "x.png.gz", "x.tgz",
     "x", ".png", "data:image/png,x.png", "x.unknownext", "x.Z", "x.mp4", "x.json"],
)  # fmt: skip
def test_guess_type_is_mimetypes(name: str) -> None:
    for _ in range(2):  # the cached answer too
        assert guess_type(name) == mimetypes.guess_type(name)[0]


def test_cache_keys_follow_the_parts() -> None:
    # Node cache keys: equal for equal (class, IS_CHANGED, constants, upstream keys, slots),
    # different when any of them differs, however the strings look ("|", quotes, "=" ...).
    def graph(value: Any, name: str = "text", slot: int = 0, cls: str = "CLIPTextEncode") -> Any:
        return {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.ckpt"}},
            "6": {"class_type": cls, "inputs": {name: value, "clip": ["4", slot]}},
        }

    base = signatures(graph("a cat"), {})
    assert base == signatures(graph("a cat"), {})
    for other in (
        graph("a dog"),
        graph("a cat|'clip':x:1"),
        graph(["a cat"]),
        graph("a cat", name="txt"),
        graph("a cat", slot=1),
        graph("a cat", cls="VAEDecode"),
    ):
        keys = signatures(other, {})
        assert keys["4"] == base["4"] and keys["6"] != base["6"]
    assert signatures(graph("x"), {"6": "h1"})["6"] != signatures(graph("x"), {"6": "h2"})["6"]
    assert signatures(graph("a=b"), {})["6"] != signatures(graph("a"), {})["6"]
    # A cycle, or an unknown class upstream: never equal to anything, not even itself.
    loop = {"1": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}}
    assert signatures(loop, {})["1"] != signatures(loop, {})["1"]
