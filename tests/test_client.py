"""ComfyClient against the ComfyUI simulator over real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.client import (
    VALIDATION_CASES,
    EventLog,
    blur_chain_workflow,
    first_image,
    image_size_workflow,
    invert_workflow,
    new_id,
    txt2img_workflow,
    websocket_save_workflow,
)

from comfyq.comfy.client import ComfyClient
from comfyq.comfy.protocol import LiveEvent
from comfyq.errors import (
    ComfyUIUnreachable,
    Interrupted,
    NodeError,
    OutputError,
    PromptLost,
    ValidationError,
)
from comfyq.sim import Simulator
from comfyq.sim.generation import OLD, VERSIONS

# ``details.kind`` where it differs from ComfyUI's own error type (the same in every generation).
KINDS = {"unknown_class_type": "unknown_node", "node_without_class_type": "missing_class_type"}
GUARD = 15.0  # hang guard only; nothing below depends on how fast things run
PNG = b"\x89PNG\r\n\x1a\n"

MakeSim = Callable[..., Awaitable[Simulator]]
MakeClient = Callable[..., Awaitable[ComfyClient]]


@pytest.fixture(params=VERSIONS)
def comfyui_version(request: pytest.FixtureRequest) -> str:
    """Every test here runs against both ComfyUI generations."""
    return str(request.param)


@pytest.fixture
async def make_sim(tmp_path: Path, comfyui_version: str) -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def make(**kw: Any) -> Simulator:
        kw.setdefault("comfyui_version", comfyui_version)
        kw.setdefault("node_duration", 0.0)
        kw.setdefault("progress_steps", 0)
        sim = Simulator(port=0, data_dir=tmp_path / f"sim{len(sims)}", **kw)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[ComfyClient] = []

    async def make(url: str, **kw: Any) -> ComfyClient:
        kw.setdefault("request_timeout", 5.0)
        kw.setdefault("ws_quiet_timeout", 5.0)
        kw.setdefault("poll_interval", 0.05)
        kw.setdefault("reconnect_min", 0.02)
        kw.setdefault("reconnect_max", 0.2)
        c = ComfyClient(url, **kw)
        clients.append(c)
        await c.start()
        return c

    yield make
    for c in clients:
        await c.close()


@pytest.fixture
async def sim(make_sim: MakeSim) -> Simulator:
    return await make_sim()


@pytest.fixture
async def client(sim: Simulator, make_client: MakeClient) -> ComfyClient:
    c = await make_client(sim.url)
    assert c.ws_connected
    return c


def same_file(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same output file (newer ComfyUI gives it fresh asset ids in every prompt)."""
    return all(a[k] == b[k] for k in ("filename", "subfolder", "type"))


async def run(
    client: ComfyClient,
    workflow: dict[str, Any],
    on_event: Callable[[LiveEvent], None] | None = None,
) -> Any:
    pid = new_id()
    sub = await client.submit(workflow, pid)
    assert sub.prompt_id == pid
    async with asyncio.timeout(GUARD):
        return await client.follow(pid, workflow=workflow, on_event=on_event)


async def test_success_outputs_and_events(client: ComfyClient, sim: Simulator) -> None:
    log = EventLog()
    wf = invert_workflow("ok")
    result = await run(client, wf, log)
    image = first_image(result.outputs, "3")
    assert image["type"] == "output" and image["filename"].startswith("ok_")
    assert result.status == "success" and result.cached_nodes == []
    assert result.prompt_id == sim.prompts_received[-1]
    executing = [(e.node, e.node_type) for e in log.of("executing")]
    assert executing == [("1", "EmptyImage"), ("2", "ImageInvert"), ("3", "SaveImage")]
    executed = log.of("executed")
    assert [(e.node, e.node_type) for e in executed] == [("3", "SaveImage")]
    assert executed[0].data["output"] == result.outputs["3"]
    assert log.kinds()[:2] == ["execution_start", "execution_cached"]
    assert "progress_state" in log.kinds()
    assert all(e.prompt_id == result.prompt_id for e in log.events)


