"""Protocol fidelity of the simulator's newest generation (0.38) against
shared/comfyui-protocol/NEWER.md: jobs and cancel routes with their exact texts, the prompt-id
rule, missing_node_type, create_time and hidden secrets, feature flags, /system_stats, the upload
``asset``, /view rules, ``executed`` entries. The recorded 0.3.64 traffic stays the reference for
the old generation (test_simulator_traces*); where a check has a 0.3.64 side it is here too."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import blake3
import pytest
from support.sim import WsRecorder, wait_history

from comfyq.cli import SIM_VERSIONS
from comfyq.sim import Simulator
from comfyq.sim.generation import NEW, NEWEST, OLD, VERSIONS

SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="2" height="2"/>\n'


def invert(prefix: str, color: int = 0x203040) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


async def post(http: aiohttp.ClientSession, sim: Simulator, body: Any) -> tuple[int, Any]:
    async with http.post(sim.url + "/prompt", json=body) as r:
        return r.status, await r.json()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.status, (await r.json()) if ctype.startswith("application/json") else None


async def run(http: aiohttp.ClientSession, sim: Simulator, wf: dict[str, Any], **extra: Any) -> str:
    pid = str(uuid.uuid4())
    status, _ = await post(http, sim, {"prompt": wf, "prompt_id": pid, **extra})
    assert status == 200
    await wait_history(http, sim.url, pid)
    return pid


@pytest.fixture
async def old(tmp_path: Path) -> Any:
    async with Simulator(data_dir=tmp_path / "old", comfyui_version=OLD) as sim:
        yield sim


async def test_default_is_the_newest(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert sim.comfyui_version == NEW and NEWEST == NEW
    assert SIM_VERSIONS == VERSIONS  # comfyq serve --comfyui-version offers exactly these
    _, stats = await get(http, sim.url + "/system_stats")
    system = stats["system"]
    assert system["comfyui_version"] == "0.38.1" and system["os"] == sys.platform
    assert system["deploy_environment"] == "local-git"
    assert system["comfy_package_versions"][0]["name"] == "comfyui-frontend-package"
    assert len(stats["devices"]) >= 2 and stats["devices"][0]["type"] == "cpu"


async def test_old_stats_and_routes(old: Simulator, http: aiohttp.ClientSession) -> None:
    _, stats = await get(http, old.url + "/system_stats")
    assert stats["system"]["os"] == "posix" and len(stats["devices"]) == 1
    assert "deploy_environment" not in stats["system"]
    for path in ("/api/jobs", "/api/jobs/x", "/node_replacements"):
        assert (await get(http, old.url + path))[0] == 404
    async with http.post(old.url + "/api/jobs/cancel", json={"job_ids": []}) as r:
        assert r.status in (404, 405)
    _, features = await get(http, old.url + "/features")
    assert features == {"supports_preview_metadata": True, "max_upload_size": 104857600}


async def test_feature_flags_http_and_websocket(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    _, features = await get(http, sim.url + "/features")
    assert features["node_replacements"] is True and features["assets"] is True
    assert features["supports_model_type_tags"] is True
    assert features["extension"] == {"manager": {"supports_v4": True}}
    rec = await WsRecorder(http, sim.url, "ff").connect(
        {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
    )
    try:
        await rec.wait_for(lambda fs: any(f.type == "feature_flags" for f in fs))
        assert rec.of_type("feature_flags")[0].data == features
    finally:
        await rec.close()


async def test_prompt_id_rule(sim: Simulator, old: Simulator, http: aiohttp.ClientSession) -> None:
    pid = str(uuid.uuid4())
    for bad in (pid.upper(), "{" + pid + "}", "urn:uuid:" + pid, pid.replace("-", ""), 42):
        status, body = await post(http, sim, {"prompt": invert("x"), "prompt_id": bad})
        assert status == 400 and body["error"]["type"] == "invalid_prompt_id"
        assert body["error"]["message"] == "prompt_id must be a valid UUID"
        assert body["node_errors"] == {}
    status, body = await post(http, sim, {"prompt": invert("x"), "prompt_id": None})
    assert status == 200 and str(uuid.UUID(body["prompt_id"])) == body["prompt_id"]
    # The rejected ones still consumed queue numbers (5 rejections, then this one).
    assert body["number"] == 5
    # 0.3.64 takes any string, and an explicit null becomes "None".
    status, body = await post(http, old, {"prompt": invert("x"), "prompt_id": pid.upper()})
    assert status == 200 and body["prompt_id"] == pid.upper()
    status, body = await post(http, old, {"prompt": invert("y", 1), "prompt_id": None})
    assert status == 200 and body["prompt_id"] == "None"


async def test_missing_node_type(
    sim: Simulator, old: Simulator, http: aiohttp.ClientSession
) -> None:
    wf = {
        "3": {"class_type": "Foo", "inputs": {}, "_meta": {"title": "My Foo"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    status, body = await post(http, sim, {"prompt": wf})
    assert status == 400 and body == {
        "error": {
            "type": "missing_node_type",
            "message": "Node 'My Foo' not found. The custom node may not be installed.",
            "details": "Node ID '#3'",
            "extra_info": {"node_id": "3", "class_type": "Foo", "node_title": "My Foo"},
        },
        "node_errors": {},
    }
    del wf["3"]["class_type"]
    _, body = await post(http, sim, {"prompt": wf})
    assert body["error"]["message"] == (
        "Node 'My Foo' has no class_type. "
        "The workflow may be corrupted or a custom node is missing."
    )
    assert body["error"]["extra_info"]["class_type"] is None
    wf["3"]["class_type"] = "Foo"
    status, body = await post(http, old, {"prompt": wf})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    assert body["error"]["message"] == "Cannot execute because node Foo does not exist."


async def test_create_time_and_hidden_secrets(
    sim: Simulator, old: Simulator, http: aiohttp.ClientSession
) -> None:
    for server in (sim, old):
        server.hold_starts()
        blocker = str(uuid.uuid4())
        await post(http, server, {"prompt": invert("b", 1), "prompt_id": blocker})
        extra = {"auth_token_comfy_org": "secret", "create_time": 1, "keep": "me"}
        pid = str(uuid.uuid4())
        async with http.post(
            server.url + "/prompt",
            json={"prompt": invert("s", 2), "prompt_id": pid, "extra_data": extra},
            headers={"Comfy-Usage-Source": "tests"},
        ) as r:
            assert r.status == 200
        _, queue = await get(http, server.url + "/queue")
        (item,) = queue["queue_pending"]
        assert len(item) == 5 and item[1] == pid and item[3]["keep"] == "me"
        if server is sim:
            assert "auth_token_comfy_org" not in item[3]
            assert item[3]["create_time"] > 1  # the server's clock overwrote the client's value
            assert item[3]["comfy_usage_source"] == "tests"
        else:
            assert item[3]["auth_token_comfy_org"] == "secret" and item[3]["create_time"] == 1
        server.release_starts()
        entry = await wait_history(http, server.url, pid)
        assert "auth_token_comfy_org" not in entry["prompt"][3]


async def test_jobs_list_detail_and_errors(sim: Simulator, http: aiohttp.ClientSession) -> None:
    done = await run(http, sim, invert("j1", 1))
    sim.fail_nodes = {"ImageInvert": ("RuntimeError", "boom")}
    failed = await run(http, sim, invert("j2", 2))
    sim.fail_nodes = {}
    sim.hold_starts()
    running, pending = str(uuid.uuid4()), str(uuid.uuid4())
    await post(http, sim, {"prompt": invert("j3", 3), "prompt_id": running})
    await post(http, sim, {"prompt": invert("j4", 4), "prompt_id": pending})
    status, body = await get(http, sim.url + "/api/jobs")
    assert status == 200
    by_id = {j["id"]: j for j in body["jobs"]}
    assert {by_id[p]["status"] for p in (done, failed, running, pending)} == {
        "completed",
        "failed",
        "in_progress",
        "pending",
    }
    assert body["pagination"] == {"offset": 0, "limit": None, "total": 4, "has_more": False}
    assert [j["create_time"] for j in body["jobs"]] == sorted(
        (j["create_time"] for j in body["jobs"]), reverse=True
    )
    assert all(v is not None for j in body["jobs"] for v in j.values())  # nulls omitted
    ok = by_id[done]
    assert ok["outputs_count"] == 1 and ok["previewable_outputs_count"] == 1
    assert ok["preview_output"]["nodeId"] == "3" and ok["preview_output"]["mediaType"] == "images"
    assert ok["execution_end_time"] >= ok["execution_start_time"] >= ok["create_time"]
    assert by_id[failed]["execution_error"]["exception_message"].startswith("boom")
    # Paging and filters.
    _, page = await get(http, sim.url + "/api/jobs?limit=1&offset=1&sort_order=asc")
    assert len(page["jobs"]) == 1 and page["pagination"]["has_more"] is True
    _, only = await get(http, sim.url + "/api/jobs?status=PENDING,failed")
    assert {j["id"] for j in only["jobs"]} == {pending, failed}
    # Detail views.
    _, detail = await get(http, f"{sim.url}/api/jobs/{done}")
    assert detail["outputs"]["3"]["images"][0]["filename"].startswith("j1_")
    assert detail["execution_status"]["status_str"] == "success"
    assert detail["workflow"]["prompt"]["3"]["class_type"] == "SaveImage"
    _, queued = await get(http, f"{sim.url}/api/jobs/{pending}")
    assert queued["status"] == "pending" and "workflow" in queued and "outputs" not in queued
    assert await get(http, sim.url + "/api/jobs/nope") == (404, {"error": "Job not found"})
    assert (await get(http, sim.url + "/jobs"))[0] == 404  # not at /jobs (a docs draft)
    assert (await get(http, sim.url + "/api/api/jobs"))[0] == 200
    bad = {
        "status=x": "Invalid status value(s): x. Valid values: pending, in_progress, completed, "
        "failed, cancelled",
        "sort_by=create_time": "sort_by must be 'created_at' or 'execution_duration'",
        "sort_order=up": "sort_order must be 'asc' or 'desc'",
        "limit=0": "limit must be a positive integer",
        "limit=a": "limit must be an integer",
        "offset=z": "offset must be an integer",
    }
    for query, text in bad.items():
        assert await get(http, f"{sim.url}/api/jobs?{query}") == (400, {"error": text})
    sim.release_starts()


async def test_cancel_routes(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.hold_starts()
    running, pending, other = (str(uuid.uuid4()) for _ in range(3))
    for pid, color in ((running, 1), (pending, 2), (other, 3)):
        await post(http, sim, {"prompt": invert("c", color), "prompt_id": pid})

    async def cancel(path: str, **kw: Any) -> tuple[int, Any]:
        async with http.post(sim.url + path, **kw) as r:
            return r.status, await r.json()

    assert await cancel(f"/api/jobs/{pending}/cancel") == (200, {"cancelled": True})
    assert await get(http, f"{sim.url}/api/jobs/{pending}") == (404, {"error": "Job not found"})
    assert await cancel(f"/api/jobs/{pending}/cancel") == (200, {"cancelled": False})
    assert await cancel("/api/jobs/not-a-uuid/cancel") == (200, {"cancelled": False})
    assert await cancel("/api/jobs/cancel", data=b"") == (
        400,
        {"error": "Request body must be valid JSON"},
    )
    assert await cancel("/api/jobs/cancel", json={"job_ids": "x"}) == (
        400,
        {"error": "job_ids must be a list"},
    )
    assert await cancel("/api/jobs/cancel", json={"job_ids": [other, other.upper()]}) == (
        400,
        {"error": "job_ids contains invalid id(s)", "invalid_ids": [other.upper()]},
    )
    assert (await get(http, f"{sim.url}/api/jobs/{other}"))[1]["status"] == "pending"
    assert await cancel("/api/jobs/cancel", json={"job_ids": []}) == (200, {"cancelled": False})
    assert await cancel("/api/jobs/cancel", json={"job_ids": [running, other]}) == (
        200,
        {"cancelled": True},
    )
    sim.release_starts()
    entry = await wait_history(http, sim.url, running)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    assert (await get(http, f"{sim.url}/api/jobs/{running}"))[1]["status"] == "cancelled"
    assert await get(http, f"{sim.url}/api/jobs/{other}") == (404, {"error": "Job not found"})


async def test_upload_asset_and_blake3_view(
    sim: Simulator, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"asset"
    form = aiohttp.FormData()
    form.add_field("image", data, filename="cat.png", content_type="image/png")
    async with http.post(sim.url + "/upload/image", data=form) as r:
        body = await r.json()
    digest = blake3.blake3(data).hexdigest()
    assert body["name"] == "cat.png" and body["type"] == "input"
    asset = body["asset"]
    assert asset["asset_hash"] == f"blake3:{digest}" and asset["size"] == len(data)
    assert asset["mime_type"] == "image/png" and asset["tags"] == ["input"]
    async with http.get(sim.url + "/view", params={"filename": f"blake3:{digest}"}) as r:
        assert r.status == 200 and await r.read() == data
    async with http.get(sim.url + "/view", params={"filename": "blake3:" + "0" * 64}) as r:
        assert r.status == 404
    async with Simulator(data_dir=tmp_path / "bare", assets=False) as bare:
        form = aiohttp.FormData()
        form.add_field("image", data, filename="cat.png", content_type="image/png")
        async with http.post(bare.url + "/upload/image", data=form) as r:
            assert "asset" not in await r.json()
        async with http.get(bare.url + "/view", params={"filename": f"blake3:{digest}"}) as r:
            assert r.status == 404


async def test_view_headers(sim: Simulator, old: Simulator, http: aiohttp.ClientSession) -> None:
    for server in (sim, old):  # a name with a quote (a multipart upload would %-encode it)
        (Path(server.env.input_dir) / 'a"b.svg').write_bytes(SVG)
    params = {"filename": 'a"b.svg', "type": "input"}
    async with http.get(sim.url + "/view", params=params) as r:
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert r.headers["Content-Disposition"] == 'attachment; filename="a\\"b.svg"'
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Vary"] == "Sec-Fetch-Dest" and r.headers["Cache-Control"] == "no-store"
    async with http.get(sim.url + "/view", params=params, headers={"Sec-Fetch-Dest": "image"}) as r:
        assert r.headers["Content-Type"] == "image/svg+xml"
        assert not r.headers["Content-Disposition"].startswith("attachment")
    async with http.get(old.url + "/view", params=params) as r:
        assert r.headers["Content-Type"] == "image/svg+xml"
        assert "X-Content-Type-Options" not in r.headers
    pid = await run(http, sim, invert("v", 5))
    image = (await wait_history(http, sim.url, pid))["outputs"]["3"]["images"][0]
    params = {"filename": image["filename"], "type": "output"}
    async with http.get(sim.url + "/view", params=params) as r:
        assert r.headers["Content-Type"] == "image/png"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_executed_entries_and_history(sim: Simulator, http: aiohttp.ClientSession) -> None:
    rec = await WsRecorder(http, sim.url, "ex").connect()
    try:
        pid = await run(http, sim, invert("e", 6), client_id="ex")
        await rec.wait_done(pid)
        (executed,) = rec.of_type("executed")
        image = executed.data["output"]["images"][0]
        assert image["metadata"] == {} and image["id"] == image["preview_id"]
        entry = await wait_history(http, sim.url, pid)
        assert entry["outputs"]["3"]["images"][0] == image  # history carries the same entry
        assert entry["prompt"][3]["create_time"] > 0
        assert "assets.seed.started" in rec.types()  # the scanner ran after the prompt
        # The same prompt again: cached, executed re-sent with the UI registered anew.
        again = await run(http, sim, invert("e", 6), client_id="ex")
        await rec.wait_done(again)
        resent = [f for f in rec.of_type("executed") if f.data["prompt_id"] == again]
        (second,) = (f.data["output"]["images"][0] for f in resent)
        assert second["filename"] == image["filename"] and second["id"] != image["id"]
    finally:
        await rec.close()


async def test_node_replacement(
    tmp_path: Path, old: Simulator, http: aiohttp.ClientSession
) -> None:
    table = {
        "OldInvert": [
            {
                "new_node_id": "ImageInvert",
                "input_mapping": [{"new_id": "image", "old_id": "picture"}],
                "output_mapping": [{"old_idx": 1, "new_idx": 0}],
            }
        ]
    }
    wf = invert("r", 7)
    wf["2"] = {"class_type": "OldInvert", "inputs": {"picture": ["1", 0]}}
    wf["3"]["inputs"]["images"] = ["2", 1]
    async with Simulator(data_dir=tmp_path / "r", replacements=table) as sim:
        assert await get(http, sim.url + "/node_replacements") == (200, table)
        pid = await run(http, sim, wf)
        entry = await wait_history(http, sim.url, pid)
        # The queue, history and jobs show the replaced graph.
        assert entry["prompt"][2]["2"] == {
            "class_type": "ImageInvert",
            "inputs": {"image": ["1", 0]},
        }
        assert entry["prompt"][2]["3"]["inputs"]["images"] == ["2", 0]
        assert entry["status"]["status_str"] == "success"
    status, body = await post(http, old, {"prompt": wf})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
