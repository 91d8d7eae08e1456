"""Replays the recorded ComfyUI traces (shared/comfyui-protocol) against the simulator."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyq.comfy.sim_png import encode_png
from comfyq.comfy.sim_testing import Frame, WsRecorder, shape, wait_history
from comfyq.comfy.simulator import Simulator

TRACES = Path(__file__).resolve().parents[2] / "shared" / "comfyui-protocol"
if not TRACES.is_dir():  # pragma: no cover - CI has shared/ beside the clone
    pytest.skip(f"recorded traces not found at {TRACES}", allow_module_level=True)


def trace(name: str) -> dict[str, Any]:
    return json.loads((TRACES / name).read_text())  # type: ignore[no-any-return]


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    s = Simulator(data_dir=tmp_path / "comfy")
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post_prompt(http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any],
                      status: int = 200) -> dict[str, Any]:
    async with http.post(sim.url + "/prompt", json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def run_traced(http: aiohttp.ClientSession, sim: Simulator, name: str,
                     client_id: str = "client-under-test",
                     first: dict[str, Any] | None = None) -> tuple[WsRecorder, str, dict[str, Any]]:
    """Open a socket, POST the trace's workflow with our client id, wait for the end."""
    t = trace(name)
    rec = await WsRecorder(http, sim.url, client_id).connect(first)
    await rec.wait_for(lambda fs: len(fs) >= (2 if first else 1))
    body = await post_prompt(http, sim, {"prompt": t["workflow"], "client_id": client_id})
    await rec.wait_done(body["prompt_id"])
    return rec, body["prompt_id"], t


def recorded_types(t: dict[str, Any]) -> list[str]:
    return list(t["ws_message_types_in_order"])


