"""The Comfy API v2 routes over HTTP against a real comfyq and the simulator: every response
validated against the published contract, every error code provoked, idempotency under
concurrency, and v2 and comfyq's own API agreeing about the same jobs."""

from __future__ import annotations

import asyncio
import base64
import itertools
from typing import Any

import aiohttp
from support.servers import MakeServer, Server, pause, resume, wait_healthy
from support.v2 import check, check_error, check_events, parse_sse
from support.workflows import workflow

from comfyq.sim import Simulator
from comfyq.store.model import Stage
from comfyq.v2.context import V2_KEY

_colors = itertools.count(7000)


def graph(**kw: Any) -> dict[str, Any]:
    return workflow(next(_colors), **kw)


async def call(
    srv: Server, method: str, path: str, payload: Any = None, **kw: Any
) -> tuple[int, Any, Any]:
    async with srv.session.request(method, srv.u(path), json=payload, **kw) as r:
        body = await r.json() if r.content_type == "application/json" else await r.read()
        return r.status, body, r.headers


async def until_status(srv: Server, job_id: str, *statuses: str, timeout: float = 20) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        status, job, _ = await call(srv, "GET", f"/api/v2/jobs/{job_id}")
        assert status == 200, job
        check("Job", job)
        if job["status"] in statuses:
            return job
        assert loop.time() < end, f"job stayed {job['status']}"
        await asyncio.sleep(0.02)