async def test_progress_events_carry_node_type(client: ComfyClient) -> None:
    log = EventLog()
    await run(client, websocket_save_workflow(batch=3), log)
    progress = log.of("progress")
    assert [(e.value, e.max) for e in progress] == [(0, 3), (1, 3), (2, 3)]
    assert {(e.node, e.node_type) for e in progress} == {("2", "SaveImageWebsocket")}


async def test_ksampler_progress(client: ComfyClient) -> None:
    log = EventLog()
    result = await run(client, txt2img_workflow("t2i", steps=4), log)
    ticks = [(e.node, e.node_type, e.value, e.max) for e in log.of("progress")]
    assert ticks == [("3", "KSampler", step, 4) for step in range(1, 5)]
    first_image(result.outputs, "9")


async def test_following_an_unknown_prompt_is_prompt_lost(client: ComfyClient) -> None:
    with pytest.raises(PromptLost):
        await asyncio.wait_for(client.follow(new_id()), GUARD)


async def test_cached_rerun_reports_the_old_files(client: ComfyClient) -> None:
    wf = invert_workflow("cache")
    first = await run(client, wf)
    log = EventLog()
    second = await run(client, wf, log)
    assert second.cached_nodes == ["1", "2", "3"]
    assert same_file(first_image(second.outputs, "3"), first_image(first.outputs, "3"))
    assert len(second.outputs["3"]["images"]) == 1
    assert log.of("executing") == []  # nothing ran, yet the outputs are there


async def test_partially_cached_run(client: ComfyClient) -> None:
    await run(client, invert_workflow("part_a"))
    second = await run(client, invert_workflow("part_b"))
    assert second.cached_nodes == ["1", "2"]
    assert first_image(second.outputs, "3")["filename"].startswith("part_b_")


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
async def test_validation_errors_are_kept_whole(
    case: str, client: ComfyClient, sim: Simulator
) -> None:
    wf, error_type = VALIDATION_CASES[case]
    if sim.comfyui_version != OLD and error_type == "invalid_prompt":
        error_type = "missing_node_type"  # the newer name; comfyq's kind stays the same
    async with (
        aiohttp.ClientSession() as raw,
        raw.post(sim.url + "/prompt", json={"prompt": wf}) as resp,
    ):  # ComfyUI's own answer
        assert resp.status == 400
        expected = await resp.json()
    pid = new_id()
    with pytest.raises(ValidationError) as info:
        await client.submit(wf, pid)
    err = info.value
    assert err.details == {
        "error": expected["error"],
        "node_errors": expected["node_errors"],
        "kind": KINDS.get(case, error_type),
    }
    assert err.details["error"]["type"] == error_type
    if case == "unknown_class_type":
        assert (err.node_id, err.node_type) == ("1", "NoSuchNodeXYZ")
        assert "NoSuchNodeXYZ" in err.message and "#1" in err.message
    elif case == "node_without_class_type":
        assert err.node_id == "1" and "class_type" in err.message
    else:
        assert err.message == expected["error"]["message"]
    assert pid not in sim.prompts_received
    assert await client.locate(pid) == ("unknown", None)


async def test_node_errors_survive_in_detail(client: ComfyClient) -> None:
    wf, _ = VALIDATION_CASES["value_above_max"]
    with pytest.raises(ValidationError) as info:
        await client.submit(wf, new_id())
    node = info.value.details["node_errors"]["1"]
    assert node["class_type"] == "EmptyImage"
    assert node["errors"][0]["type"] == "value_bigger_than_max"
    assert node["errors"][0]["extra_info"]["input_name"] == "width"


async def test_text_plain_500_is_unreachable(client: ComfyClient, sim: Simulator) -> None:
    sim.reject_next = [(500, "500 Internal Server Error\n\nServer got itself in trouble")]
    with pytest.raises(ComfyUIUnreachable) as info:
        await client.submit(invert_workflow("r500"), new_id())
    assert info.value.retryable and info.value.details["status"] == 500
    assert "Server got itself in trouble" in info.value.details["body"]
    await run(client, invert_workflow("r500_after"))  # the next submit goes through


async def test_partial_node_errors_on_200(client: ComfyClient) -> None:
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 521413},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "j"}},
        "3": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 500, "sigma": 1.0},
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    pid = new_id()
    sub = await client.submit(wf, pid)
    assert sub.node_errors["3"]["errors"][0]["type"] == "value_bigger_than_max"
    assert sub.node_errors["3"]["dependent_outputs"] == ["4"]
    async with asyncio.timeout(GUARD):
        result = await client.follow(pid, workflow=wf)
    assert set(result.outputs) == {"2"}


