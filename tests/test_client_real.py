"""The main client tests against a real ComfyUI: set COMFYUI_TEST_URL (e.g. http://127.0.0.1:8188).

Needs only the model-free built-in nodes (EmptyImage, ImageInvert, ImageBlur, LoadImage,
SaveImage, GetImageSize; SaveImageWebsocket from custom_nodes/ for the preview test).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from support.client import (
    VALIDATION_CASES,
    EventLog,
    blur_chain_workflow,
    first_image,
    image_size_workflow,
    invert_workflow,
    new_id,
    websocket_save_workflow,
)

from comfyq.comfy.client import ComfyClient
from comfyq.comfy.feed import StoredWorkflow
from comfyq.comfy.protocol import LiveEvent, RunResult
from comfyq.errors import Interrupted, NodeError, OutputError, ValidationError

URL = os.environ.get("COMFYUI_TEST_URL", "")
GUARD = 120.0  # CPU ComfyUI can be slow; hang guard only
PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.real_comfyui,
    pytest.mark.skipif(not URL, reason="COMFYUI_TEST_URL is not set"),
]


def tag() -> str:
    return f"comfyq_test_{new_id()[:8]}"


def color() -> int:
    return random.randrange(1, 0xFFFFFF)  # a fresh color keeps ComfyUI's cache out of the way


@pytest.fixture
async def client() -> AsyncIterator[ComfyClient]:
    c = ComfyClient(URL, request_timeout=30.0, ws_quiet_timeout=10.0, poll_interval=0.5)
    await c.start()
    assert c.ws_connected
    yield c
    await c.close()


async def run(client: ComfyClient, wf: dict[str, Any], log: EventLog | None = None) -> RunResult:
    pid = new_id()
    assert (await client.submit(wf, pid)).prompt_id == pid
    async with asyncio.timeout(GUARD):
        return await client.follow(pid, workflow=wf, on_event=log)


async def test_real_success_and_cached_rerun(client: ComfyClient) -> None:
    wf = invert_workflow(tag(), color=color())
    log = EventLog()
    first = await run(client, wf, log)
    assert first_image(first.outputs, "3")["type"] == "output"
    assert [(e.node, e.node_type) for e in log.of("executing")] == [
        ("1", "EmptyImage"),
        ("2", "ImageInvert"),
        ("3", "SaveImage"),
    ]
    second = await run(client, wf)
    assert second.cached_nodes == ["1", "2", "3"]
    assert first_image(second.outputs, "3") == first_image(first.outputs, "3")


@pytest.mark.parametrize(
    "case",
    [
        "unknown_class_type",
        "missing_required_input",
        "value_above_max",
        "no_output_node",
        "bad_link_shape",
    ],
)
async def test_real_validation_error_whole(client: ComfyClient, case: str) -> None:
    wf, error_type = VALIDATION_CASES[case]
    async with (
        aiohttp.ClientSession() as raw,
        raw.post(URL + "/prompt", json={"prompt": wf}) as resp,
    ):
        assert resp.status == 400
        expected = await resp.json()
    seen = []
    # As a dict, and as the stored JSON text the generate stage submits: the same error.
    for workflow in (wf, StoredWorkflow(msgspec.json.encode(wf))):
        with pytest.raises(ValidationError) as info:
            await client.submit(workflow, new_id())
        assert info.value.details == {
            "error": expected["error"],
            "node_errors": expected["node_errors"],
            # The same kind from every ComfyUI version (0.3.64's invalid_prompt, newer
            # missing_node_type: both unknown_node).
            "kind": "unknown_node" if case == "unknown_class_type" else error_type,
        }
        seen.append(info.value.to_dict())
    assert seen[0] == seen[1]
    assert expected["error"]["type"] in (
        (error_type, "missing_node_type") if error_type == "invalid_prompt" else (error_type,)
    )


async def test_real_runtime_error(client: ComfyClient) -> None:
    name = f"{tag()}_corrupt.png"
    uploaded = await client.upload(b"this is not an image at all", name)
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": uploaded["name"]}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag()}},
    }
    with pytest.raises(NodeError) as info:
        await run(client, wf)
    assert info.value.node_id == "1" and info.value.node_type == "LoadImage"
    assert info.value.details["exception_type"] == "PIL.UnidentifiedImageError"
    assert info.value.details["traceback"]


async def test_real_cancel_running(client: ComfyClient) -> None:
    wf = blur_chain_workflow(tag(), blurs=3, size=2048, color=color(), radius=31)
    pid = new_id()
    log = EventLog()
    await client.submit(wf, pid)
    follow = asyncio.create_task(client.follow(pid, workflow=wf, on_event=log))
    await log.wait_for(lambda e: e.kind == "executing" and e.node == "100", timeout=GUARD)
    await client.cancel(pid)
    with pytest.raises(Interrupted) as info:
        await asyncio.wait_for(follow, GUARD)
    assert info.value.node_type == "ImageBlur"


async def test_real_upload_download(client: ComfyClient, tmp_path: Path) -> None:
    name = f"{tag()}.png"
    a = await client.upload(PNG + b"one", name, overwrite=False)
    assert a["name"] == name
    assert (await client.upload(PNG + b"two", name, overwrite=False))["name"] != name
    dest = tmp_path / name
    assert await client.download(name, "", "input", dest) == len(PNG) + 3
    assert dest.read_bytes() == PNG + b"one"
    with pytest.raises(OutputError):
        await client.download(f"{tag()}_missing.png", "", "output", tmp_path / "x.png")


async def test_real_previews_and_text(client: ComfyClient) -> None:
    info = await client._get_json("/object_info/SaveImageWebsocket")
    if not info:
        pytest.skip("SaveImageWebsocket is not installed in this ComfyUI")
    seen: list[LiveEvent] = []
    client.on_preview = seen.append
    result = await run(client, websocket_save_workflow(batch=2, color=color()))
    previews = [e for e in seen if e.kind == "preview"]
    assert len(previews) == 2
    assert all(e.prompt_id == result.prompt_id and e.mime == "image/png" for e in previews)
    log = EventLog()
    await run(client, image_size_workflow(tag(), color=color()), log)
    assert [e.node for e in log.of("text")] == ["2"]


async def test_real_capabilities_match_the_routes(client: ComfyClient) -> None:
    # Whatever the version: a capability is claimed only where its route answers as documented.
    caps = await client.probe()
    assert caps.version and caps.preview_metadata
    async with aiohttp.ClientSession() as raw:
        async with raw.get(URL + "/api/jobs?limit=1") as r:
            assert (r.status == 200) == caps.jobs_api
        if caps.version == "0.3.64":
            assert caps.names() == ["preview_metadata"]