async def submit(srv: Server, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    return await call(srv, "POST", "/api/v2/jobs", body, **kw)


async def test_job_lifecycle_matches_the_contract(server: Server) -> None:
    await wait_healthy(server)
    status, job, _ = await submit(server, {"workflow": graph()})
    assert status == 201, job
    check("Job", job)
    assert job["status"] == "queued" and job["urls"]["self"] == f"/api/v2/jobs/{job['id']}"
    done = await until_status(server, job["id"], "succeeded")
    assert done["started_at"] and done["completed_at"] and done["error"] is None
    assert done["progress"]["value"] == 1.0 and done["progress"]["nodes_total"] == 3
    assert done["metrics"]["execution_ms"] is not None
    (out,) = done["outputs"]
    assert (
        out["hash"].startswith("blake3:") and out["size_bytes"] > 0 and out["job_id"] == job["id"]
    )
    assert out["url"] == f"{server.url}/api/v2/assets/{out['id']}/content"
    # The same job through comfyq's own API: the same row, the same file.
    status, res, _ = await call(server, "GET", f"/result/{job['id']}")
    assert status == 200 and res["status"] == "completed"
    (file,) = res["output"]
    status, own, _ = await call(server, "GET", file["url"])
    status2, v2bytes, _ = await call(server, "GET", f"/api/v2/assets/{out['id']}/content")
    assert status == status2 == 200 and own == v2bytes and len(own) == out["size_bytes"]
    status, asset, _ = await call(server, "GET", f"/api/v2/assets/{out['id']}")
    assert status == 200 and check("Asset", asset)["job_id"] == job["id"]
    # The workflow behind it, the list, and cancel of a finished job (a no-op).
    status, wf, _ = await call(server, "GET", f"/api/v2/jobs/{job['id']}/workflow")
    assert status == 200 and check("JobWorkflowResponse", wf)["format"] == "api"
    assert wf["workflow"]["3"]["class_type"] == "SaveImage"
    status, page, _ = await call(server, "GET", "/api/v2/jobs?status=succeeded&limit=5")
    assert status == 200 and page["truncated"] is False
    assert [check("Job", j)["id"] for j in page["jobs"]][:1] == [job["id"]]
    status, same, _ = await call(server, "POST", f"/api/v2/jobs/{job['id']}/cancel")
    assert status == 200 and check("Job", same)["status"] == "succeeded"


async def test_a_generate_job_reads_through_v2(server: Server) -> None:
    await wait_healthy(server)
    status, res, _ = await call(
        server, "POST", "/generate/sync", {"input": {"workflow_json": graph()}}
    )
    assert status == 200 and res["status"] == "completed"
    status, job, _ = await call(server, "GET", f"/api/v2/jobs/{res['id']}")
    assert status == 200 and check("Job", job)["status"] == "succeeded"
    assert [o["name"] for o in job["outputs"]] == [o["filename"] for o in res["output"]]


async def test_submission_errors(server: Server) -> None:
    await wait_healthy(server)
    cases: list[tuple[Any, int, str]] = [
        ({"workflow": {"nodes": [], "links": [], "last_node_id": 0}}, 422, "workflow_format_ui"),
        ({"workflow": {"1": {"inputs": {}}}}, 422, "invalid_workflow"),
        (
            {"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}},
            422,
            "invalid_workflow",
        ),
        ({"workflow": {}}, 422, "invalid_workflow"),
        ({"workflow": graph(), "webhook_url": "http://x.test/"}, 422, "invalid_request"),
        ({"workflow": graph(), "inputs": {}}, 422, "invalid_request"),
        ({"workflow": graph(), "extra_data": {"other": 1}}, 422, "invalid_request"),
        ({"workflow": graph(), "surprise": 1}, 422, "invalid_request"),
        ({"nope": 1}, 422, "invalid_request"),
        ([1, 2], 422, "invalid_request"),
    ]
    for body, code, err in cases:
        status, resp, _ = await submit(server, body)
        assert status == code, (body, resp)
        check_error(resp, err)
    status, resp, _ = await submit(
        server, {"workflow": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["9", 0]}}}}
    )
    assert resp["error"]["details"]["node_errors"]["1"][0]["field"] == "image"
    wf = graph()
    wf["1"]["inputs"]["width"] = {
        "__type": "core/ASSET",
        "info": {"id": "0a0a0a0a-0000-4000-8000-000000000000"},
    }
    status, resp, _ = await submit(server, {"workflow": wf})
    assert status == 422 and check_error(resp, "missing_asset")
    async with server.session.post(
        server.u("/api/v2/jobs"), data=b"{nope", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 422 and check_error(await r.json(), "invalid_request")
    async with server.session.post(
        server.u("/api/v2/jobs"), data=b"x", headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415 and check_error(await r.json(), "unsupported_media_type")
    for path in ("/api/v2/jobs/nope", "/api/v2/jobs/nope/workflow", "/api/v2/assets/nope"):
        status, resp, _ = await call(server, "GET", path)
        assert status == 404 and check_error(resp, "not_found"), path
    status, resp, _ = await call(server, "POST", "/api/v2/jobs/nope/cancel")
    assert status == 404 and check_error(resp, "not_found")
    status, resp, _ = await call(server, "GET", "/api/v2/jobs?limit=0")
    assert status == 422 and check_error(resp, "invalid_request")
    status, resp, _ = await call(server, "GET", "/api/v2/jobs?status=done")
    assert status == 422 and check_error(resp, "invalid_request")
    status, resp, _ = await call(server, "PUT", "/api/v2/jobs")
    assert status == 405 and check_error(resp, "method_not_allowed")


async def test_extra_data_is_forwarded_never_stored(server: Server) -> None:
    await wait_healthy(server)
    secret = "comfyui-partner-key-123"
    # A pass-through spy on the ComfyUI client (the request it sends is the real one): what
    # extra_data went out with each prompt. ComfyUI's history strips the key, so it cannot tell.
    sent: list[Any] = []
    client = server.services.pool.backends[0].client
    real_submit = client.submit

    async def spy(workflow: Any, prompt_id: str, **kw: Any) -> Any:
        sent.append(kw.get("extra_data"))
        return await real_submit(workflow, prompt_id, **kw)

    client.submit = spy  # type: ignore[method-assign]
    status, job, _ = await submit(
        server, {"workflow": graph(), "extra_data": {"api_key_comfy_org": secret}}
    )
    assert status == 201 and secret not in str(job)
    done = await until_status(server, job["id"], "succeeded")
    assert secret not in str(done)
    db = (
        server.services.db_path.read_bytes()
        + server.services.db_path.with_name("q.db-wal").read_bytes()
    )
    assert secret.encode() not in db
    assert sent == [{"api_key_comfy_org": secret}]
    assert job["id"] not in server.services.generate.extra_data  # dropped when the job ended


async def test_idempotency_key_single_use_and_atomic(server: Server) -> None:
    await wait_healthy(server)
    body = {"workflow": graph()}
    results = await asyncio.gather(
        *(submit(server, body, headers={"Idempotency-Key": "dup-1"}) for _ in range(12))
    )
    codes = sorted(s for s, _, _ in results)
    assert codes == [201] + [422] * 11
    for status, resp, _ in results:
        if status == 422:
            check_error(resp, "idempotency_key_reuse")
    rows = await server.services.store.list_jobs(limit=100)
    assert len(rows) == 1
    # Another body under the same key: still refused.
    status, resp, _ = await submit(
        server, {"workflow": graph()}, headers={"Idempotency-Key": "dup-1"}
    )
    assert status == 422 and check_error(resp, "idempotency_key_reuse")
    status, resp, _ = await submit(server, body, headers={"Idempotency-Key": "x" * 300})
    assert status == 422 and check_error(resp, "invalid_request")


async def test_queue_full_is_429_and_releases_the_key(make_server: MakeServer) -> None:
    srv = await make_server(max_queue_size=1)
    await wait_healthy(srv)
    pause(srv, Stage.PREPROCESS)
    status, first, _ = await submit(srv, {"workflow": graph()})
    assert status == 201
    status, resp, headers = await submit(
        srv, {"workflow": graph()}, headers={"Idempotency-Key": "k-full"}
    )
    assert status == 429 and check_error(resp, "queue_full") and int(headers["Retry-After"]) > 0
    resume(srv, Stage.PREPROCESS)
    await until_status(srv, first["id"], "succeeded")
    status, again, _ = await submit(
        srv, {"workflow": graph()}, headers={"Idempotency-Key": "k-full"}
    )
    assert status == 201, again  # the refused submission did not keep the key


async def test_api_keys_guard_v2_but_not_its_health(make_server: MakeServer) -> None:
    srv = await make_server(api_keys=["sekrit"])
    for path in ("/api/v2/jobs", "/api/v2/jobs/x", "/api/v2/assets/x"):
        status, resp, headers = await call(srv, "GET", path)
        assert (
            status == 401
            and check_error(resp, "unauthorized")
            and "Bearer" in headers["WWW-Authenticate"]
        )
    status, resp, _ = await call(
        srv, "GET", "/api/v2/jobs", headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401
    status, resp, _ = await call(
        srv, "GET", "/api/v2/jobs", headers={"Authorization": "Bearer sekrit"}
    )
    assert status == 200 and resp["jobs"] == []
    await wait_healthy(srv)
    status, _, _ = await call(srv, "GET", "/api/v2/health")
    assert status == 200


async def test_expired_jobs_and_their_outputs_are_gone(make_server: MakeServer) -> None:
    srv = await make_server(retention_seconds=0.001)
    await wait_healthy(srv)
    status, job, _ = await submit(srv, {"workflow": graph()})
    assert status == 201
    job_id = job["id"]
    for _ in range(500):
        row = await srv.services.store.get(job_id)
        if row is not None and row.terminal:
            break
        await asyncio.sleep(0.02)
    outputs = await srv.services.store.outputs(job_id)
    assert outputs and outputs[0]["asset_id"]
    await asyncio.sleep(0.01)
    for path in (f"/api/v2/jobs/{job_id}", f"/api/v2/assets/{outputs[0]['asset_id']}"):
        status, resp, _ = await call(srv, "GET", path)
        assert status == 404 and check_error(resp, "not_found"), path


async def test_events_two_streams_get_everything(server: Server, simulator: Simulator) -> None:
    simulator.node_durations = {"ImageBlur": 0.5}
    simulator.progress_steps = 5
    await wait_healthy(server)
    pause(server, Stage.GENERATE)
    status, job, _ = await submit(server, {"workflow": graph(blur=True)})
    assert status == 201

    async def stream() -> list[tuple[str, dict[str, Any]]]:
        async with server.session.get(server.u(job["urls"]["events"])) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            return parse_sse((await r.read()).decode())

    tasks = [asyncio.create_task(stream()) for _ in range(2)]
    await asyncio.sleep(0.2)
    resume(server, Stage.GENERATE)
    a, b = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for frames in (a, b):
        check_events(frames)
        kinds = [e for e, _ in frames]
        statuses = [d["status"] for e, d in frames if e == "status"]
        assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
        assert kinds[-1] == "status" and kinds[-2] == "output"
        assert check("Job", frames[-1][1])["outputs"][0]["id"] == frames[-2][1]["id"]
        values = [d["value"] for e, d in frames if e == "progress"]
        assert values and values == sorted(values)
        assert all(0 <= v <= 1 for v in values)
        assert not [s for s in statuses[:-1] if s in ("succeeded", "failed", "canceled", "expired")]
    assert [d["status"] for e, d in a if e == "status"][-1] == [
        d["status"] for e, d in b if e == "status"
    ][-1]
    # A finished job's stream: its terminal status at once, then the end.
    async with server.session.get(server.u(job["urls"]["events"])) as r:
        frames = parse_sse((await r.read()).decode())
    assert [e for e, _ in frames] == ["output", "status"] and frames[-1][1]["status"] == "succeeded"


async def test_stream_cap_per_key(make_server: MakeServer) -> None:
    srv = await make_server(v2_streams_per_key=1)
    await wait_healthy(srv)
    pause(srv, Stage.PREPROCESS)
    _, job, _ = await submit(srv, {"workflow": graph()})
    async with aiohttp.ClientSession() as s2:
        async with srv.session.get(srv.u(job["urls"]["events"])) as first:
            assert first.status == 200
            await first.content.readline()  # the first status frame is on its way: the slot is held
            async with s2.get(srv.u(job["urls"]["events"])) as second:
                assert second.status == 429
                check_error(await second.json(), "too_many_streams")
                assert second.headers["Retry-After"]
            resume(srv, Stage.PREPROCESS)
            await first.read()
        async with s2.get(srv.u(job["urls"]["events"])) as third:  # the slot was given back
            assert third.status == 200
            await third.read()


async def test_client_keys_see_only_their_own_jobs_and_assets(make_server: MakeServer) -> None:
    srv = await make_server(api_keys=["client:key-a", "client:key-b", "admin:key-root"])
    await wait_healthy(srv)
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    root = {"Authorization": "Bearer key-root"}
    form = aiohttp.FormData()
    form.add_field("content_type", "image/png")
    form.add_field("file_path", "mine.png")
    form.add_field("file", b"\x89PNG not really", filename="mine.png")
    async with srv.session.post(srv.u("/api/v2/assets"), data=form, headers=a) as r:
        asset = await r.json()
        assert r.status == 201, asset
    status, job, _ = await submit(srv, {"workflow": graph()}, headers=a)
    assert status == 201
    done = await until_status_as(srv, job["id"], a)
    out_id = done["outputs"][0]["id"]
    for path in (
        f"/api/v2/jobs/{job['id']}",
        f"/api/v2/jobs/{job['id']}/workflow",
        f"/api/v2/jobs/{job['id']}/events",
        f"/api/v2/assets/{asset['id']}",
        f"/api/v2/assets/{asset['id']}/content",
        f"/api/v2/assets/{out_id}",
        f"/api/v2/assets/{out_id}/content",
    ):
        status, resp, _ = await call(srv, "GET", path, headers=b)
        assert status == 404 and check_error(resp, "not_found"), path
        status, _, _ = await call(srv, "GET", path, headers=a)
        assert status == 200, path
        status, _, _ = await call(srv, "GET", path, headers=root)
        assert status == 200, path
    status, resp, _ = await call(srv, "POST", f"/api/v2/jobs/{job['id']}/cancel", headers=b)
    assert status == 404
    status, resp, _ = await call(srv, "DELETE", f"/api/v2/assets/{asset['id']}", headers=b)
    assert status == 404
    status, page, _ = await call(srv, "GET", "/api/v2/jobs", headers=b)
    assert status == 200 and page["jobs"] == []
    status, page, _ = await call(srv, "GET", "/api/v2/jobs", headers=a)
    assert [j["id"] for j in page["jobs"]] == [job["id"]]
    async with srv.session.head(srv.u(f"/api/v2/assets/by-hash/{asset['hash']}"), headers=b) as r:
        assert r.status == 404
    async with srv.session.head(srv.u(f"/api/v2/assets/by-hash/{asset['hash']}"), headers=a) as r:
        assert r.status == 200
    async with srv.session.post(
        srv.u("/api/v2/assets/from-hash"), json={"hash": asset["hash"]}, headers=b
    ) as r:
        assert r.status == 404 and check_error(await r.json(), "blob_not_found")
    wf = graph()
    wf["1"]["inputs"]["color"] = {"__type": "core/ASSET", "info": {"id": asset["id"]}}
    status, resp, _ = await submit(srv, {"workflow": wf}, headers=b)
    assert status == 422 and check_error(resp, "missing_asset")
    # The same Idempotency-Key value is each key's own.
    status, _, _ = await submit(srv, {"workflow": graph()}, headers={**a, "Idempotency-Key": "k"})
    assert status == 201
    status, _, _ = await submit(srv, {"workflow": graph()}, headers={**b, "Idempotency-Key": "k"})
    assert status == 201


async def until_status_as(srv: Server, job_id: str, headers: dict[str, str]) -> Any:
    for _ in range(1000):
        status, job, _ = await call(srv, "GET", f"/api/v2/jobs/{job_id}", headers=headers)
        assert status == 200
        if job["status"] in ("succeeded", "failed"):
            assert job["status"] == "succeeded", job
            return job
        await asyncio.sleep(0.02)
    raise AssertionError("job did not finish")


async def test_events_carry_previews_and_the_latest_on_connect(
    server: Server, simulator: Simulator
) -> None:
    simulator.node_durations = {"SaveImageWebsocket": 4.5}  # 1.5 s per image
    await wait_healthy(server)
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 3, "color": next(_colors)},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    status, job, _ = await submit(server, {"workflow": wf})
    assert status == 201

    async def frames() -> list[tuple[str, dict[str, Any]]]:
        async with server.session.get(server.u(job["urls"]["events"])) as r:
            return parse_sse((await r.read()).decode())

    first = asyncio.create_task(frames())
    tracker = server.runner.app[V2_KEY].tracker
    for _ in range(1000):  # the first preview has arrived: a stream opened now gets it at once
        live = tracker.live(job["id"])
        if live is not None and live.preview is not None:
            break
        await asyncio.sleep(0.01)
    late = await frames()
    early = await first
    for got in (early, late):
        check_events(got)
        previews = [d for e, d in got if e == "preview"]
        assert previews and previews[0]["content_type"].startswith("image/")
        assert base64.b64decode(previews[0]["data_base64"])[:4] == b"\x89PNG"
    assert [e for e, _ in late][:3] == ["status", "progress", "preview"]  # the snapshot on connect


async def test_hostile_submissions_are_4xx(make_server: MakeServer) -> None:
    srv = await make_server(max_json_bytes=4096, max_workflow_nodes=5)
    big = {"workflow": {str(i): {"class_type": "X", "inputs": {"s": "y" * 100}} for i in range(60)}}
    status, resp, _ = await submit(srv, big)
    assert status == 413 and check_error(resp, "payload_too_large")
    many = {"workflow": {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(6)}}
    status, resp, _ = await submit(srv, many)
    assert status == 422 and check_error(resp, "invalid_workflow")
    assert "max_workflow_nodes" in resp["error"]["message"]
    cycle = {
        "workflow": {
            "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        }
    }
    status, resp, _ = await submit(srv, cycle)
    assert status == 422 and check_error(resp, "invalid_workflow")
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    status, resp, _ = await submit(
        srv, {"workflow": {"1": {"class_type": "X", "inputs": {"a": deep}}}}
    )
    assert status == 422 and check_error(resp, "invalid_request")
    bad_name = {"workflow": {"1": {"class_type": "Save\x00Image", "inputs": {}}}}
    status, resp, _ = await submit(srv, bad_name)
    assert status == 422 and check_error(resp, "invalid_workflow")


async def test_listing_pages_and_label_filters(server: Server) -> None:
    await wait_healthy(server)
    ids = []
    for i in range(3):
        body = {"workflow": graph(), "metadata": {"run": str(i % 2), "team": "a"}}
        status, job, _ = await submit(server, body)
        assert status == 201 and job["metadata"] == body["metadata"]
        ids.append(job["id"])
    status, page, _ = await call(server, "GET", "/api/v2/jobs?limit=2")
    assert status == 200 and [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    status, rest, _ = await call(
        server, "GET", f"/api/v2/jobs?limit=2&cursor={page['next_cursor']}"
    )
    assert status == 200 and [j["id"] for j in rest["jobs"]] == [ids[0]]
    assert "next_cursor" not in rest
    status, got, _ = await call(server, "GET", "/api/v2/jobs?metadata[run]=0&metadata[team]=a")
    assert status == 200 and [j["id"] for j in got["jobs"]] == [ids[2], ids[0]]
    assert all(check("Job", j)["metadata"]["run"] == "0" for j in got["jobs"])
    status, resp, _ = await call(server, "GET", "/api/v2/jobs?cursor=nope!")
    assert status == 422 and check_error(resp, "invalid_request")
    status, resp, _ = await submit(server, {"workflow": graph(), "metadata": {"k": 5}})
    assert status == 422 and check_error(resp, "metadata_invalid")


async def test_stream_end_poll_and_content_agree_and_forget_a_deleted_job(
    server: Server,
) -> None:
    # The terminal status of a stream is built from the row its end committed (no read): it is
    # the job a poll answers, metadata and node count included; polls of the unchanged job get
    # the same bytes; an output's content URL stops working once its job is gone.
    await wait_healthy(server)
    pause(server, Stage.GENERATE)
    body = {"workflow": graph(), "metadata": {"run": "stream-end"}}
    status, job, _ = await submit(server, body)
    assert status == 201
    async with server.session.get(server.u(job["urls"]["events"])) as r:
        head = b""
        while not head.endswith(b"\n\n"):  # the first frame: the end comes on the bus
            head += await r.content.readline()
        resume(server, Stage.GENERATE)
        frames = parse_sse((head + await r.read()).decode())
    check_events(frames)
    end = frames[-1][1]
    assert end["status"] == "succeeded" and end["metadata"] == body["metadata"]
    assert end["progress"]["nodes_total"] == len(body["workflow"]) > 0
    polls = []
    for _ in range(2):
        async with server.session.get(server.u(job["urls"]["self"])) as r:
            assert r.status == 200
            polls.append(await r.read())
    assert polls[0] == polls[1]
    status, got, _ = await call(server, "GET", job["urls"]["self"])
    assert check("Job", got) == end
    url = got["outputs"][0]["url"]
    for _ in range(2):
        async with server.session.get(url) as r:
            assert r.status == 200 and await r.read()
    assert await server.services.store.delete_finished(job["id"])
    for path in (job["urls"]["self"], url[url.index("/api/v2/") :]):
        status, resp, _ = await call(server, "GET", path)
        assert status == 404 and check_error(resp, "not_found"), path


async def test_polls_reuse_an_unchanged_answer_and_see_every_change(
    server: Server, simulator: Simulator
) -> None:
    # Polls of a job that has not changed get the answer built before; a cancel request (which
    # moves no state while the job runs) and every transition show up in the next poll.
    await wait_healthy(server)
    pause(server, Stage.GENERATE)
    status, waiting, _ = await submit(server, {"workflow": graph()})
    assert status == 201

    async def raw(job_id: str) -> bytes:
        async with server.session.get(server.u(f"/api/v2/jobs/{job_id}")) as r:
            assert r.status == 200
            return await r.read()

    for _ in range(250):  # prepared, then waiting for generation (paused): nothing moves
        first = await until_status(server, waiting["id"], "queued")
        if first["queue_position"] == 1:
            break
        await asyncio.sleep(0.02)
    assert first["queue_position"] == 1
    assert await raw(waiting["id"]) == await raw(waiting["id"])
    status, _, _ = await call(server, "POST", f"/api/v2/jobs/{waiting['id']}/cancel")
    assert status == 200
    await until_status(server, waiting["id"], "canceled", timeout=5)
    resume(server, Stage.GENERATE)

    simulator.node_durations = {"ImageBlur": 2.0}
    status, job, _ = await submit(server, {"workflow": graph(blur=True)})
    assert status == 201
    running = await until_status(server, job["id"], "running")
    assert check("Job", running)["status"] == "running"
    status, _, _ = await call(server, "POST", f"/api/v2/jobs/{job['id']}/cancel")
    assert status == 200
    status, now, _ = await call(server, "GET", f"/api/v2/jobs/{job['id']}")
    assert status == 200 and now["status"] in ("canceling", "canceled"), now["status"]
    await until_status(server, job["id"], "canceled", timeout=20)
