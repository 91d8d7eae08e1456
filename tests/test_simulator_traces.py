"""Replays the recorded ComfyUI traces (shared/comfyui-protocol) against the simulator:
plain GETs, uploads and /view, successful runs, progress and binary frames, routing, and
every POST /prompt error case."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import aiohttp
import pytest
from support.sim import (
    WsRecorder,
    data_of,
    shape,
    upload_image,
    wait_history,
)
from support.sim import decode_png as png_pixels
from support.traces import TRACES, post_prompt, recorded_types, run_traced, trace

from comfyq.sim import Simulator
from comfyq.sim.generation import OLD
from comfyq.sim.png import encode_png


@pytest.fixture
def comfyui_version() -> str:
    """The recorded 0.3.64 traffic is this file's reference (see test_simulator_newer for 0.38)."""
    return OLD


# ---------------------------------------------------------------- plain GETs (00, 01, 02, 03)


async def test_basic_gets_have_recorded_shapes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for path, ex in trace("00_basic_gets.json")["exchanges"].items():
        async with http.get(sim.url + path) as r:
            assert r.status == ex["response"]["status"], path
            assert r.headers["Content-Type"] == ex["response"]["headers"]["Content-Type"]
            body = await r.json()
        assert shape(body) == shape(ex["response"]["body"]), path
    for name in ("01_system_stats.json", "02_prompt_get.json"):
        ex = trace(name)
        async with http.get(sim.url + ex["request"]["path"]) as r:
            assert shape(await r.json()) == shape(ex["response"]["body"])


