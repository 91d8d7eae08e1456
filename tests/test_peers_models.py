"""Models and LoRAs by URL (issue 15, item 6): downloaded from a loopback file server into the
local ComfyUI's models folder before the workflow runs; shared downloads, sha256 checks, a size
cap, an LRU budget that never touches files comfyq did not download, and a 400 without a models
folder."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.servers import MakeServer, Server, wait_healthy

from comfyq.sim import Simulator


def fake_model(seed: int, size: int = 600) -> bytes:
    """A small but well-formed .safetensors file (libmagic-independent type check passes)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    body = struct.pack("<Q", len(header)) + header + struct.pack("<2f", seed, seed)
    return body + bytes([seed % 251]) * max(0, size - len(body))


@dataclass
class FileServer:
    url: str
    files: dict[str, bytes]
    hits: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def files() -> AsyncIterator[FileServer]:
    fs = FileServer("", {})
    fs.gate.set()

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        fs.hits[name] = fs.hits.get(name, 0) + 1
        await fs.gate.wait()
        if name not in fs.files:
            raise web.HTTPNotFound()
        return web.Response(body=fs.files[name], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/m/{name}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fs.url = str(server.make_url("")).rstrip("/")
    yield fs
    fs.gate.set()  # a test that failed while holding a download must not hang the teardown
    await server.close()


def models_dir(sim: Simulator) -> Path:
    assert sim.data_dir is not None
    return sim.data_dir / "models"


def t2i(models: list[dict[str, Any]], ckpt: str, seed: int = 1) -> dict[str, Any]:
    return {
        "input": {
            "modifier": "Text2Image",
            "modifications": {
                "ckpt_name": ckpt,
                "steps": 1,
                "width": 64,
                "height": 64,
                "seed": seed,
            },
            "models": models,
        }
    }


async def _server(make_server: MakeServer, sim: Simulator, **kw: Any) -> Server:
    srv = await make_server(
        comfyui_models_dir=str(models_dir(sim)), url_allowlist=["127.0.0.1"], **kw
    )
    await wait_healthy(srv)
    return srv


async def _result(srv: Server, job_id: str) -> dict[str, Any]:
    async with srv.session.get(srv.u(f"/result/{job_id}")) as r:
        res: dict[str, Any] = await r.json()
        return res


async def _until_final(srv: Server, job_id: str) -> dict[str, Any]:
    while True:
        res = await _result(srv, job_id)
        if res["status"] in ("completed", "failed", "cancelled"):
            return res
        await asyncio.sleep(0.05)


async def test_a_model_is_downloaded_verified_and_named_by_the_workflow(
    make_server: MakeServer, simulator: Simulator, files: FileServer
) -> None:
    data = fake_model(1)
    files.files["fake.safetensors"] = data
    srv = await _server(make_server, simulator)
    ref = {
        "url": f"{files.url}/m/fake.safetensors",
        "folder": "checkpoints",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    async with srv.session.post(srv.u("/generate/sync"), json=t2i([ref], "fake.safetensors")) as r:
        assert r.status == 200, await r.text()
    placed = models_dir(simulator) / "checkpoints" / "fake.safetensors"
    assert placed.read_bytes() == data
    # Asked again: reused, not fetched again.
    async with srv.session.post(
        srv.u("/generate/sync"), json=t2i([ref], "fake.safetensors", seed=2)
    ) as r:
        assert r.status == 200
    assert files.hits["fake.safetensors"] == 1
    manifest = json.loads((models_dir(simulator) / ".comfyq-models.json").read_text())
    assert manifest["files"]["checkpoints/fake.safetensors"]["size"] == len(data)


async def test_concurrent_jobs_share_one_download(
    make_server: MakeServer, simulator: Simulator, files: FileServer
) -> None:
    files.files["lora.safetensors"] = fake_model(2)
    files.gate.clear()  # the server holds the download until both jobs are waiting for it
    srv = await _server(make_server, simulator)
    ref = {"url": f"{files.url}/m/lora.safetensors", "folder": "loras"}
    ids = []
    for seed in (1, 2):
        body = t2i([ref], "v1-5-pruned-emaonly.safetensors", seed)
        body["input"]["request_id"] = f"share-{seed}"
        async with srv.session.post(srv.u("/generate"), json=body) as r:
            assert r.status == 202
            ids.append((await r.json())["id"])
    models = srv.services.models
    assert models is not None
    while not (files.hits.get("lora.safetensors") and "loras/lora.safetensors" in models._inflight):
        await asyncio.sleep(0.02)
    while [(await _result(srv, i))["status"] for i in ids] != ["processing", "processing"]:
        await asyncio.sleep(0.02)
    files.gate.set()
    for i in ids:
        res = await _until_final(srv, i)
        assert res["status"] == "completed", res
    assert files.hits["lora.safetensors"] == 1
    assert models.downloads == 1


async def test_sha256_mismatch_and_size_cap_fail_the_job_by_name(
    make_server: MakeServer, simulator: Simulator, files: FileServer
) -> None:
    files.files["a.safetensors"] = fake_model(3)
    files.files["big.safetensors"] = fake_model(4, size=5000)
    srv = await _server(make_server, simulator, model_max_bytes=4096)
    wrong = {"url": f"{files.url}/m/a.safetensors", "folder": "loras", "sha256": "0" * 64}
    async with srv.session.post(srv.u("/generate/sync"), json=t2i([wrong], "x")) as r:
        res = await r.json()
    assert res["status"] == "failed" and "sha256" in res["error"]["message"]
    assert res["error"]["fields"][0]["path"] == "$.input.models[0]"
    assert not (models_dir(simulator) / "loras" / "a.safetensors").exists()
    big = {"url": f"{files.url}/m/big.safetensors", "folder": "loras"}
    async with srv.session.post(srv.u("/generate/sync"), json=t2i([big], "x")) as r:
        res = await r.json()
    assert res["status"] == "failed" and "4096 byte limit" in res["error"]["message"]
    assert not (models_dir(simulator) / "loras" / "big.safetensors").exists()


async def test_lru_budget_evicts_only_what_comfyq_downloaded(
    make_server: MakeServer, simulator: Simulator, files: FileServer
) -> None:
    mine = models_dir(simulator) / "loras" / "users-own.safetensors"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_bytes(fake_model(9, size=5000))  # the operator's: over the budget on its own
    for n in (1, 2, 3):
        files.files[f"m{n}.safetensors"] = fake_model(10 + n)
    # A budget of ~1300 bytes: two 600-byte downloads fit, a third evicts the oldest.
    srv = await _server(make_server, simulator, model_cache_gb=1300 / 1024**3)
    for n in (1, 2, 3):
        ref = {"url": f"{files.url}/m/m{n}.safetensors", "folder": "loras"}
        body = t2i([ref], "v1-5-pruned-emaonly.safetensors", n)
        async with srv.session.post(srv.u("/generate/sync"), json=body) as r:
            assert r.status == 200, await r.text()
        if n == 2:  # m1 used again: m2 is now the least recently used
            ref1 = {"url": f"{files.url}/m/m1.safetensors", "folder": "loras"}
            body = t2i([ref1], "v1-5-pruned-emaonly.safetensors", 7)
            async with srv.session.post(srv.u("/generate/sync"), json=body) as r:
                assert r.status == 200
    loras = models_dir(simulator) / "loras"
    assert (loras / "m1.safetensors").exists() and (loras / "m3.safetensors").exists()
    assert not (loras / "m2.safetensors").exists()
    assert mine.exists()  # never touched, although it alone is over the budget
    assert srv.services.models is not None and srv.services.models.evicted == [
        "loras/m2.safetensors"
    ]
    async with srv.session.get(srv.u("/metrics")) as r:
        metrics = await r.text()
    assert "comfyq_model_evictions_total 1.0" in metrics
    assert "comfyq_model_downloads_total 3.0" in metrics
    assert f"comfyq_model_cache_bytes {2 * len(files.files['m1.safetensors'])}.0" in metrics


async def test_models_are_refused_at_admission_without_a_models_dir_or_with_bad_names(
    make_server: MakeServer, simulator: Simulator, files: FileServer
) -> None:
    plain = await make_server()
    ref = {"url": f"{files.url}/m/x.safetensors", "folder": "loras"}
    async with plain.session.post(plain.u("/generate"), json=t2i([ref], "x")) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["fields"][0]["path"] == "$.input.models" and "COMFYUI_MODELS_DIR" in err["message"]
    srv = await _server(make_server, simulator)
    for bad, path in (
        ({"url": f"{files.url}/m/x.safetensors", "folder": "nope"}, "$.input.models[0].folder"),
        ({"url": "ftp://example.com/x.safetensors", "folder": "loras"}, "$.input.models[0].url"),
        ({"url": "http://169.254.169.254/x", "folder": "loras"}, "$.input.models[0].url"),
        (
            {"url": f"{files.url}/m/x", "folder": "loras", "filename": "../../etc/x"},
            "$.input.models[0].filename",
        ),
        (
            {"url": f"{files.url}/m/x", "folder": "loras", "sha256": "abc"},
            "$.input.models[0].sha256",
        ),
    ):
        async with srv.session.post(srv.u("/generate"), json=t2i([bad], "x")) as r:
            assert r.status == 400, bad
            assert (await r.json())["error"]["fields"][0]["path"] == path, bad
    async with srv.session.get(srv.u("/jobs")) as r:
        assert (await r.json())["jobs"] == []
