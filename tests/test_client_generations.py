"""ComfyClient against both ComfyUI generations of the simulator (0.3.64 and 0.38): what it
detects (capabilities, probed again after ComfyUI restarts as another version), what it uses
where present (the atomic cancel route, the jobs API), and what it survives (strict prompt ids,
renamed validation errors, re-sent ``executed``, messages it does not know, SVG/XML served as
downloads). Tests that take ``comfyui_version`` run once per generation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from support.client import EventLog, invert_workflow, new_id, txt2img_workflow

from comfyq.comfy.client import ComfyClient
from comfyq.comfy.feed import StoredWorkflow
from comfyq.comfy.jobsapi import GONE, cancel_job, locate_job
from comfyq.comfy.protocol import parse_text_frame
from comfyq.errors import Interrupted, ValidationError
from comfyq.outputs.local import hash_and_type
from comfyq.sim import Simulator
from comfyq.sim.generation import NEW, OLD, VERSIONS

GUARD = 15.0  # hang guard only
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect/></svg>\n'
XML = b'<?xml version="1.0"?>\n<note><to>comfyq</to></note>\n'
NEW_CAPS = ["assets", "atomic_cancel", "jobs_api", "node_replacements", "preview_metadata"]
OLD_CAPS = ["preview_metadata"]

MakeSim = Callable[..., Awaitable[Simulator]]
MakeClient = Callable[..., Awaitable[ComfyClient]]
MakeServer = Callable[..., Awaitable[Any]]  # conftest's make_server


@pytest.fixture(params=VERSIONS)
def comfyui_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_sim(tmp_path: Path) -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def make(version: str, **kw: Any) -> Simulator:
        sim = Simulator(
            port=0, data_dir=tmp_path / f"sim{len(sims)}", comfyui_version=version, **kw
        )
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


async def wait_until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD):
        while not check():
            await asyncio.sleep(0.01)


def preview_workflow(prefix: str, color: int) -> dict[str, Any]:
    wf = invert_workflow(prefix, color)
    wf["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    return wf


# --- detect -----------------------------------------------------------------------------------


async def test_capabilities_are_probed_not_assumed(
    comfyui_version: str, make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    assert client.capabilities is None and client.capabilities_stale
    caps = await client.probe()
    assert not client.capabilities_stale and client.capabilities is caps
    if comfyui_version == OLD:
        assert (caps.version, caps.names()) == ("0.3.64", OLD_CAPS)
        assert not caps.jobs_api and not caps.atomic_cancel
    else:
        assert (caps.version, caps.names()) == ("0.38.1", NEW_CAPS)
    # The version is shown, never acted on: a newer server without assets says so in its flags.
    if comfyui_version == NEW:
        bare = await make_sim(NEW, assets=False)
        other = await make_client(bare.url)
        assert "assets" not in (await other.probe()).names()


async def test_probed_once_when_the_probe_comes_before_the_socket(make_sim: MakeSim) -> None:
    sim = await make_sim(NEW)
    client = ComfyClient(sim.url, request_timeout=5.0, reconnect_min=0.02)
    try:
        await client.probe()  # as the pool may: before the websocket ever connected
        await client.start()
        assert client.ws_connected and not client.capabilities_stale
        sim.drop_websockets()  # a later reconnect may be another server: probe again
        await wait_until(lambda: client.ws_connected and client.capabilities_stale)
    finally:
        await client.close()


async def test_a_restart_as_another_version_is_probed_again(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(OLD)
    client = await make_client(sim.url)
    assert not (await client.ensure_capabilities()).jobs_api
    await sim.crash()
    sim.switch_version(NEW)  # an upgrade: the same URL answers as 0.38 after the restart
    await sim.restart()
    await wait_until(lambda: client.ws_connected)
    assert client.capabilities_stale  # the socket came back: ComfyUI may be another one now
    caps = await client.ensure_capabilities()
    assert caps.jobs_api and caps.atomic_cancel and caps.version == "0.38.1"
    pid = new_id()
    await client.submit(invert_workflow("upgraded"), pid)
    async with asyncio.timeout(GUARD):
        await client.follow(pid)
    assert (await client.locate(pid))[0] == "done"
    assert f"GET /api/jobs/{pid}" in sim.requests  # the new route, used at once


async def test_health_names_each_backends_version_and_capabilities(
    comfyui_version: str, make_server: MakeServer, simulator: Simulator
) -> None:
    srv = await make_server()

    async def backend() -> dict[str, Any]:
        async with srv.session.get(srv.u("/health")) as r:
            return (await r.json())["backends"][0]  # type: ignore[no-any-return]

    async with asyncio.timeout(GUARD):
        while (b := await backend()).get("capabilities") is None:
            await asyncio.sleep(0.05)
    new = comfyui_version == NEW
    assert b["comfyui_version"] == ("0.38.1" if new else "0.3.64")
    assert b["capabilities"] == (NEW_CAPS if new else OLD_CAPS)
    assert b["capabilities_probed_at"].endswith("Z")
    # ComfyUI restarts as the other generation: the pool probes it again by itself.
    await simulator.crash()
    simulator.switch_version(OLD if new else NEW)
    await simulator.restart()
    async with asyncio.timeout(GUARD):
        while (b := await backend()).get("capabilities") != (OLD_CAPS if new else NEW_CAPS):
            await asyncio.sleep(0.05)
    assert b["comfyui_version"] == ("0.3.64" if new else "0.38.1")


# --- use what helps -----------------------------------------------------------------------------


async def test_locate_and_cancel_use_the_jobs_routes_where_present(
    comfyui_version: str, make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    done, pending = new_id(), new_id()
    await client.submit(invert_workflow("located"), done)
    async with asyncio.timeout(GUARD):
        await client.follow(done)
    where, entry = await client.locate(done)
    assert where == "done" and entry is not None
    result = await client.result_from_history(entry)
    assert result.outputs["3"]["images"][0]["filename"].startswith("located_")
    sim.hold_starts()  # the next prompt is taken off the queue and waits there
    blocker = new_id()
    await client.submit(invert_workflow("blocker", 7), blocker)
    await wait_until(lambda: sim.held == [blocker])
    await client.submit(invert_workflow("pending", 8), pending)
    assert await client.locate(pending) == ("pending", None)
    assert await client.locate(blocker) == ("running", None)
    before = len(sim.requests)
    await client.cancel(pending)
    asked = sim.requests[before:]
    sim.release_starts()
    if comfyui_version == NEW:
        assert asked == [f"POST /api/jobs/{pending}/cancel"]  # one atomic call
        assert f"GET /api/jobs/{done}" in sim.requests
        assert f"GET /history/{done}" not in sim.requests
    else:
        assert asked == ["POST /queue", "POST /interrupt"]
        assert not any(r.startswith("GET /api/jobs/") for r in sim.requests)
        assert f"GET /history/{done}" in sim.requests
    assert await client.locate(pending) == ("unknown", None)  # a dequeued job leaves no record
    async with asyncio.timeout(GUARD):
        await client.follow(blocker)  # untouched by the cancel


async def test_cancel_during_the_handover_from_pending_to_running(
    make_sim: MakeSim, make_client: MakeClient, http: aiohttp.ClientSession
) -> None:
    # ComfyUI has taken our prompt off the queue (it is "running") but not started it when the
    # cancel arrives. /interrupt would set the global flag that the prompt's start clears again;
    # the atomic route cancels that prompt by id, so it ends cancelled, and the prompt queued
    # behind it runs untouched.
    sim = await make_sim(NEW)
    client = await make_client(sim.url)
    ours, other = new_id(), new_id()
    sim.hold_starts()
    await client.submit(invert_workflow("ours", 11), ours)
    await wait_until(lambda: sim.held == [ours])
    await client.submit(invert_workflow("other", 12), other)
    assert await client.locate(ours) == ("running", None)
    follow_ours = asyncio.create_task(client.follow(ours))
    follow_other = asyncio.create_task(client.follow(other))
    await client.cancel(ours)
    sim.release_starts()
    with pytest.raises(Interrupted) as info:
        await asyncio.wait_for(follow_ours, GUARD)
    assert not info.value.details.get("deleted_from_queue")
    result = await asyncio.wait_for(follow_other, GUARD)
    assert result.outputs["3"]["images"][0]["filename"].startswith("other_")
    for pid, status in ((ours, "cancelled"), (other, "completed")):
        async with http.get(f"{sim.url}/api/jobs/{pid}") as r:
            assert (await r.json())["status"] == status


async def test_interrupt_loses_the_handover_race_on_0_3_64(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    # Why the atomic route matters: the same cancel through /queue delete + /interrupt on
    # 0.3.64 lands on the global flag, which the prompt's start clears; it runs to the end.
    sim = await make_sim(OLD)
    client = await make_client(sim.url)
    ours = new_id()
    sim.hold_starts()
    await client.submit(invert_workflow("ours", 13), ours)
    await wait_until(lambda: sim.held == [ours])
    follow = asyncio.create_task(client.follow(ours))
    await client.cancel(ours)
    sim.release_starts()
    result = await asyncio.wait_for(follow, GUARD)
    assert result.outputs["3"]["images"]


async def test_cancel_of_a_finished_prompt_never_stops_the_next(
    comfyui_version: str, make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    first, second = new_id(), new_id()
    await client.submit(invert_workflow("first", 21), first)
    async with asyncio.timeout(GUARD):
        await client.follow(first)
    sim.hold_starts()
    await client.submit(invert_workflow("second", 22), second)
    await wait_until(lambda: sim.held == [second])
    await client.cancel(first)  # too late: first is done; second (running now) is not touched
    sim.release_starts()
    async with asyncio.timeout(GUARD):
        result = await client.follow(second)
    assert result.outputs["3"]["images"]


# --- survive what breaks ------------------------------------------------------------------------


async def test_prompt_ids_are_sent_canonical(
    comfyui_version: str, make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    pid = new_id()
    sub = await client.submit(invert_workflow("upper", 31), "{" + pid.upper() + "}")
    assert sub.prompt_id == pid and sim.prompts_received == [pid]
    async with asyncio.timeout(GUARD):
        await client.follow(pid)
    with pytest.raises(ValueError):
        await client.submit(invert_workflow("bad", 32), "job-42")


async def test_rejections_are_one_error_on_both_generations(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    wf = {
        "1": {"class_type": "NoSuchNodeXYZ", "inputs": {}, "_meta": {"title": "My node"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    seen = []
    for version in VERSIONS:
        client = await make_client((await make_sim(version)).url)
        with pytest.raises(ValidationError) as info:
            await client.submit(wf, new_id())
        shown = info.value.to_dict()
        raw = shown["details"].pop("error")
        assert raw["type"] == ("invalid_prompt" if version == OLD else "missing_node_type")
        seen.append(shown)
    assert seen[0] == seen[1]
    assert seen[0]["details"]["kind"] == "unknown_node"
    assert (seen[0]["node_id"], seen[0]["node_type"]) == ("1", "NoSuchNodeXYZ")


@pytest.mark.parametrize(
    "wf",
    [
        {
            "1": {"class_type": "NoSuchNodeXYZ", "inputs": {}, "_meta": {"title": "My node"}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        {  # no class_type
            "1": {"inputs": {}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        {  # ids msgspec cannot name a field by
            'a"\\b': {"class_type": "NoSuchNodeXYZ", "inputs": {}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ['a"\\b', 0], "filename_prefix": "x"},
            },
        },
    ],
)
async def test_a_stored_workflow_is_submitted_and_rejected_as_its_dict(
    comfyui_version: str, make_sim: MakeSim, make_client: MakeClient, wf: dict[str, Any]
) -> None:
    """The generate stage submits the stored JSON text (StoredWorkflow): ComfyUI gets the same
    document, and a rejection names the same node, type and kind as with the dict."""
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    seen = []
    for workflow in (wf, StoredWorkflow(msgspec.json.encode(wf))):
        with pytest.raises(ValidationError) as info:
            await client.submit(workflow, new_id())
        seen.append(info.value.to_dict())
    assert seen[0] == seen[1]
    ok = invert_workflow("stored", 51)
    pid = new_id()
    await client.submit(StoredWorkflow(msgspec.json.encode(ok)), pid)
    async with asyncio.timeout(GUARD):
        run = await client.follow(pid)
    assert run.status == "success" and run.outputs


async def test_dependency_cycle(make_sim: MakeSim, make_client: MakeClient) -> None:
    wf = invert_workflow("cycle", 41)
    wf["1"] = {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}
    new = await make_client((await make_sim(NEW)).url)
    with pytest.raises(ValidationError) as info:  # refused up front by the newer generation
        await new.submit(wf, new_id())
    errors = info.value.details["node_errors"]
    assert {e["errors"][0]["type"] for e in errors.values()} == {"dependency_cycle"}
    assert errors["2"]["dependent_outputs"] == ["3"]
    assert info.value.details["kind"] == "prompt_outputs_failed_validation"
    old = await make_client((await make_sim(OLD)).url)
    with pytest.raises(ValidationError) as info:  # 0.3.64: the same kind, no node errors
        await old.submit(wf, new_id())
    assert info.value.details["kind"] == "prompt_outputs_failed_validation"
    assert info.value.details["node_errors"] == {}


async def test_reemitted_executed_never_duplicates_an_output(
    comfyui_version: str, make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    wf = preview_workflow("dup", 51)
    first_pid, second_pid = new_id(), new_id()
    await client.submit(wf, first_pid)
    async with asyncio.timeout(GUARD):
        first = await client.follow(first_pid, workflow=wf)
    log = EventLog()
    await client.submit(wf, second_pid)
    async with asyncio.timeout(GUARD):
        second = await client.follow(second_pid, workflow=wf, on_event=log)
    sent = [e for e in log.of("executed") if e.node == "4"]
    # The newer generation sends the cached preview twice, each time with fresh asset ids.
    assert len(sent) == (2 if comfyui_version == NEW else 1)
    if comfyui_version == NEW:
        a, b = (e.data["output"]["images"][0] for e in sent)
        assert a["filename"] == b["filename"] and a["id"] != b["id"]
    for node in ("3", "4"):
        assert len(second.outputs[node]["images"]) == 1
        assert (
            second.outputs[node]["images"][0]["filename"]
            == (first.outputs[node]["images"][0]["filename"])
        )


async def test_messages_and_keys_it_does_not_know_are_ignored(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    sim = await make_sim(NEW)
    client = await make_client(sim.url)
    log = EventLog()
    pid = new_id()
    await client.submit(txt2img_workflow("t2i", steps=2), pid)
    async with asyncio.timeout(GUARD):
        result = await client.follow(pid, on_event=log)
    image = result.outputs["9"]["images"][0]
    assert {"id", "preview_id", "metadata"} <= set(image)  # the newer keys, passed along
    activity = [
        n.get("activity")
        for e in log.of("progress_state")
        for n in (e.data.get("nodes") or {}).values()
    ]
    assert "loading" in activity  # sent, and the follower did not mind
    # Unknown types and keys: assets.seed.* broadcasts, a type from the future, extra fields.
    for raw in (
        '{"type":"assets.seed.started","data":{"roots":["output"],"phase":"fast"}}',
        '{"type":"from_the_future","data":{"x":1}}',
        '{"type":"executing","data":{"node":"3","prompt_id":"p","new_key":[1,2]},"extra":1}',
    ):
        msg = parse_text_frame(raw)
        assert msg.type in ("assets.seed.started", "from_the_future", "executing")
    # The next prompt runs normally after the scanner's broadcasts.
    again = new_id()
    await client.submit(invert_workflow("after", 61), again)
    async with asyncio.timeout(GUARD):
        await client.follow(again)


async def test_svg_and_xml_outputs_are_typed_by_their_bytes(
    comfyui_version: str,
    make_sim: MakeSim,
    make_client: MakeClient,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sim = await make_sim(comfyui_version)
    client = await make_client(sim.url)
    for name, data, mime in (("out.svg", SVG, "image/svg+xml"), ("out.xml", XML, "text/xml")):
        await client.upload(data, name)
        async with http.get(f"{sim.url}/view", params={"filename": name, "type": "input"}) as r:
            header, disposition = r.headers["Content-Type"], r.headers["Content-Disposition"]
        if comfyui_version == NEW:  # served as a download: the header says nothing of the type
            assert header == "application/octet-stream" and disposition.startswith("attachment")
        dest = tmp_path / comfyui_version / name
        await client.download(name, "", "input", dest)
        assert dest.read_bytes() == data
        assert hash_and_type(dest)[2] == mime  # what comfyq records for the output


async def test_jobs_routes_gone_after_a_downgrade_fall_back(
    make_sim: MakeSim, make_client: MakeClient
) -> None:
    # Capabilities say jobs API, but the server behind the URL is a 0.3.64 now (restarted between
    # two probes): the routes answer 404/405, the client falls back and probes again.
    sim = await make_sim(OLD)
    client = await make_client(sim.url)
    assert await locate_job(client._request, client._http_error, new_id()) == GONE
    assert await cancel_job(client._request, client._http_error, new_id()) == GONE
    pid = new_id()
    await client.submit(invert_workflow("down", 71), pid)
    async with asyncio.timeout(GUARD):
        await client.follow(pid)
    client._caps = replace(await client.probe(), jobs_api=True, atomic_cancel=True)  # stale view
    assert (await client.locate(pid))[0] == "done"  # answered the old way
    assert client.capabilities_stale  # and the next use probes again
    await client.cancel(new_id())
    assert not (await client.ensure_capabilities()).jobs_api
