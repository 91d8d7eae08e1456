"""The official Comfy API v2 SDK (comfy-sdk, sync and async) drives comfyq with the simulator as
ComfyUI: assets uploaded by the SDK, set_input, run, outputs downloaded and equal to what the
simulator wrote; events; cancel; idempotent resubmission refused."""

from __future__ import annotations

import asyncio
import io
import itertools
from pathlib import Path
from typing import Any

import pytest
from comfy_sdk import AsyncComfy, Comfy, IdempotencyKeyReuse, MissingAsset, WorkflowFormatUi
from comfy_sdk.events import Progress, StatusChange
from PIL import Image
from support.servers import MakeServer, ThreadServer, wait_healthy
from support.v2 import check

from comfyq.store.model import Stage, State

_colors = itertools.count(40)


def png(color: tuple[int, int, int], size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def invert_graph(prefix: str) -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage; node 1's image is set through the SDK."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def sim_output(sim_dir: Path, name: str) -> bytes:
    return (sim_dir / "output" / name).read_bytes()


@pytest.fixture
def sdk_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    srv = ThreadServer(tmp_path / "v2sdk").start()
    monkeypatch.setenv("COMFY_BASE_URL", srv.url)
    monkeypatch.delenv("COMFY_API_KEY", raising=False)
    try:
        yield srv
    finally:
        srv.stop()


def test_sync_sdk_runs_a_workflow_with_an_uploaded_asset(
    sdk_server: ThreadServer, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(png((200, 10, 30)))
    with Comfy() as client:
        wf = client.workflows.from_json(invert_graph("sdk_sync"))
        asset = client.assets.from_file(photo)
        wf.set_input("1", "image", asset)
        job = client.run(wf, timeout=60)
        assert job.status == "succeeded"
        assert asset.created_new is True and asset.id
        outs = job.get_outputs("3")
        assert len(outs) == 1
        data = outs[0].to_bytes()
        assert data == sim_output(sdk_server.sim.data_dir, outs[0].name)  # type: ignore[arg-type]
        with Image.open(io.BytesIO(data)) as img:
            assert img.convert("RGB").getpixel((3, 3)) == (55, 245, 225)  # inverted
        assert outs[0].to_bytes(range=(0, 7)) == data[:8]
        # The same bytes again: no upload, the server already has them (HEAD by-hash, from-hash).
        again = client.assets.from_bytes(photo.read_bytes(), filename="again.png")
        again.commit()
        assert again.created_new is False and again.id != asset.id
        # The job the SDK sees is a comfyq job: /result agrees.
        wf_back = job.get_workflow()
        assert wf_back.format == "api"
        assert wf_back.graph["1"]["inputs"]["image"].startswith("v2_")
        listed = {s.id: s for s in client.list_jobs(limit=10)}
        assert job.id in listed and listed[job.id].status == "succeeded"
        assert listed[job.id].create_time is not None and listed[job.id].update_time is not None


def test_sync_sdk_events_and_errors(sdk_server: ThreadServer) -> None:
    sdk_server.sim.node_durations = {"ImageBlur": 0.6}
    sdk_server.sim.progress_steps = 4
    graph = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": next(_colors)},
        },
        "4": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ev"}},
    }
    with Comfy() as client:
        job = client.submit(client.workflows.from_json(graph))
        kinds = []
        statuses = []
        values = []
        for ev in job.events():
            kinds.append(type(ev).__name__)
            if isinstance(ev, StatusChange):
                statuses.append(ev.status)
            if isinstance(ev, Progress):
                values.append(ev.value)
        assert statuses[-1] == "succeeded"
        assert "running" in statuses
        assert "Progress" in kinds and "OutputReady" in kinds
        assert values == sorted(values) and 0 < values[-1] <= 1
        job.refresh()
        assert job.status == "succeeded"
        # A reused Idempotency-Key is refused, not replayed.
        wf = client.workflows.from_json(graph)
        client.submit(wf, idempotency_key="same-key-1")
        with pytest.raises(IdempotencyKeyReuse):
            client.submit(wf, idempotency_key="same-key-1")
        with pytest.raises(WorkflowFormatUi):
            client.submit(client.workflows.from_json({"nodes": [], "links": [], "last_node_id": 0}))


async def test_async_sdk_run_cancel_and_missing_asset(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    monkeypatch.setenv("COMFY_BASE_URL", srv.url)
    photo = tmp_path / "a.png"
    photo.write_bytes(png((1, 2, 3)))
    async with AsyncComfy() as client:
        wf = client.workflows.from_json(invert_graph("sdk_async"))
        wf.set_input("1", "image", client.assets.from_file(photo))
        job = await client.run(wf, timeout=60)
        assert job.status == "succeeded"
        out = job.get_outputs("3")[0]
        data = await out.to_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        bad = client.workflows.from_json(invert_graph("x"))
        bad.set_input("1", "image", {"__type": "core/ASSET", "info": {"id": "no-such-asset"}})
        with pytest.raises(MissingAsset):
            await client.submit(bad)
        # Cancel a job held in the queue: it ends canceled at once, and the store agrees.
        srv.services.pipeline.stages[Stage.GENERATE].pause()
        plain = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "held"},
            },
        }
        held = await client.submit(client.workflows.from_json(plain))
        assert held.status == "queued"
        for _ in range(500):  # through preprocess, then held before generation
            row = await srv.services.store.get(held.id)
            if row is not None and row.stage == Stage.GENERATE:
                break
            await asyncio.sleep(0.01)
        await held.cancel()
        assert held.status == "canceled"
        stored = await srv.services.store.get(held.id)
        assert stored is not None and stored.state == State.CANCELLED
        srv.services.pipeline.stages[Stage.GENERATE].resume()
        check("Job", (await _raw_job(srv, job.id)))


async def _raw_job(srv: Any, job_id: str) -> Any:
    async with srv.session.get(srv.u(f"/api/v2/jobs/{job_id}")) as r:
        assert r.status == 200
        return await r.json()