def data_of(frames: list[Frame], kind: str) -> list[Any]:
    return [f.data for f in frames if f.type == kind]


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Decode an 8-bit RGB PNG written by the simulator (checks chunk CRCs and sizes)."""
    import zlib
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert (depth, ctype) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


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


async def test_object_info_matches_recorded_nodes(sim: Simulator,
                                                  http: aiohttp.ClientSession) -> None:
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
    assert {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
            "VAEDecode", "LoadImageMask"} <= set(everything)


# ---------------------------------------------------------------- upload and view (10, 20, 21)

async def upload(http: aiohttp.ClientSession, sim: Simulator, name: str | None, data: bytes,
                 **fields: str) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    if name is not None:
        form.add_field("image", data, filename=name, content_type="image/png")
    return await http.post(sim.url + "/upload/image", data=form)


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
        async with await upload(http, sim, fname, data, **fields) as r:
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
    assert executed[0]["output"] == {"images": [{"filename": "probe_invert_0789ca_00001_.png",
                                                 "subfolder": "", "type": "output"}]}
    async with http.get(f"{sim.url}/history/{pid}") as r:
        history = await r.json()
    recorded = t["history_after"]["response"]["body"]
    assert shape(history[pid]) == shape(next(iter(recorded.values())))
    entry = history[pid]
    assert entry["prompt"][:2] == [0, pid] and entry["prompt"][3:] == [
        {"client_id": "client-under-test"}, ["3"]]
    assert [m[0] for m in entry["status"]["messages"]] == [
        "execution_start", "execution_cached", "execution_success"]
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


async def test_cached_and_partially_cached_reruns(sim: Simulator,
                                                  http: aiohttp.ClientSession) -> None:
    await run_traced(http, sim, "20_run_success_invert.json")
    outputs = sorted(p.name for p in (sim.env.data_dir / "output").iterdir())
    rec, pid, t = await run_traced(http, sim, "22_run_same_workflow_again_cached.json")
    assert rec.types() == recorded_types(t)
    assert data_of(rec.frames, "execution_cached")[0]["nodes"] == ["1", "2", "3"]
    assert data_of(rec.frames, "executed")[0]["output"]["images"][0]["filename"] == \
        "probe_invert_0789ca_00001_.png"
    state = data_of(rec.frames, "progress_state")[0]["nodes"]["3"]
    assert (state["value"], state["max"], state["state"]) == (1, 1, "finished")
    assert sorted(p.name for p in (sim.env.data_dir / "output").iterdir()) == outputs
    entry = await wait_history(http, sim.url, pid)
    assert entry["outputs"]["3"]["images"][0]["filename"] == "probe_invert_0789ca_00001_.png"
    rec, _, t = await run_traced(http, sim, "23_run_partially_cached.json")
    assert rec.types() == recorded_types(t)
    assert data_of(rec.frames, "execution_cached")[0]["nodes"] == ["1", "2"]
    assert all(set(d["nodes"]) == {"3"} for d in data_of(rec.frames, "progress_state"))


async def test_loadimage_pipeline_order_and_preview(sim: Simulator,
                                                    http: aiohttp.ClientSession) -> None:
    async with await upload(http, sim, "probe_upload_0789ca.png", encode_png(20, 10, (5, 6, 7))):
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
    rec, _, t = await run_traced(http, sim, "25_run_savewebsocket_progress_binary_legacy.json")
    types = rec.types()
    assert types[0] == "status" and types[1:] == recorded_types(t)
    assert [(d["value"], d["max"]) for d in data_of(rec.frames, "progress")] == \
        [(0, 3), (1, 3), (2, 3)]
    frames = rec.of_type("<binary PREVIEW_IMAGE>")
    assert len(frames) == 3
    for f in frames:
        assert f.raw[:8].hex() == "0000000100000002"
        assert png_pixels(f.raw[8:])[:2] == (32, 32)
    last = data_of(rec.frames, "progress_state")[-1]["nodes"]["2"]
    assert (last["value"], last["max"], last["state"]) == (3, 3, "finished")


async def test_getimagesize_text_frame_is_broadcast(sim: Simulator,
                                                    http: aiohttp.ClientSession) -> None:
    t = trace("25b_run_getimagesize_binary_text_frame.json")
    observer = await WsRecorder(http, sim.url, "observer").connect()
    await observer.wait_for(lambda fs: len(fs) >= 1)
    rec, pid, _ = await run_traced(http, sim, "25b_run_getimagesize_binary_text_frame.json")
    assert rec.types() == recorded_types(t)
    await observer.wait_for(lambda fs: len(fs) >= 5)
    assert observer.types()[1:] == ["status", "status", "<binary TEXT>", "status"]
    for f in (rec.of_type("<binary TEXT>")[0], observer.of_type("<binary TEXT>")[0]):
        event, nlen = struct.unpack(">II", f.raw[:8])
        assert (event, f.raw[8:8 + nlen], f.raw[8 + nlen:]) == (
            3, b"2", b"width: 40, height: 30\n batch size: 2")
    entry = await wait_history(http, sim.url, pid)
    name = entry["outputs"]["4"]["images"][0]["filename"]
    async with http.get(f"{sim.url}/view?filename={name}&type=output") as r:
        assert png_pixels(await r.read())[:2] == (40, 30)


async def test_savewebsocket_with_metadata_after_handshake(sim: Simulator,
                                                           http: aiohttp.ClientSession) -> None:
    t = trace("26_run_savewebsocket_progress_binary_with_metadata.json")
    flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    rec, pid, _ = await run_traced(http, sim, "26_run_savewebsocket_progress_binary_with_metadata.json",
                                   first=flags)
    before = [m["msg"] for m in t["ws_messages_before_submit_incl_feature_flags_reply"]]
    assert [f.type for f in rec.frames[:2]] == ["status", "feature_flags"]
    assert rec.frames[1].data == before[1]["data"]
    assert rec.types()[2:] == recorded_types(t)
    recorded_bin = [m for m in t["ws_messages_in_order"] if m["kind"] == "binary"]
    for f, rb in zip(rec.of_type("<binary PREVIEW_IMAGE_WITH_METADATA>"), recorded_bin, strict=True):
        event, mlen = struct.unpack(">II", f.raw[:8])
        meta = json.loads(f.raw[8:8 + mlen])
        assert event == 4 and meta == {**rb["metadata_json"], "prompt_id": pid}
        assert f.raw[8 + mlen:8 + mlen + 8].hex() == rb["image_magic_hex"]


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
        sim: Simulator, http: aiohttp.ClientSession) -> None:
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


# ---------------------------------------------------------------- runtime error (40)

async def test_execution_error_on_corrupt_image(sim: Simulator, http: aiohttp.ClientSession) -> None:
    t = trace("40_run_execution_error_corrupt_image.json")
    async with await upload(http, sim, "probe_corrupt_0789ca.png", b"this is not an image!!!!"):
        pass
    rec, pid, _ = await run_traced(http, sim, "40_run_execution_error_corrupt_image.json")
    assert rec.types() == recorded_types(t)
    err = data_of(rec.frames, "execution_error")[0]
    recorded = next(m["msg"]["data"] for m in t["ws_messages_in_order"]
                    if m["msg"]["type"] == "execution_error")
    assert shape(err) == shape(recorded)
    for key in ("node_id", "node_type", "executed", "exception_type", "current_inputs",
                "current_outputs"):
        assert err[key] == recorded[key], key
    path = sim.env.data_dir / "input" / "probe_corrupt_0789ca.png"
    assert err["exception_message"] == f"cannot identify image file '{path}'\n"
    assert all(isinstance(line, str) for line in err["traceback"])
    entry = await wait_history(http, sim.url, pid)
    assert shape(entry) == shape(next(iter(t["history_after"]["response"]["body"].values())))
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert entry["outputs"] == {} and entry["meta"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_error"


# ---------------------------------------------------------------- queue, interrupt, delete (50, 51)

SLOW = {"ImageBlur": 0.25}


def non_status(frames: list[Frame], pid: str) -> list[str]:
    """Types of one prompt's messages (status broadcasts removed)."""
    out = []
    for f in frames:
        d = f.data if isinstance(f.data, dict) else {}
        if f.type != "status" and d.get("prompt_id") == pid:
            out.append(f.type)
    return out


