"""Parsing of ComfyUI's wire formats, checked against frames recorded from ComfyUI 0.3.64."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from comfyq.comfy.protocol import (
    Executing,
    ExecutionError,
    Preview,
    ProtocolError,
    Text,
    encode_binary_frame,
    merge_output,
    parse_binary_frame,
    parse_text_frame,
    queue_ids,
    run_result_from_history,
)
from comfyq.errors import Interrupted, NodeError

PNG_MAGIC = bytes.fromhex("89504e470d0a1a0a0000000d49484452")
PID = "6c0b2ec6-63d1-4951-b580-ed4eafc65a64"


def test_type1_preview_frame_as_recorded() -> None:
    # 25_run_savewebsocket_progress_binary_legacy.json: 00000001 00000002 89504e47...
    raw = bytes.fromhex("0000000100000002") + PNG_MAGIC
    frame = parse_binary_frame(raw)
    assert isinstance(frame, Preview)
    assert frame.event_type == 1 and frame.mime == "image/png"
    assert frame.image == PNG_MAGIC and frame.prompt_id is None
    jpeg = parse_binary_frame(struct.pack(">II", 1, 1) + b"\xff\xd8")
    assert isinstance(jpeg, Preview) and jpeg.mime == "image/jpeg"


def test_type3_text_frame_as_recorded() -> None:
    # 25b_run_getimagesize_binary_text_frame.json, node "2"
    raw = bytes.fromhex("0000000300000001" + "32") + b"width: 40, height: 30\n batch size: 2"
    frame = parse_binary_frame(raw)
    assert frame == Text("2", "width: 40, height: 30\n batch size: 2")
    assert encode_binary_frame(frame) == raw


def test_type4_preview_with_metadata_as_recorded() -> None:
    meta = {
        "node_id": "2",
        "prompt_id": "2f8953e6-f1d4-4522-917a-1905ed47fc8f",
        "display_node_id": "2",
        "parent_node_id": None,
        "real_node_id": "2",
        "image_type": "image/png",
    }
    blob = json.dumps(meta).encode()
    assert len(blob) == 165  # the recorded metadata_len_u32be
    raw = struct.pack(">II", 4, len(blob)) + blob + PNG_MAGIC
    frame = parse_binary_frame(raw)
    assert isinstance(frame, Preview)
    assert frame.event_type == 4 and frame.mime == "image/png" and frame.image == PNG_MAGIC
    assert frame.prompt_id == meta["prompt_id"] and frame.node_id == "2"
    assert parse_binary_frame(encode_binary_frame(frame)) == frame


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x01",  # too short
        struct.pack(">II", 2, 0) + b"x",  # type 2 never goes on the wire
        struct.pack(">II", 1, 9) + b"x",  # unknown image type
        struct.pack(">II", 3, 50) + b"2",  # node id runs past the end
        struct.pack(">II", 4, 3) + b"{{{",  # bad metadata
    ],
)
def test_malformed_binary_frames_raise(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_binary_frame(raw)


def test_text_frames_typed_and_tolerant() -> None:
    # The reconnect form of ``executing`` has no prompt_id (90_extra_reconnect_and_corners.json).
    msg = parse_text_frame('{"type": "executing", "data": {"node": "100"}}')
    assert isinstance(msg.parsed, Executing) and msg.parsed.node == "100"
    assert msg.prompt_id is None
    unknown = parse_text_frame('{"type": "crystools.monitor", "data": {"cpu": 3}}')
    assert unknown.parsed is None and unknown.data == {"cpu": 3}
    extra = parse_text_frame(
        json.dumps(
            {
                "type": "executing",
                "data": {"node": None, "prompt_id": PID, "new_field_from_the_future": 1},
            }
        )
    )
    assert isinstance(extra.parsed, Executing) and extra.parsed.node is None
    assert extra.prompt_id == PID
    with pytest.raises(ProtocolError):
        parse_text_frame("{not json")
    with pytest.raises(ProtocolError):
        parse_text_frame('{"type": "executing", "data": {"node": 5}}')


EXECUTION_ERROR = {
    "prompt_id": PID,
    "node_id": "1",
    "node_type": "LoadImage",
    "executed": [],
    "exception_message": "cannot identify image file '/opt/ComfyUI/input/probe_corrupt.png'\n",
    "exception_type": "PIL.UnidentifiedImageError",
    "traceback": ['  File "/opt/ComfyUI/execution.py", line 496, in execute\n'],
    "current_inputs": {"image": ["probe_corrupt.png"]},
    "current_outputs": ["1", "2"],
    "timestamp": 1795521409547,
}


def _history(status_str: str, messages: list[object], outputs: dict[str, object]) -> dict[str, Any]:
    return {
        "prompt": [25, PID, {}, {"client_id": "x"}, ["2"]],
        "outputs": outputs,
        "status": {
            "status_str": status_str,
            "completed": status_str == "success",
            "messages": messages,
        },
        "meta": {},
    }


def test_history_error_becomes_node_error() -> None:
    entry = _history(
        "error", [["execution_start", {"prompt_id": PID}], ["execution_error", EXECUTION_ERROR]], {}
    )
    with pytest.raises(NodeError) as info:
        run_result_from_history(PID, entry)
    err = info.value
    assert err.node_id == "1" and err.node_type == "LoadImage"
    assert err.message.startswith("cannot identify image file")
    assert err.details["exception_type"] == "PIL.UnidentifiedImageError"
    assert err.details["traceback"] == EXECUTION_ERROR["traceback"]
    assert err.details["current_inputs"] == {"image": ["probe_corrupt.png"]}
    assert err.details["executed"] == []
    assert isinstance(
        parse_text_frame(json.dumps({"type": "execution_error", "data": EXECUTION_ERROR})).parsed,
        ExecutionError,
    )


def test_history_interrupted_and_success() -> None:
    interrupted = _history(
        "error",
        [
            [
                "execution_interrupted",
                {
                    "prompt_id": PID,
                    "node_id": "101",
                    "node_type": "ImageBlur",
                    "executed": ["100", "1"],
                    "timestamp": 1,
                },
            ]
        ],
        {},
    )
    with pytest.raises(Interrupted) as info:
        run_result_from_history(PID, interrupted)
    assert info.value.node_id == "101" and info.value.details["executed"] == ["100", "1"]
    images = {"images": [{"filename": "probe_00001_.png", "subfolder": "", "type": "output"}]}
    ok = _history(
        "success",
        [
            ["execution_cached", {"nodes": ["1", "2", "3"], "prompt_id": PID}],
            ["execution_success", {"prompt_id": PID}],
        ],
        {"3": images},
    )
    result = run_result_from_history(PID, ok)
    assert result.outputs == {"3": images} and result.cached_nodes == ["1", "2", "3"]
    assert result.status == "success" and result.source == "history"


def test_queue_pending_is_sorted_by_number() -> None:
    # 50_queue_interrupt_delete.json: pending comes in heap order [-30, 27, 29, 28].
    body = {
        "queue_running": [[26, "run", {}, {}, ["9"]]],
        "queue_pending": [
            [-30, "front", {}, {}, ["3"]],
            [27, "a", {}, {}, ["3"]],
            [29, "c", {}, {}, ["3"]],
            [28, "b", {}, {}, ["3"]],
        ],
    }
    assert queue_ids(body) == (["run"], ["front", "a", "b", "c"])
    assert queue_ids({}) == ([], [])


def test_merge_output_extends_without_duplicates() -> None:
    out: dict[str, dict[str, Any]] = {}
    img = {"filename": "a.png", "subfolder": "", "type": "output"}
    merge_output(out, "9", {"images": [img]})
    merge_output(out, "9", {"images": [img, {**img, "filename": "b.png"}], "animated": [False]})
    assert out == {"9": {"images": [img, {**img, "filename": "b.png"}], "animated": [False]}}