async def test_object_info_matches_recorded_nodes(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    t = trace("03_object_info_used_nodes.json")
    for name in t["nodes"]["LoadImage"]["input"]["required"]["image"][0]:
        (sim.env.data_dir / "input" / name).write_bytes(b"x")
    for name, recorded in t["nodes"].items():
        async with http.get(f"{sim.url}/object_info/{name}") as r:
            assert await r.json() == {name: recorded}
    size = trace("25b_run_getimagesize_binary_text_frame.json")["object_info_GetImageSize"]
    async with http.get(f"{sim.url}/api/object_info/GetImageSize") as r:
        assert await r.json() == size
    async with http.get(f"{sim.url}/object_info") as r:
        everything = await r.json()
    assert set(t["nodes"]) <= set(everything)
    assert {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "KSampler",
        "VAEDecode",
        "LoadImageMask",
    } <= set(everything)


# ---------------------------------------------------------------- upload and view (10, 20, 21)


async def test_upload_sequence_matches_trace(sim: Simulator, http: aiohttp.ClientSession) -> None:
    ex = trace("10_upload_image.json")["exchanges"]
    png_a, png_b = encode_png(5, 5, (1, 2, 3)), encode_png(5, 5, (9, 9, 9))
    name = "probe_upload_0789ca.png"
    steps: list[tuple[str, str | None, bytes, dict[str, str]]] = [
        ("1_fresh", name, png_a, {}),
        ("2_same_name_same_bytes", name, png_a, {}),
        ("3_same_name_other_bytes", name, png_b, {}),
        ("4_overwrite_true", name, png_b, {"overwrite": "true"}),
        ("5_subfolder_and_type_input", name, png_a, {"subfolder": "probe_sub", "type": "input"}),
        ("6_type_temp", name, png_a, {"type": "temp"}),
        ("7_no_image_field", None, b"", {"foo": "bar"}),
        ("8_path_traversal_subfolder", name, png_a, {"subfolder": "../../etc"}),
    ]
    for key, fname, data, fields in steps:
        async with await upload_image(http, sim.url, fname, data, **fields) as r:
            expected = ex[key]["response"]
            assert r.status == expected["status"], key
            if expected["status"] == 200:
                assert await r.json() == expected["body"], key
            else:
                assert await r.read() == b"", key
    inputs = sim.env.data_dir / "input"
    assert (inputs / name).read_bytes() == png_b  # overwrite=true replaced it
    assert (inputs / "probe_upload_0789ca (1).png").read_bytes() == png_b
    assert (inputs / "probe_sub" / name).exists()
    assert (sim.env.data_dir / "temp" / name).exists()
    view = ex["9_view_uploaded_input"]
    async with http.get(sim.url + view["request"]["path"]) as r:
        assert r.status == 200
        assert set(view["response"]["headers"]) - {"Date", "Server"} <= set(r.headers)
        assert r.headers["Content-Disposition"] == f'filename="{name}"'
        assert int(r.headers["Content-Length"]) == len(png_b) == len(await r.read())


async def test_view_corner_cases(sim: Simulator, http: aiohttp.ClientSession) -> None:
    t = trace("20_run_success_invert.json")
    for key in ("view_missing_file", "view_no_filename", "view_traversal"):
        async with http.get(sim.url + t[key]["request"]["path"]) as r:
            assert r.status == t[key]["response"]["status"], key
            assert await r.read() == b""
    async with http.get(sim.url + "/view?filename=x.png&type=output&subfolder=../..") as r:
        assert r.status == 403
    async with http.get(sim.url + "/view?filename=x.png&type=nope") as r:
        assert r.status == 400
    async with http.get(sim.url + "/upload/image") as r:  # 30_..._l: GET on a POST route
        assert r.status == 404 and await r.read() == b""


# ---------------------------------------------------------------- runs (20, 21, 22, 23, 24)


async def test_success_run_matches_trace(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec, pid, t = await run_traced(http, sim, "20_run_success_invert.json")
    assert rec.types() == recorded_types(t)
    recorded_frames = [m["msg"] for m in t["ws_messages_in_order"]]
    for mine, theirs in zip(rec.frames, recorded_frames):
        assert shape(mine.data) == shape(theirs["data"]), mine.type
    assert rec.frames[0].data["sid"] == "client-under-test"
    executed = data_of(rec.frames, "executed")
    assert executed[0]["output"] == {
        "images": [
            {"filename": "probe_invert_0789ca_00001_.png", "subfolder": "", "type": "output"}
        ]
    }
    async with http.get(f"{sim.url}/history/{pid}") as r:
        history = await r.json()
    recorded = t["history_after"]["response"]["body"]
    assert shape(history[pid]) == shape(next(iter(recorded.values())))
    entry = history[pid]
    assert entry["prompt"][:2] == [0, pid] and entry["prompt"][3:] == [
        {"client_id": "client-under-test"},
        ["3"],
    ]
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_success",
    ]
    assert entry["outputs"] == next(iter(recorded.values()))["outputs"]
    assert entry["meta"] == next(iter(recorded.values()))["meta"]
    # the output file is a real PNG of the inverted colour
    headers = trace("21_view_output_headers.json")["response"]["headers"]
    async with http.get(sim.url + t["view_output"]["request"]["path"]) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        assert set(headers) - {"Date", "Server"} <= set(r.headers)
        data = await r.read()
    width, height, raw = png_pixels(data)
    c = 521401
    inverted = bytes(255 - v for v in ((c >> 16) & 255, (c >> 8) & 255, c & 255))
    assert (width, height) == (64, 64) and raw[1:4] == inverted
    async with http.get(sim.url + t["view_output_preview_webp"]["request"]["path"]) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/webp"
        webp = await r.read()
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"


async def test_cached_and_partially_cached_reruns(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    await run_traced(http, sim, "20_run_success_invert.json")
    outputs = sorted(p.name for p in (sim.env.data_dir / "output").iterdir())
    rec, pid, t = await run_traced(http, sim, "22_run_same_workflow_again_cached.json")
    assert rec.types() == recorded_types(t)
    assert data_of(rec.frames, "execution_cached")[0]["nodes"] == ["1", "2", "3"]
    assert (
        data_of(rec.frames, "executed")[0]["output"]["images"][0]["filename"]
        == "probe_invert_0789ca_00001_.png"
    )
    state = data_of(rec.frames, "progress_state")[0]["nodes"]["3"]
    assert (state["value"], state["max"], state["state"]) == (1, 1, "finished")
    assert sorted(p.name for p in (sim.env.data_dir / "output").iterdir()) == outputs
    entry = await wait_history(http, sim.url, pid)
    assert entry["outputs"]["3"]["images"][0]["filename"] == "probe_invert_0789ca_00001_.png"
    rec, _, t = await run_traced(http, sim, "23_run_partially_cached.json")
    assert rec.types() == recorded_types(t)
    assert data_of(rec.frames, "execution_cached")[0]["nodes"] == ["1", "2"]
    assert all(set(d["nodes"]) == {"3"} for d in data_of(rec.frames, "progress_state"))


async def test_loadimage_pipeline_order_and_preview(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    async with await upload_image(
        http, sim.url, "probe_upload_0789ca.png", encode_png(20, 10, (5, 6, 7))
    ):
        pass
    (sim.env.data_dir / "output" / "probe_loadblur_00001_.png").write_bytes(b"old")
    rec, pid, t = await run_traced(http, sim, "24_run_loadimage_scale_blur_save_preview.json")
    assert rec.types() == recorded_types(t)
    order = [d["node"] for d in data_of(rec.frames, "executing") if d["node"] is not None]
    assert order == ["10", "11", "14", "12", "13"]
    entry = await wait_history(http, sim.url, pid)
    assert entry["prompt"][4] == ["13", "14"]
    assert entry["outputs"]["13"]["images"][0]["filename"] == "probe_loadblur_00002_.png"
    preview = entry["outputs"]["14"]["images"][0]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", preview["filename"])
    assert preview["type"] == "temp"
    async with http.get(f"{sim.url}/view?filename={preview['filename']}&type=temp&subfolder=") as r:
        assert r.status == 200
        assert png_pixels(await r.read())[:2] == (128, 96)


# ---------------------------------------------------------------- progress and binary (25, 25b, 26)


async def test_savewebsocket_legacy_frames(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec, pid, t = await run_traced(http, sim, "25_run_savewebsocket_progress_binary_legacy.json")
    types = rec.types()
    assert types[0] == "status" and types[1:] == recorded_types(t)
    assert [(d["value"], d["max"]) for d in data_of(rec.frames, "progress")] == [
        (0, 3),
        (1, 3),
        (2, 3),
    ]
    frames = rec.of_type("<binary PREVIEW_IMAGE>")
    assert len(frames) == 3
    for f in frames:
        assert f.raw[:8].hex() == "0000000100000002"
        assert png_pixels(f.raw[8:])[:2] == (32, 32)
    last = data_of(rec.frames, "progress_state")[-1]["nodes"]["2"]
    assert (last["value"], last["max"], last["state"]) == (3, 3, "finished")
    entry = await wait_history(http, sim.url, pid)
    recorded = next(iter(t["history_after"]["response"]["body"].values()))
    assert (entry["outputs"], entry["meta"]) == (recorded["outputs"], recorded["meta"]) == ({}, {})


async def test_getimagesize_text_frame_is_broadcast(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    t = trace("25b_run_getimagesize_binary_text_frame.json")
    observer = await WsRecorder(http, sim.url, "observer").connect()
    await observer.wait_for(lambda fs: len(fs) >= 1)
    rec, pid, _ = await run_traced(http, sim, "25b_run_getimagesize_binary_text_frame.json")
    assert rec.types() == recorded_types(t)
    await observer.wait_for(lambda fs: len(fs) >= 5)
    assert observer.types()[1:] == ["status", "status", "<binary TEXT>", "status"]
    for f in (rec.of_type("<binary TEXT>")[0], observer.of_type("<binary TEXT>")[0]):
        event, nlen = struct.unpack(">II", f.raw[:8])
        assert (event, f.raw[8 : 8 + nlen], f.raw[8 + nlen :]) == (
            3,
            b"2",
            b"width: 40, height: 30\n batch size: 2",
        )
    entry = await wait_history(http, sim.url, pid)
    name = entry["outputs"]["4"]["images"][0]["filename"]
    async with http.get(f"{sim.url}/view?filename={name}&type=output") as r:
        assert png_pixels(await r.read())[:2] == (40, 30)


async def test_savewebsocket_with_metadata_after_handshake(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    t = trace("26_run_savewebsocket_progress_binary_with_metadata.json")
    flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    rec, pid, _ = await run_traced(
        http, sim, "26_run_savewebsocket_progress_binary_with_metadata.json", first=flags
    )
    before = [m["msg"] for m in t["ws_messages_before_submit_incl_feature_flags_reply"]]
    assert [f.type for f in rec.frames[:2]] == ["status", "feature_flags"]
    assert rec.frames[1].data == before[1]["data"]
    assert rec.types()[2:] == recorded_types(t)
    recorded_bin = [m for m in t["ws_messages_in_order"] if m["kind"] == "binary"]
    for f, rb in zip(
        rec.of_type("<binary PREVIEW_IMAGE_WITH_METADATA>"), recorded_bin, strict=True
    ):
        event, mlen = struct.unpack(">II", f.raw[:8])
        meta = json.loads(f.raw[8 : 8 + mlen])
        assert event == 4 and meta == {**rb["metadata_json"], "prompt_id": pid}
        assert f.raw[8 + mlen : 8 + mlen + 8].hex() == rb["image_magic_hex"]


# ---------------------------------------------------------------- routing (27, 28, 29)


async def test_prompt_without_client_id(sim: Simulator, http: aiohttp.ClientSession) -> None:
    t = trace("27_run_without_client_id.json")
    obs = await WsRecorder(http, sim.url, "someone-else").connect()
    await obs.wait_for(lambda fs: len(fs) >= 1)
    body = await post_prompt(http, sim, t["post_prompt"]["request"]["json"])
    entry = await wait_history(http, sim.url, body["prompt_id"])
    assert entry["prompt"][3] == {} and entry["status"]["status_str"] == "success"
    await obs.wait_for(lambda fs: len(fs) >= 1 + len(t["observer_ws_messages"]))
    assert obs.types()[1:] == [m["msg"]["type"] for m in t["observer_ws_messages"]]


async def test_other_client_sees_only_status(sim: Simulator, http: aiohttp.ClientSession) -> None:
    observer = await WsRecorder(http, sim.url, "observer-b").connect()
    await observer.wait_for(lambda fs: len(fs) >= 1)
    rec, _, t = await run_traced(http, sim, "28_run_other_client_observer_own.json")
    assert rec.types()[1:] == recorded_types(t)
    view = trace("29_run_other_client_observer_view.json")["observer_ws_messages"]
    await observer.wait_for(lambda fs: len(fs) >= 1 + len(view))
    assert observer.types()[1:] == [m["msg"]["type"] for m in view]


# ---------------------------------------------------------------- POST /prompt errors (30_*)

ERROR_CASES = sorted(p.name for p in TRACES.glob("30_prompt_error_*.json"))


@pytest.mark.parametrize("name", ERROR_CASES)
async def test_prompt_error_case(name: str, sim: Simulator, http: aiohttp.ClientSession) -> None:
    ex = trace(name)
    req, expected = ex["request"], ex["response"]
    if "_e_" in name:
        assert not (sim.env.data_dir / "input" / "no_such_file_123.png").exists()
    kw: dict[str, Any] = {}
    if "json" in req:
        kw["json"] = req["json"]
    if "data" in req:
        kw["data"] = req["data"]
        kw["headers"] = req.get("headers", {})
    async with http.request(req["method"], sim.url + req["path"], **kw) as r:
        assert r.status == expected["status"]
        if expected["status"] == 500:
            assert await r.text() == expected["body"]
            assert r.headers["Content-Type"] == expected["headers"]["Content-Type"]
            assert r.headers.get("Connection") == "close"
        elif expected["status"] == 400:
            assert await r.json() == expected["body"]
        elif expected["status"] == 200:
            body = await r.json()
            assert body["node_errors"] == expected["body"]["node_errors"]
            assert isinstance(body["number"], int)
            if "prompt_id" in req["json"]:
                assert body["prompt_id"] == req["json"]["prompt_id"]
            await wait_history(http, sim.url, body["prompt_id"])


async def test_numeric_string_coerced_and_partial_prompt_runs_valid_outputs(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    d2 = trace("30_prompt_error_d2_numeric_string_for_INT_is_ACCEPTED.json")["request"]["json"]
    body = await post_prompt(http, sim, d2)
    entry = await wait_history(http, sim.url, body["prompt_id"])
    assert entry["prompt"][2]["1"]["inputs"]["width"] == 16  # coerced in place
    name = entry["outputs"]["2"]["images"][0]["filename"]
    async with http.get(f"{sim.url}/view?filename={name}") as r:
        assert png_pixels(await r.read())[:2] == (16, 16)
    j = trace("30_prompt_error_j_one_output_invalid_one_valid_IS_QUEUED.json")["request"]["json"]
    body = await post_prompt(http, sim, j)
    entry = await wait_history(http, sim.url, body["prompt_id"])
    assert entry["prompt"][4] == ["2"] and set(entry["outputs"]) == {"2"}


async def test_number_counts_rejected_prompts(sim: Simulator, http: aiohttp.ClientSession) -> None:
    good = trace("30_prompt_error_k_client_supplied_prompt_id.json")["request"]["json"]["prompt"]
    assert (await post_prompt(http, sim, {"prompt": good}))["number"] == 0
    await post_prompt(http, sim, {"prompt": {}}, status=400)
    await post_prompt(http, sim, {"foo": 1}, status=400)
    async with http.post(sim.url + "/prompt", data="{nope") as r:
        assert r.status == 500  # invalid JSON never reaches the counter
    assert (await post_prompt(http, sim, {"prompt": good}))["number"] == 3
    assert (await post_prompt(http, sim, {"prompt": good, "number": 5}))["number"] == 5.0
    assert (await post_prompt(http, sim, {"prompt": good}))["number"] == 4
    assert (await post_prompt(http, sim, {"prompt": good, "front": True}))["number"] == -5