async def test_queue_delete_front_and_interrupt(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("50_queue_interrupt_delete.json")
    ex = t["exchanges"]
    async with Simulator(data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        rec = await WsRecorder(http, sim.url, "cid-50").connect()
        await rec.wait_for(lambda fs: len(fs) >= 1)

        def body(key: str) -> dict[str, Any]:
            return {**ex[key]["request"]["json"], "client_id": "cid-50"}

        slow = await post_prompt(http, sim, body("post_slow_running"))
        await rec.wait_for(lambda fs: any(f.type == "executing" and f.data.get("node") == "100"
                                          for f in fs))
        pend = [await post_prompt(http, sim, body(f"post_pending_{i}")) for i in range(3)]
        front = await post_prompt(http, sim, body("post_pending_front_true"))
        numbers = [p["number"] for p in pend]
        assert numbers == [slow["number"] + 1 + i for i in range(3)]
        assert front["number"] == -(slow["number"] + 4)
        async with http.get(sim.url + "/queue") as r:
            queue = await r.json()
        assert shape(queue) == shape(ex["get_queue_while_running_and_pending"]["response"]["body"])
        assert [q[1] for q in queue["queue_running"]] == [slow["prompt_id"]]
        n = slow["number"]
        assert [q[0] for q in queue["queue_pending"]] == [-(n + 4), n + 1, n + 3, n + 2]  # heap
        async with http.get(sim.url + "/prompt") as r:
            assert await r.json() == {"exec_info": {"queue_remaining": 5}}
        for ids in ([pend[0]["prompt_id"]], [slow["prompt_id"]], ["nope-not-an-id"]):
            async with http.post(sim.url + "/queue", json={"delete": ids}) as r:
                assert r.status == 200 and await r.read() == b""
        async with http.get(sim.url + "/queue") as r:
            queue = await r.json()
        assert [q[0] for q in queue["queue_pending"]] == [-(n + 4), n + 3, n + 2]
        assert len(queue["queue_running"]) == 1
        async with http.post(sim.url + "/interrupt", json={"prompt_id": pend[1]["prompt_id"]}):
            pass  # not running: ignored
        async with http.post(sim.url + "/interrupt", json={"prompt_id": slow["prompt_id"]}) as r:
            assert r.status == 200 and await r.read() == b""
        await rec.wait_done(slow["prompt_id"])
        interrupted = data_of(rec.frames, "execution_interrupted")[0]
        recorded = ex["history_interrupted"]["response"]["body"]
        assert interrupted["node_id"] == "101" and sorted(interrupted["executed"]) == ["1", "100"]
        assert non_status(rec.frames, slow["prompt_id"])[-3:] == [
            "executing", "execution_interrupted", "executing"]
        h = await wait_history(http, sim.url, slow["prompt_id"])
        assert shape(h) == shape(next(iter(recorded.values())))
        assert h["status"]["messages"][-1][0] == "execution_interrupted"
        assert (h["status"]["status_str"], h["outputs"]) == ("error", {})
        for p in (front, pend[1], pend[2]):
            await rec.wait_done(p["prompt_id"])
        order = [d["prompt_id"] for d in data_of(rec.frames, "execution_start")]
        assert order == [slow["prompt_id"], front["prompt_id"], pend[1]["prompt_id"],
                         pend[2]["prompt_id"]]  # strictly one at a time, in number order
        async with http.get(f"{sim.url}/history/{pend[0]['prompt_id']}") as r:
            assert await r.json() == {}
        assert (await wait_history(http, sim.url, front["prompt_id"]))["status"]["completed"]

        slow2 = await post_prompt(http, sim, body("post_slow_2"))
        await rec.wait_for(lambda fs: any(f.type == "executing" and f.data.get("node") == "100"
                                          and f.data.get("prompt_id") == slow2["prompt_id"]
                                          for f in fs))
        cleared = await post_prompt(http, sim, body("post_pending_for_clear"))
        async with http.post(sim.url + "/queue", json={"clear": True}) as r:
            assert r.status == 200 and await r.read() == b""
        async with http.get(sim.url + "/queue") as r:
            queue = await r.json()
        assert queue["queue_pending"] == [] and len(queue["queue_running"]) == 1
        async with http.post(sim.url + "/interrupt") as r:  # no body: global
            assert r.status == 200
        await rec.wait_done(slow2["prompt_id"])
        h2 = await wait_history(http, sim.url, slow2["prompt_id"])
        assert h2["status"]["messages"][-1][1]["node_id"] == "101"
        async with http.get(f"{sim.url}/history/{cleared['prompt_id']}") as r:
            assert await r.json() == {}
        async with http.post(sim.url + "/interrupt", json={}) as r:  # idle: no effect
            assert r.status == 200
        again = await post_prompt(http, sim, body("post_pending_0"))
        assert (await wait_history(http, sim.url, again["prompt_id"]))["status"]["completed"]
        await rec.close()


@pytest.mark.parametrize("case", ["case1_with_client_id_A", "case2_without_client_id"])
async def test_interrupt_routing(case: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("51_interrupt_who_receives.json")[case]
    async with Simulator(data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        a = await WsRecorder(http, sim.url, "client-a").connect()
        b = await WsRecorder(http, sim.url, "client-b").connect()
        await a.wait_for(lambda fs: len(fs) >= 1)
        await b.wait_for(lambda fs: len(fs) >= 1)
        req = dict(t["post_prompt"]["request"]["json"])
        if "client_id" in req:
            req["client_id"] = "client-a"
        p = await post_prompt(http, sim, req)
        await a.wait_for(lambda fs: sum(f.type == "progress_state" for f in fs) >= 3)
        async with http.post(sim.url + "/interrupt") as r:
            assert r.status == 200
        await wait_history(http, sim.url, p["prompt_id"])
        for rec, key in ((a, "A_types"), (b, "B_types")):
            want = 1 + len(t[key])

            def enough(fs: list[Frame], want: int = want) -> bool:
                return len(fs) >= want
            await rec.wait_for(enough)
            assert rec.types()[1:] == t[key], key
        await a.close()
        await b.close()


# ---------------------------------------------------------------- history endpoints (60)

async def test_history_endpoints(sim: Simulator, http: aiohttp.ClientSession) -> None:
    good = trace("30_prompt_error_k_client_supplied_prompt_id.json")["request"]["json"]["prompt"]
    ids = []
    for i in range(3):
        body = await post_prompt(http, sim, {"prompt": good, "prompt_id": f"p{i}"})
        ids.append(body["prompt_id"])
        await wait_history(http, sim.url, body["prompt_id"])
    async with http.get(sim.url + "/history?max_items=2") as r:
        assert list(await r.json()) == ["p1", "p2"]
    async with http.get(sim.url + "/history?max_items=1&offset=0") as r:
        assert list(await r.json()) == ["p0"]
    async with http.post(sim.url + "/history", json={"delete": ["p1"]}) as r:
        assert r.status == 200 and await r.read() == b""
    for pid in ("p1", "00000000-0000-0000-0000-000000000000"):
        async with http.get(f"{sim.url}/history/{pid}") as r:
            assert await r.json() == {}
    async with http.get(sim.url + "/history") as r:
        assert list(await r.json()) == ["p0", "p2"]
    async with http.post(sim.url + "/history", json={"clear": True}) as r:
        assert r.status == 200
    async with http.get(sim.url + "/history") as r:
        assert await r.json() == {}
    async with http.get(sim.url + "/history?max_items=abc") as r:
        assert r.status == 500


# ---------------------------------------------------------------- kill -9 and restart (70)

async def test_crash_and_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("70_kill9_restart.json")
    async with Simulator(data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        url = sim.url
        a = await WsRecorder(http, url, "client-A").connect()
        b = await WsRecorder(http, url, "observer-B").connect()
        await a.wait_for(lambda fs: len(fs) >= 1)
        done_req = {**t["post_pending_0"]["request"]["json"], "client_id": "client-A"}
        done_req["prompt"]["3"]["inputs"]["filename_prefix"] = "probe_prekill"
        done = await post_prompt(http, sim, done_req)
        await a.wait_done(done["prompt_id"])
        slow = await post_prompt(http, sim, {**t["post_slow"]["request"]["json"],
                                             "client_id": "client-A"})
        pending = [await post_prompt(http, sim, {**t[k]["request"]["json"], "client_id": "client-A"})
                   for k in ("post_pending_0", "post_pending_1")]
        await a.wait_for(lambda fs: any(f.type == "executing" and f.data.get("node") == "100"
                                        for f in fs))
        (sim.env.data_dir / "temp" / "scratch.png").write_bytes(b"x")
        await sim.crash()
        for rec in (a, b):
            closing = await rec.wait_closed()
            assert closing.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert a.frames[-1].type != "execution_interrupted"
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url + "/system_stats"):
                pass
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.ws_connect(url + "/ws?clientId=client-A")
        await sim.restart()
        assert sim.url == url
        after = t["after_restart"]
        async with http.get(url + "/queue") as r:
            assert await r.json() == after["get_queue"]["response"]["body"]
        async with http.get(url + "/prompt") as r:
            assert await r.json() == after["get_prompt"]["response"]["body"]
        async with http.get(url + "/history") as r:
            assert await r.json() == {}
        for pid in [done["prompt_id"], slow["prompt_id"]] + [p["prompt_id"] for p in pending]:
            async with http.get(f"{url}/history/{pid}") as r:
                assert await r.json() == {}
        async with http.get(url + "/view?filename=probe_prekill_00001_.png&type=output") as r:
            assert r.status == 200
        assert not (sim.env.data_dir / "temp" / "scratch.png").exists()
        again = await WsRecorder(http, url, "client-A").connect()
        await again.wait_for(lambda fs: len(fs) >= 1)
        recorded = [m["msg"] for m in after["reconnect_same_clientId_messages"]]
        assert [f.type for f in again.frames] == [m["type"] for m in recorded] == ["status"]
        assert again.frames[0].data == {**recorded[0]["data"], "sid": "client-A"}
        req = {**after["post_prompt_after_restart_number_resets"]["request"]["json"],
               "client_id": "client-A"}
        body = await post_prompt(http, sim, req)
        assert body["number"] == 0
        await again.wait_done(body["prompt_id"])
        assert again.types() == after["first_run_after_restart_ws_types"]
        assert sim.prompts_received[-1] == body["prompt_id"]
        for rec in (a, b, again):
            await rec.close()


# ---------------------------------------------------------------- reconnect and corners (90)

async def test_reconnect_mid_run_and_corners(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("90_extra_reconnect_and_corners.json")
    async with Simulator(data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        anon = await WsRecorder(http, sim.url).connect()
        await anon.wait_for(lambda fs: len(fs) >= 1)
        assert re.fullmatch(r"[0-9a-f]{32}", anon.frames[0].data["sid"])
        assert shape(anon.frames[0].data) == shape(t["ws_without_clientId_first_message"]["data"])
        a = await WsRecorder(http, sim.url, "reconnect-1").connect()
        await a.wait_for(lambda fs: len(fs) >= 1)
        slow = await post_prompt(http, sim, t["post_slow"]["request"]["json"] | {
            "client_id": "reconnect-1"})
        nxt = await post_prompt(http, sim, t["post_with_unconnected_client_id"]["request"]["json"]
                                | {"client_id": "reconnect-1"})
        await a.wait_for(lambda fs: any(f.type == "executing" and f.data.get("node") == "100"
                                        for f in fs))
        for pid in (slow["prompt_id"], nxt["prompt_id"]):
            async with http.get(f"{sim.url}/history/{pid}") as r:
                assert await r.json() == {}
        await a.close()
        b = await WsRecorder(http, sim.url, "reconnect-1").connect()
        await b.wait_done(nxt["prompt_id"])
        recorded_b = [m["msg"] for m in t["socket_B_same_clientId_reconnected_mid_run_messages"]]
        assert b.frames[1].data == {"node": "100"} == recorded_b[1]["data"]
        assert b.types() == [m["type"] for m in recorded_b]
        nobody = await post_prompt(http, sim, t["post_with_unconnected_client_id"]["request"]["json"])
        assert (await wait_history(http, sim.url, nobody["prompt_id"]))["prompt"][3] == {
            "client_id": "nobody-listens"}
        numbered = await post_prompt(http, sim, t["post_with_explicit_number"]["request"]["json"])
        assert numbered["number"] == 5.0 and isinstance(numbered["number"], float)
        async with http.get(sim.url + "/api/queue") as r:
            assert shape(await r.json()) == shape(t["api_prefix_queue"]["response"]["body"])
        api = await post_prompt(http, sim, t["api_prefix_prompt_post"]["request"]["json"])
        assert api["number"] == nobody["number"] + 1  # explicit numbers do not advance it
        async with http.get(sim.url + "/features") as r:
            assert await r.json() == t["features"]["response"]["body"]
        async with http.post(sim.url + "/free", json=t["post_free"]["request"]["json"]) as r:
            assert r.status == 200 and await r.read() == b""
        for rec in (anon, b):
            await rec.close()
