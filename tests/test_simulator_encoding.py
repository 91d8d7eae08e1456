"""The simulator writes some websocket messages without json.dumps (progress_state by hand, every
frame through one cached encoder): the text must be exactly what json.dumps writes, since
ComfyUI's own messages are json.dumps output and clients may compare bytes."""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import pytest

from comfyq.sim.exec import executing_text, progress_state_text
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


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (300, 7), (1024, 1024)])
@pytest.mark.parametrize("level", [1, 4])
def test_png_idat_is_the_streamed_compression(size: tuple[int, int], level: int) -> None:
    # One-block images take zlib.compress; the bytes must be those of the streamed compressobj
    # (so a file's bytes, hashes and sizes do not depend on the path taken).
    width, height = size
    rgb = (12, 200, 7)
    png = encode_png(width, height, rgb, {"prompt": "{}"}, level)
    row = b"\x00" + bytes(rgb) * width
    comp = zlib.compressobj(level)
    idat = comp.compress(row * height) + comp.flush()
    at = png.index(b"IDAT")
    assert int.from_bytes(png[at - 4 : at], "big") == len(idat)
    assert png[at + 4 : at + 4 + len(idat)] == idat
    assert sniff_image(png).rgb == rgb