async def test_runtime_error_is_node_error(client: ComfyClient, sim: Simulator) -> None:
    sim.fail_nodes = {"ImageInvert": ("PIL.UnidentifiedImageError", "cannot identify image file")}
    with pytest.raises(NodeError) as info:
        await run(client, invert_workflow("boom"))
    err = info.value
    assert err.node_id == "2" and err.node_type == "ImageInvert"
    assert err.details["exception_type"] == "PIL.UnidentifiedImageError"
    assert "cannot identify image file" in err.message
    assert isinstance(err.details["traceback"], list) and err.details["traceback"]
    assert "current_inputs" in err.details and "executed" in err.details


async def test_outcome_read_from_history_when_followed_late(
    client: ComfyClient, sim: Simulator
) -> None:
    sim.fail_nodes = {"ImageInvert": ("PIL.UnidentifiedImageError", "cannot identify image file")}
    wf = invert_workflow("late")
    pid = new_id()
    await client.submit(wf, pid)
    client.forget(pid)  # as after a comfyq restart: nobody buffered its messages
    async with asyncio.timeout(GUARD):
        while (await client.locate(pid))[0] != "done":
            await asyncio.sleep(0.01)
        with pytest.raises(NodeError) as info:
            await client.follow(pid, workflow=wf)
    assert info.value.node_id == "2" and info.value.node_type == "ImageInvert"
    state, entry = await client.locate(pid)
    assert state == "done" and entry is not None
    with pytest.raises(NodeError):
        await client.result_from_history(entry)


async def test_messages_before_follow_are_buffered(client: ComfyClient) -> None:
    wf = invert_workflow("buffered")
    pid = new_id()
    await client.submit(wf, pid)
    async with asyncio.timeout(GUARD):
        while (await client.locate(pid))[0] != "done":
            await asyncio.sleep(0.01)
    log = EventLog()
    result = await client.follow(pid, workflow=wf, on_event=log)
    assert result.source == "websocket"  # served from the buffer, not from history
    assert [e.node for e in log.of("executing")] == ["1", "2", "3"]
    first_image(result.outputs, "3")


