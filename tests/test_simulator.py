"""Simulator features beyond the recorded traces: faults, checkpoint pipeline, files, CLI."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.sim import WsRecorder, wait_history

from comfyq.sim import Simulator
from comfyq.sim.generation import OLD
from comfyq.sim.png import encode_png, encode_webp_solid, sniff_image


@pytest.fixture
def comfyui_version() -> str:
    """The recorded 0.3.64 traffic is this file's reference (see test_simulator_newer for 0.38)."""
    return OLD


Workflow = dict[str, dict[str, Any]]


def invert(prefix: str, color: int = 0x102030, size: int = 8, batch: int = 1) -> Workflow:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def text2image(
    seed: int = 1,
    steps: int = 4,
    ckpt: str = "v1-5-pruned-emaonly.safetensors",
    prefix: str = "t2i",
) -> Workflow:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 68, "height": 64, "batch_size": 2},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


async def submit(
    http: aiohttp.ClientSession,
    sim: Simulator,
    wf: Workflow,
    client_id: str | None = None,
    status: int = 200,
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": wf}
    if client_id is not None:
        body["client_id"] = client_id
    async with http.post(sim.url + "/prompt", json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def run(
    http: aiohttp.ClientSession, sim: Simulator, wf: Workflow, client_id: str = "tester"
) -> tuple[WsRecorder, dict[str, Any]]:
    rec = await WsRecorder(http, sim.url, client_id).connect()
    await rec.wait_for(lambda fs: len(fs) >= 1)
    body = await submit(http, sim, wf, client_id)
    await rec.wait_done(body["prompt_id"])
    await rec.close()
    return rec, await wait_history(http, sim.url, body["prompt_id"])


def pixels(path: Path) -> tuple[int, int, tuple[int, int, int]]:
    data = path.read_bytes()
    info = sniff_image(data)
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == info.height * (1 + 3 * info.width)
    return info.width, info.height, (raw[1], raw[2], raw[3])


# ---------------------------------------------------------------- fault injection


async def test_fail_nodes_by_class_and_by_id(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.fail_nodes["ImageInvert"] = ("RuntimeError", "boom")
    rec, entry = await run(http, sim, invert("f1"))
    assert rec.types() == [
        "status",
        "status",
        "status",
        "execution_start",
        "execution_cached",
        "progress_state",
        "executing",
        "progress_state",
        "progress_state",
        "executing",
        "execution_error",
        "status",
        "executing",
    ]
    err = rec.of_type("execution_error")[0].data
    assert (err["node_id"], err["node_type"], err["exception_type"]) == (
        "2",
        "ImageInvert",
        "RuntimeError",
    )
    assert err["exception_message"] == "boom\n" and err["executed"] == ["1"]
    assert err["current_inputs"]["image"][0].startswith("SimImage(")
    assert err["current_outputs"] == ["1", "2", "3"]
    assert all(isinstance(x, str) for x in err["traceback"])
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    sim.fail_nodes.clear()
    sim.fail_nodes["3"] = ("OSError", "disk full")
    rec, entry = await run(http, sim, invert("f2"))
    err = rec.of_type("execution_error")[0].data
    assert err["node_id"] == "3" and err["exception_type"] == "OSError"
    assert set(err["current_inputs"]) == {"images", "filename_prefix", "prompt", "extra_pnginfo"}
    # the node that failed before produced nothing to cache; its input did
    assert rec.of_type("execution_cached")[0].data["nodes"] == ["1"]
    sim.fail_nodes = {}
    _, entry = await run(http, sim, invert("f2"))
    assert entry["status"]["status_str"] == "success"


async def test_reject_next_and_prompts_received(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.reject_next = [
        (500, "500 Internal Server Error\n\nServer got itself in trouble"),
        (400, {"error": {"type": "x"}, "node_errors": {}}),
    ]
    async with http.post(sim.url + "/prompt", json={"prompt": invert("r")}) as r:
        assert r.status == 500 and r.headers["Content-Type"].startswith("text/plain")
        assert r.headers.get("Connection") == "close"
    async with http.post(sim.url + "/prompt", json={"prompt": invert("r")}) as r:
        assert r.status == 400 and await r.json() == {"error": {"type": "x"}, "node_errors": {}}
    assert sim.reject_next == [] and sim.prompts_received == []
    body = await submit(http, sim, invert("r"))
    assert body["number"] == 0  # injected rejections do not touch the server's state
    await submit(http, sim, {}, status=400)
    assert sim.prompts_received == [body["prompt_id"]]


async def test_stall_ws_drops_messages(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec = await WsRecorder(http, sim.url, "staller").connect()
    await rec.wait_for(lambda fs: len(fs) >= 1)
    sim.stall_ws = True
    first = await submit(http, sim, invert("s1"), "staller")
    await wait_history(http, sim.url, first["prompt_id"])
    sim.stall_ws = False
    second = await submit(http, sim, invert("s2"), "staller")
    await rec.wait_done(second["prompt_id"])
    assert all(first["prompt_id"] not in json.dumps(f.data) for f in rec.frames)
    assert rec.types()[:4] == ["status", "status", "status", "execution_start"]
    await rec.close()


async def test_drop_websockets_cuts_without_close_frame(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    rec = await WsRecorder(http, sim.url, "dropped").connect()
    await rec.wait_for(lambda fs: len(fs) >= 1)
    sim.drop_websockets()
    msg = await rec.wait_closed()
    assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    async with http.get(sim.url + "/system_stats") as r:
        assert r.status == 200
    again = await WsRecorder(http, sim.url, "dropped").connect()
    await again.wait_for(lambda fs: len(fs) >= 1)
    body = await submit(http, sim, invert("d"), "dropped")
    await again.wait_done(body["prompt_id"])
    await again.close()


async def test_view_delay(sim: Simulator, http: aiohttp.ClientSession) -> None:
    _, entry = await run(http, sim, invert("v"))
    name = entry["outputs"]["3"]["images"][0]["filename"]
    sim.view_delay = 0.2
    t0 = time.monotonic()
    async with http.get(f"{sim.url}/view?filename={name}&type=output") as r:
        assert r.status == 200 and (await r.read())[:4] == b"\x89PNG"
    assert time.monotonic() - t0 >= 0.19


# ---------------------------------------------------------------- model-free text2image


async def test_text2image_pipeline_progress_and_cache(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    rec, entry = await run(http, sim, text2image(seed=1, steps=4))
    progress = [(f.data["value"], f.data["max"], f.data["node"]) for f in rec.of_type("progress")]
    assert progress == [(1, 4, "3"), (2, 4, "3"), (3, 4, "3"), (4, 4, "3")]
    order = [f.data["node"] for f in rec.of_type("executing") if f.data["node"] is not None]
    assert order[-2:] == ["8", "9"] and sorted(order) == sorted(text2image())
    images = entry["outputs"]["9"]["images"]
    assert [i["filename"] for i in images] == ["t2i_00001_.png", "t2i_00002_.png"]
    out = sim.env.data_dir / "output"
    w, h, rgb1 = pixels(out / "t2i_00001_.png")
    assert (w, h) == (64, 64)  # latents are 1/8 size: 68 rounds down
    rec, _ = await run(http, sim, text2image(seed=1, steps=4))
    assert rec.of_type("execution_cached")[0].data["nodes"] == ["4", "6", "7", "5", "3", "8", "9"]
    rec, entry = await run(http, sim, text2image(seed=2, steps=4))
    assert rec.of_type("execution_cached")[0].data["nodes"] == ["4", "6", "7", "5"]
    assert pixels(out / entry["outputs"]["9"]["images"][0]["filename"])[2] != rgb1


async def test_unknown_checkpoint_is_value_not_in_list(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    body = await submit(http, sim, text2image(ckpt="nope.safetensors"), status=400)
    err = body["node_errors"]["4"]["errors"][0]
    assert err["type"] == "value_not_in_list"
    assert err["details"].startswith("ckpt_name: 'nope.safetensors' not in [")
    ckpts = sim.env.data_dir / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "nope.safetensors").write_bytes(b"")
    await submit(http, sim, text2image(ckpt="nope.safetensors"))


async def test_progress_steps_for_slow_nodes(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    wf: Workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1},
        },
        "2": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    async with Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", progress_steps=3) as sim:
        rec, entry = await run(http, sim, wf)
    assert [(f.data["value"], f.data["max"]) for f in rec.of_type("progress")] == [
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    ticks = [
        f.data["nodes"]["2"]["value"]
        for f in rec.of_type("progress_state")
        if "2" in f.data["nodes"] and "3" not in f.data["nodes"]
    ]
    assert ticks == [0.0, 1, 2, 3, 3]  # start, three ticks, finish
    assert entry["outputs"]["3"]["images"][0]["type"] == "temp"


async def test_node_durations_and_interrupt_at_progress_tick(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with Simulator(
        comfyui_version=OLD, data_dir=tmp_path / "c", node_durations={"KSampler": 5.0}
    ) as sim:
        rec = await WsRecorder(http, sim.url, "ks").connect()
        body = await submit(http, sim, text2image(steps=50), "ks")
        await rec.wait_for(lambda fs: bool(rec.of_type("progress")))
        async with http.post(sim.url + "/interrupt", json={"prompt_id": body["prompt_id"]}):
            pass
        await rec.wait_done(body["prompt_id"], timeout=5.0)
        stop = rec.of_type("execution_interrupted")[0].data
        assert stop["node_id"] == "3" and len(rec.of_type("progress")) < 50
        await rec.close()


# ---------------------------------------------------------------- files


async def test_save_counters_subfolders_batches_and_traversal(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    out = sim.env.data_dir / "output"
    (out / "keep_00007_.png").write_bytes(b"x")
    (out / "keep_0000x_.png").write_bytes(b"x")
    _, entry = await run(http, sim, invert("keep"))
    assert entry["outputs"]["3"]["images"][0]["filename"] == "keep_00008_.png"
    _, entry = await run(http, sim, invert("sub/dir/pic_%batch_num%", batch=3, color=7))
    images = entry["outputs"]["3"]["images"]
    assert [(i["filename"], i["subfolder"]) for i in images] == [
        ("pic_0_00001_.png", "sub/dir"),
        ("pic_1_00002_.png", "sub/dir"),
        ("pic_2_00003_.png", "sub/dir"),
    ]
    assert pixels(out / "sub" / "dir" / "pic_1_00002_.png")[2] == (255, 255, 248)
    async with http.get(
        f"{sim.url}/view?filename=pic_0_00001_.png&type=output&subfolder=sub/dir"
    ) as r:
        assert r.status == 200
    rec, entry = await run(http, sim, invert("../escape"))
    err = rec.of_type("execution_error")[0].data
    assert (
        err["exception_type"] == "Exception"
        and "outside the output folder" in err["exception_message"]
    )


async def test_loadimage_reruns_when_file_changes(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    async def put(data: bytes) -> None:
        form = aiohttp.FormData()
        form.add_field("overwrite", "true")
        form.add_field("image", data, filename="in.png", content_type="image/png")
        async with http.post(sim.url + "/upload/image", data=form) as r:
            assert r.status == 200

    wf: Workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "load"}},
    }
    await put(encode_png(6, 4, (10, 20, 30)))
    _, entry = await run(http, sim, wf)
    out = sim.env.data_dir / "output"
    assert pixels(out / entry["outputs"]["2"]["images"][0]["filename"]) == (6, 4, (10, 20, 30))
    rec, _ = await run(http, sim, wf)
    assert rec.of_type("execution_cached")[0].data["nodes"] == ["1", "2"]
    await put(encode_png(3, 3, (1, 1, 1)))
    rec, entry = await run(http, sim, wf)
    assert rec.of_type("execution_cached")[0].data["nodes"] == []
    assert pixels(out / entry["outputs"]["2"]["images"][0]["filename"]) == (3, 3, (1, 1, 1))


async def test_webp_preview_decodes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    _, entry = await run(http, sim, invert("w", color=0x000000, size=10))
    name = entry["outputs"]["3"]["images"][0]["filename"]
    async with http.get(f"{sim.url}/view?filename={name}&type=output&preview=webp;50") as r:
        assert r.headers["Content-Type"] == "image/webp"
        assert r.headers["Content-Disposition"] == f'filename="{name}"'
        webp = await r.read()
    assert webp == encode_webp_solid(10, 10, (255, 255, 255))
    (sim.env.data_dir / "input" / "raw.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    async with http.get(f"{sim.url}/view?filename=raw.png&type=input&preview=webp;50") as r:
        assert r.headers["Content-Type"] == "image/png"  # not one of ours: served unchanged
    lib = ctypes.util.find_library("webp")
    if lib is None:
        return  # the byte-level equality above still pins the encoder
    webp_lib = ctypes.CDLL(lib)
    webp_lib.WebPDecodeRGBA.restype = ctypes.POINTER(ctypes.c_uint8)
    w, h = ctypes.c_int(), ctypes.c_int()
    px = webp_lib.WebPDecodeRGBA(webp, len(webp), ctypes.byref(w), ctypes.byref(h))
    assert px and (w.value, h.value) == (10, 10)
    assert [px[i] for i in range(4)] == [255, 255, 255, 255]
    assert [px[399 - i] for i in range(4)] == [255, 255, 255, 255]


async def test_free_memory_empties_cache_and_max_history(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", max_history=3) as sim:
        ids = []
        for i in range(5):
            _, entry = await run(http, sim, invert(f"h{i}"))
            ids.append(entry["prompt"][1])
        async with http.get(sim.url + "/history") as r:
            assert list(await r.json()) == ids[2:]
        async with http.post(sim.url + "/free", json={"free_memory": True}) as r:
            assert r.status == 200
        rec, _ = await run(http, sim, invert("h4"))
        assert rec.of_type("execution_cached")[0].data["nodes"] == []


async def test_bad_bodies_are_500(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for path in ("/prompt", "/queue", "/history", "/free"):
        async with http.post(sim.url + path, data="{broken") as r:
            assert r.status == 500 and r.headers.get("Connection") == "close", path
    async with http.post(sim.url + "/prompt", json=[]) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "no_prompt"
    async with http.post(sim.url + "/prompt", json={"prompt": {"1": 5}}) as r:
        assert r.status == 500


async def test_many_prompts_in_number_order(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec = await WsRecorder(http, sim.url, "many").connect()
    await rec.wait_for(lambda fs: len(fs) >= 1)
    bodies = await asyncio.gather(
        *(submit(http, sim, invert("m", color=i), "many") for i in range(200))
    )
    by_number = [b["prompt_id"] for b in sorted(bodies, key=lambda b: b["number"])]
    await rec.wait_done(by_number[-1])
    started = [f.data["prompt_id"] for f in rec.of_type("execution_start")]
    assert started == by_number
    assert len(list((sim.env.data_dir / "output").iterdir())) == 200
    await rec.close()


# ---------------------------------------------------------------- CLI


async def test_cli_ready_line_and_sigterm(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyq.sim",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--node-duration",
        "0",
        "--progress-steps",
        "2",
        "--comfyui-version",
        OLD,
        "--data-dir",
        str(tmp_path / "d"),
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert line.startswith("SIMULATOR_READY http://127.0.0.1:")
        url = line.split()[1]
        async with http.get(url + "/system_stats") as r:
            assert (await r.json())["system"]["comfyui_version"] == "0.3.64"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert (tmp_path / "d" / "output").is_dir()


async def test_upload_mask_and_load_image_mask(sim: Simulator, http: aiohttp.ClientSession) -> None:
    _, entry = await run(http, sim, invert("orig"))
    original = entry["outputs"]["3"]["images"][0]
    form = aiohttp.FormData()
    form.add_field("original_ref", json.dumps(original))
    form.add_field(
        "image", encode_png(8, 8, (0, 0, 0)), filename="mask.png", content_type="image/png"
    )
    async with http.post(sim.url + "/upload/mask", data=form) as r:
        assert r.status == 200
        assert await r.json() == {"name": "mask.png", "subfolder": "", "type": "input"}
    form = aiohttp.FormData()
    form.add_field("image", b"x", filename="m2.png", content_type="image/png")
    async with http.post(sim.url + "/upload/mask", data=form) as r:
        assert r.status == 500  # ComfyUI fails on a missing original_ref
    wf: Workflow = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "2": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "m"}},
    }
    _, entry = await run(http, sim, wf)
    assert entry["status"]["status_str"] == "success"
    wf["2"]["inputs"]["width"] = ["1", 0]  # MASK into INT
    body = await submit(http, sim, wf, status=400)
    assert body["node_errors"]["2"]["errors"][0]["type"] == "return_type_mismatch"


async def test_reconnect_while_old_socket_open(sim: Simulator, http: aiohttp.ClientSession) -> None:
    old = await WsRecorder(http, sim.url, "twice").connect()
    await old.wait_for(lambda fs: len(fs) >= 1)
    new = await WsRecorder(http, sim.url + "/api", "twice").connect()
    await new.wait_for(lambda fs: len(fs) >= 1)
    body = await submit(http, sim, invert("tw1"), "twice")
    await new.wait_done(body["prompt_id"])
    assert "execution_start" not in old.types()  # replaced in routing, but still open
    await old.close()
    # ComfyUI's handler pops whatever is registered under the clientId when the old socket
    # ends, so the newer socket gets no more prompt messages (status broadcasts still come).
    second = await submit(http, sim, invert("tw2"), "twice")
    await wait_history(http, sim.url, second["prompt_id"])
    watcher = await WsRecorder(http, sim.url, "watcher").connect()
    third = await submit(http, sim, invert("tw3"), "watcher")
    await watcher.wait_done(third["prompt_id"])
    assert all(
        second["prompt_id"] not in json.dumps(f.data) for f in new.frames if f.type != "status"
    )
    for rec in (new, watcher):
        await rec.close()


async def test_classic_cache_keeps_only_the_last_prompts_nodes(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    # ComfyUI's default cache drops every entry the current prompt does not use: A, B, A
    # re-runs A completely, while A, A is fully cached.
    await run(http, sim, invert("a", color=1))
    rec, _ = await run(http, sim, invert("a", color=1))
    assert rec.of_type("execution_cached")[0].data["nodes"] == ["1", "2", "3"]
    await run(http, sim, invert("b", color=2))
    rec, _ = await run(http, sim, invert("a", color=1))
    assert rec.of_type("execution_cached")[0].data["nodes"] == []


async def test_compressed_socket_gets_the_same_messages(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    # A socket that negotiated permessage-deflate cannot take the ready-made frames of the
    # coalescing path: aiohttp writes its messages. Same messages, same order, next to a plain
    # socket that gets the broadcasts through the fast path.
    async def record(client_id: str, compress: int) -> tuple[list[str], str]:
        ws = await http.ws_connect(f"{sim.url}/ws?clientId={client_id}", compress=compress)
        assert ws.compress == compress  # negotiated (or not) as asked
        types: list[str] = []
        first = json.loads((await ws.receive()).data)
        assert first["type"] == "status"
        body = await submit(http, sim, invert(f"z{compress}", color=compress + 1), client_id)
        while True:
            msg = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
            types.append(msg["type"])
            data = msg["data"]
            if msg["type"] == "executing" and data["node"] is None:
                assert data["prompt_id"] == body["prompt_id"]
                break
        await ws.close()
        return types, body["prompt_id"]

    bystander = await WsRecorder(http, sim.url, "bystander").connect()
    await bystander.wait_for(lambda fs: len(fs) >= 1)
    plain, _ = await record("plain", 0)
    deflated, pid = await record("deflated", 15)
    assert deflated == plain and plain.count("progress_state") == 6
    await bystander.wait_for(lambda fs: sum(f.type == "status" for f in fs) >= 7)
    await wait_history(http, sim.url, pid)
    await bystander.close()
