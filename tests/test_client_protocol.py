"""Parsing of ComfyUI's wire formats, checked against frames recorded from ComfyUI 0.3.64."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from comfyq.comfy.capabilities import build as build_capabilities
from comfyq.comfy.jobsapi import history_entry_from_job, location_of_job
from comfyq.comfy.protocol import (
    Executing,
    ExecutionError,
    Preview,
    ProtocolError,
    Text,
    canonical_prompt_id,
    encode_binary_frame,
    merge_output,
    parse_binary_frame,
    parse_text_frame,
    queue_ids,
    run_result_from_history,
)
from comfyq.comfy.rejection import validation_error
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


# --- both generations: ids, merged outputs, jobs-API details, rejections ---------------------


def test_canonical_prompt_ids() -> None:
    assert canonical_prompt_id(PID.upper()) == PID
    assert canonical_prompt_id("{" + PID + "}") == PID
    assert canonical_prompt_id(PID.replace("-", "")) == PID
    with pytest.raises(ValueError):
        canonical_prompt_id("job-42")


def test_reemitted_entries_replace_never_duplicate() -> None:
    outputs: dict[str, dict[str, object]] = {}
    first = {"filename": "a.png", "subfolder": "", "type": "output", "id": "1", "metadata": {}}
    again = {**first, "id": "2", "preview_id": "2"}
    other = {"filename": "b.png", "subfolder": "", "type": "output"}
    merge_output(outputs, "9", {"images": [first]})
    merge_output(outputs, "9", {"images": [again, other], "animated": [False]})
    assert outputs["9"] == {"images": [again, other], "animated": [False]}
    merge_output(outputs, "9", {"text": ["x"]})
    merge_output(outputs, "9", {"text": ["x", "y"]})
    assert outputs["9"]["text"] == ["x", "y"]


def test_jobs_api_details_read_as_history() -> None:
    assert location_of_job({"id": PID, "status": "pending"}) == ("pending", None)
    assert location_of_job({"id": PID, "status": "in_progress"}) == ("running", None)
    assert location_of_job({"id": PID, "status": "from_the_future"}) is None
    image = {"filename": "x.png", "subfolder": "", "type": "output"}
    done = {
        "id": PID,
        "status": "completed",
        "priority": 3,
        "create_time": 1000,
        "outputs": {"9": {"images": [image]}},
        "execution_status": {
            "status_str": "success",
            "completed": True,
            "messages": [
                ["execution_start", {"prompt_id": PID, "timestamp": 1100}],
                ["execution_success", {"prompt_id": PID, "timestamp": 1500}],
            ],
        },
        "workflow": {"prompt": {"9": {}}, "extra_data": {"create_time": 1000}},
    }
    where, entry = location_of_job(done) or ("?", None)
    assert where == "done" and entry is not None
    result = run_result_from_history(PID, entry)
    assert result.outputs == {"9": {"images": [image]}}
    assert result.timing == {"queued_at": 1000, "started_at": 1100, "ended_at": 1500}
    failed = {
        "id": PID,
        "status": "failed",
        "execution_error": {"node_id": "2", "node_type": "X", "exception_message": "boom"},
    }
    with pytest.raises(NodeError) as err:
        run_result_from_history(PID, history_entry_from_job(failed))
    assert err.value.node_id == "2"
    with pytest.raises(Interrupted):
        run_result_from_history(PID, history_entry_from_job({"id": PID, "status": "cancelled"}))


@pytest.mark.parametrize(
    "error",
    [
        {
            "type": "invalid_prompt",
            "message": "Cannot execute because node Foo does not exist.",
            "details": "Node ID '#3'",
            "extra_info": {},
        },
        {
            "type": "missing_node_type",
            "message": "Node 'My Foo' not found. The custom node may not be installed.",
            "details": "Node ID '#3'",
            "extra_info": {"node_id": "3", "class_type": "Foo", "node_title": "My Foo"},
        },
    ],
)
def test_unknown_node_rejections_of_both_generations_are_one_error(
    error: dict[str, object],
) -> None:
    workflow = {"3": {"class_type": "Foo", "inputs": {}}}
    err = validation_error(400, {"error": error, "node_errors": {}}, b"", workflow)
    assert (err.node_id, err.node_type, err.details["kind"]) == ("3", "Foo", "unknown_node")
    assert err.message == (
        "ComfyUI has no node type 'Foo' (node #3); the custom node may not be installed"
    )
    assert err.details["error"] == error and err.details["node_errors"] == {}


def test_unreadable_rejection_keeps_the_body() -> None:
    err = validation_error(413, None, b"too big", None)
    assert err.details == {"status": 413, "body": "too big", "kind": "unreadable"}


def test_capabilities_from_probe_answers() -> None:
    new = build_capabilities(
        {"system": {"comfyui_version": "0.38.1"}},
        {"supports_preview_metadata": True, "assets": False, "node_replacements": True},
        (200, {"jobs": [], "pagination": {}}),
        (200, {"cancelled": False}),
    )
    assert new.names() == ["atomic_cancel", "jobs_api", "node_replacements", "preview_metadata"]
    old = build_capabilities(
        {"system": {"comfyui_version": "0.3.64"}},
        {"supports_preview_metadata": True},
        (404, None),
        (405, None),
    )
    assert old.names() == ["preview_metadata"] and old.version == "0.3.64"
    # A proxy answering 200 with something else is not the jobs API.
    odd = build_capabilities(None, None, (200, {"jobs": []}), (200, {"cancelled": "yes"}))
    assert not odd.jobs_api and not odd.atomic_cancel and odd.version is None
