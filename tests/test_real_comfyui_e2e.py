"""comfyq end to end against a REAL ComfyUI (set COMFYUI_TEST_URL; skipped otherwise).

Model-free workflows only (built-in image nodes), so a CPU-only ComfyUI runs them.
"""

from __future__ import annotations

import asyncio
import os
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import serve

from comfyq.config import Settings
from comfyq.services import Services
from comfyq.store import Job, NewJob
from comfyq.store.model import State

URL = os.environ.get("COMFYUI_TEST_URL", "")
pytestmark = [
    pytest.mark.real_comfyui,
    pytest.mark.skipif(not URL, reason="COMFYUI_TEST_URL is not set"),
]


def png(w: int, h: int, rgb: tuple[int, int, int]) -> bytes:
    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
async def image_server() -> AsyncIterator[str]:
    async def cat(request: web.Request) -> web.Response:
        return web.Response(body=png(40, 30, (200, 10, 10)), content_type="image/png")

    app = web.Application()
    app.router.add_get("/cat.png", cat)
    server = await serve.start(app)
    yield serve.base_url(server) + "/cat.png"
    await server.close()


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Services]:
    s = Settings(
        database=str(tmp_path / "q.db"),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "c"),
        url_allowlist=["127.0.0.1"],
        backend_probe_interval=0.5,
    )
    services = Services(s, backends=[URL])
    await services.start()
    assert await services.pool.wait_ready(30)
    yield services
    await services.stop()


async def run(svc: Services, job_id: str, job_input: dict[str, Any]) -> tuple[Job, list[str]]:
    sub = svc.bus.subscribe(job_id)
    await svc.store.create(
        NewJob(
            id=job_id,
            payload={"input": job_input},
            payload_hash=job_id,
            kind=job_input.get("modifier", "workflow"),
        ),
        100,
    )
    kinds = []
    async with asyncio.timeout(120):
        while True:
            ev = await sub.get(1)
            if ev is not None:
                kinds.append(ev.kind)
            job = await svc.store.get(job_id)
            assert job is not None
            if job.terminal:
                return job, kinds


async def test_raw_workflow_runs_with_progress_and_output(svc: Services) -> None:
    color = int.from_bytes(os.urandom(3), "big")
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "comfyq_real"},
        },
    }
    job, kinds = await run(svc, "real-raw", {"workflow_json": wf})
    assert job.state == State.COMPLETED, job.error
    assert "progress" in kinds
    (out,) = await svc.store.outputs("real-raw")
    assert out["mimetype"] == "image/png" and Path(out["local_path"]).read_bytes()[:4] == b"\x89PNG"


async def test_raw_workflow_with_an_image_url(svc: Services, image_server: str) -> None:
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_server}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "comfyq_url"},
        },
    }
    job, _ = await run(svc, "real-url", {"workflow_json": wf})
    assert job.state == State.COMPLETED, job.error
    assert job.prepared is not None and job.prepared["inputs"][0]["name"].startswith("cq_")
    assert len(await svc.store.outputs("real-url")) == 1


async def test_modifier_with_modifications(svc: Services, image_server: str) -> None:
    job, _ = await run(
        svc,
        "real-mod",
        {
            "modifier": "ImageEffects",
            "modifications": {
                "input_image": image_server,
                "width": 48,
                "height": 32,
                "invert": True,
                "blur_radius": 2,
            },
        },
    )
    assert job.state == State.COMPLETED, job.error
    assert len(await svc.store.outputs("real-mod")) == 1