async def test_cancel_interrupts_the_running_prompt(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(node_durations={"ImageBlur": 0.5})
    client = await make_client(sim.url)
    wf = blur_chain_workflow("cancel_run", blurs=4)
    pid = new_id()
    log = EventLog()
    await client.submit(wf, pid)
    follow = asyncio.create_task(client.follow(pid, workflow=wf, on_event=log))
    await log.wait_for(lambda e: e.kind == "executing" and e.node == "100")
    await client.cancel(pid)
    with pytest.raises(Interrupted) as info:
        await asyncio.wait_for(follow, GUARD)
    assert info.value.node_type == "ImageBlur"
    assert info.value.node_id in {"101", "102", "103"}
    state, entry = await client.locate(pid)
    assert state == "done" and entry is not None and entry["status"]["status_str"] == "error"


async def test_cancel_deletes_a_pending_prompt(make_sim: MakeSim, make_client: MakeClient) -> None:
    sim = await make_sim(node_durations={"ImageBlur": 0.3})
    client = await make_client(sim.url)
    slow, queued = new_id(), new_id()
    slow_wf, queued_wf = blur_chain_workflow("slow", blurs=2), invert_workflow("queued")
    log = EventLog()
    await client.submit(slow_wf, slow)
    slow_task = asyncio.create_task(client.follow(slow, workflow=slow_wf, on_event=log))
    await log.wait_for(lambda e: e.kind == "executing")
    await client.submit(queued_wf, queued)
    assert await client.locate(queued) == ("pending", None)
    queued_task = asyncio.create_task(client.follow(queued, workflow=queued_wf))
    await client.cancel(queued)
    with pytest.raises(Interrupted) as info:
        await asyncio.wait_for(queued_task, GUARD)
    assert info.value.details["deleted_from_queue"] is True
    assert await client.locate(queued) == ("unknown", None)
    first_image((await asyncio.wait_for(slow_task, GUARD)).outputs, "9")  # untouched
    assert await client.locate(queued) == ("unknown", None)  # and it never ran


async def test_websocket_drop_mid_run(make_sim: MakeSim, make_client: MakeClient) -> None:
    sim = await make_sim(node_durations={"ImageBlur": 0.3})
    client = await make_client(sim.url)
    wf = blur_chain_workflow("drop", blurs=2)
    pid = new_id()
    log = EventLog()
    await client.submit(wf, pid)
    follow = asyncio.create_task(client.follow(pid, workflow=wf, on_event=log))
    await log.wait_for(lambda e: e.kind == "executing" and e.node == "100")
    sim.drop_websockets()
    result = await asyncio.wait_for(follow, GUARD)
    first_image(result.outputs, "9")
    assert result.source == "history"  # messages may be lost in a gap: history is complete
    assert sim.prompts_received.count(pid) == 1
    async with asyncio.timeout(GUARD):
        while not client.ws_connected:
            await asyncio.sleep(0.01)


async def test_websocket_stall_falls_back_to_history(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim()
    client = await make_client(sim.url, ws_quiet_timeout=0.3)
    sim.stall_ws = True
    result = await run(client, invert_workflow("stall"))
    assert result.source == "history"
    first_image(result.outputs, "3")


async def test_messages_taken_as_they_arrive_keep_the_quiet_timer_from_firing(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    # The follower takes progress messages without waking up for each: they must still count
    # as signs of life, or a run longer than ws_quiet_timeout would ask ComfyUI needlessly.
    sim = await make_sim(node_durations={"ImageBlur": 0.12})
    asked: list[str] = []

    async def on_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        asked.append(f"{params.method} {params.url.path}")

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        client = await make_client(sim.url, session=session, ws_quiet_timeout=0.4)
        log = EventLog()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await run(client, blur_chain_workflow("lively", blurs=8), log)
        assert loop.time() - t0 > 0.8  # twice the quiet timeout at least
        assert result.source == "websocket"
        assert [e.node for e in log.of("executing")][-1] == "9"
        # No /queue, /history or jobs-API look-up (besides the socket and the prompt itself).
        assert [a for a in asked if a != "GET /ws"] == ["POST /prompt"]


async def test_crash_and_restart_mid_run_is_prompt_lost(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(node_durations={"ImageBlur": 0.5})
    client = await make_client(sim.url)
    wf = blur_chain_workflow("crash", blurs=3)
    pid = new_id()
    log = EventLog()
    await client.submit(wf, pid)
    follow = asyncio.create_task(client.follow(pid, workflow=wf, on_event=log))
    await log.wait_for(lambda e: e.kind == "executing" and e.node == "100")
    await sim.crash()
    with pytest.raises(ComfyUIUnreachable):
        await client.system_stats()
    # While ComfyUI is down the follower keeps trying; only the caller's deadline ends that.
    done, _ = await asyncio.wait([follow], timeout=0.5)
    assert not done and not client.ws_connected
    await sim.restart()
    with pytest.raises(PromptLost) as info:
        await asyncio.wait_for(follow, GUARD)
    assert info.value.retryable and info.value.details["prompt_id"] == pid


async def test_upload_names_and_download(client: ComfyClient, tmp_path: Path) -> None:
    a = await client.upload(PNG + b"one", "in.png", overwrite=False)
    assert a == {"name": "in.png", "subfolder": "", "type": "input"}
    same = await client.upload(PNG + b"one", "in.png", overwrite=False)
    assert same["name"] == "in.png"  # same bytes: ComfyUI reuses the name
    other = await client.upload(PNG + b"two", "in.png", overwrite=False)
    assert other["name"] == "in (1).png"
    big = tmp_path / "big.png"
    big.write_bytes(PNG + bytes(range(256)) * 4096)
    streamed = await client.upload(big, "big.png", subfolder="jobs")
    assert streamed == {"name": "big.png", "subfolder": "jobs", "type": "input"}
    dest = tmp_path / "dl" / "big.png"
    size = await client.download("big.png", "jobs", "input", dest)
    assert size == big.stat().st_size and dest.read_bytes() == big.read_bytes()
    assert not dest.with_name("big.png.part").exists()
    with pytest.raises(OutputError):
        await client.download("nope.png", "", "output", tmp_path / "nope.png")
    assert not (tmp_path / "nope.png").exists()
    assert not (tmp_path / "nope.png.part").exists()


async def test_mask_upload(client: ComfyClient) -> None:
    image = await client.upload(PNG + b"base", "masked.png")
    ref = {"filename": image["name"], "subfolder": "", "type": "input"}
    mask = await client.upload(PNG + b"alpha", "clipspace_mask.png", mask=True, original_ref=ref)
    assert mask == {"name": "clipspace_mask.png", "subfolder": "", "type": "input"}
    with pytest.raises(ValueError):
        await client.upload(PNG, "m.png", mask=True)
    temp = await client.upload(PNG + b"tmp", "t.png", type="temp")
    assert temp["type"] == "temp"


async def test_stalled_download_is_unreachable(
    client: ComfyClient, sim: Simulator, make_client: MakeClient, tmp_path: Path
) -> None:
    await client.upload(PNG + b"slow", "slow.png")
    impatient = await make_client(sim.url, request_timeout=0.5)
    sim.view_delay = 10.0  # far beyond the client's read timeout
    dest = tmp_path / "dl" / "slow.png"
    with pytest.raises(ComfyUIUnreachable):
        await impatient.download("slow.png", "", "input", dest)
    assert (
        not dest.parent.exists() or list(dest.parent.iterdir()) == []
    )  # neither the file nor its .part


async def test_download_an_output(client: ComfyClient, tmp_path: Path) -> None:
    result = await run(client, invert_workflow("dl"))
    image = first_image(result.outputs, "3")
    dest = tmp_path / image["filename"]
    size = await client.download(image["filename"], image["subfolder"], image["type"], dest)
    assert size > 0 and dest.read_bytes().startswith(PNG)


async def test_previews_with_metadata(client: ComfyClient) -> None:
    seen: list[LiveEvent] = []
    client.on_preview = seen.append
    log = EventLog()
    result = await run(client, websocket_save_workflow(batch=2), log)
    assert client._feed.server_features.get("supports_preview_metadata") is True
    assert len(seen) == 2
    for ev in seen:
        assert ev.kind == "preview" and ev.prompt_id == result.prompt_id and ev.node == "2"
        assert ev.mime == "image/png" and ev.image is not None and ev.image.startswith(PNG)
        assert ev.data["node_id"] == "2"  # type 4: metadata came with the frame
    previews = log.of("preview")
    assert len(previews) == 2 and {e.node_type for e in previews} == {"SaveImageWebsocket"}


async def test_legacy_previews_attributed_to_the_running_prompt(
    sim: Simulator, make_client: MakeClient
) -> None:
    client = await make_client(sim.url, preview_metadata=False)
    seen: list[LiveEvent] = []
    client.on_preview = seen.append
    result = await run(client, websocket_save_workflow(batch=2))
    assert len(seen) == 2
    for ev in seen:
        assert ev.prompt_id == result.prompt_id and ev.node == "2" and ev.data == {}
        assert ev.mime == "image/png"


async def test_text_frames(client: ComfyClient) -> None:
    log = EventLog()
    result = await run(client, image_size_workflow("size"), log)
    texts = log.of("text")
    assert len(texts) == 1 and texts[0].node == "2" and texts[0].node_type == "GetImageSize"
    assert "width: 40, height: 30" in texts[0].data["text"]
    assert texts[0].prompt_id == result.prompt_id


async def test_system_stats_and_unreachable(sim: Simulator, make_client: MakeClient) -> None:
    client = await make_client(sim.url)
    stats = await client.system_stats()
    assert "comfyui_version" in stats["system"]
    await sim.crash()
    with pytest.raises(ComfyUIUnreachable):
        await client.system_stats()
    with pytest.raises(ComfyUIUnreachable):
        await client.submit(invert_workflow("down"), new_id())
    with pytest.raises(ComfyUIUnreachable):
        await client.locate(new_id())
    await sim.restart()
    async with asyncio.timeout(GUARD):
        while not client.ws_connected:
            await asyncio.sleep(0.01)
    first_image((await run(client, invert_workflow("back"))).outputs, "3")
