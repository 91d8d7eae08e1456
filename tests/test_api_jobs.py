"""Jobs over a real server with the simulator as ComfyUI: results, sync status mapping, cancel,
listing, queue info, positions and ETAs, output downloads, base64."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import serve
from support.servers import MakeServer, Server, pause, resume, wait_healthy
from support.workflows import workflow

from comfyq.config import Settings
from comfyq.sim import Simulator
from comfyq.sim.generation import VERSIONS
from comfyq.store.model import Stage, State

_colors = itertools.count(1000)


def body(**extra: Any) -> dict[str, Any]:
    blur = extra.pop("blur", False)
    return {"input": {"workflow_json": workflow(next(_colors), blur=blur), **extra}}


async def call(
    srv: Server, method: str, path: str, payload: Any = None, **kw: Any
) -> tuple[int, Any, Any]:
    async with srv.session.request(method, srv.u(path), json=payload, **kw) as r:
        return (
            r.status,
            (await r.json() if r.content_type == "application/json" else await r.read()),
            r.headers,
        )


async def until(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


def state_is(srv: Server, job_id: str, *states: str) -> Any:
    async def check() -> bool:
        job = await srv.services.store.get(job_id)
        return job is not None and job.state in states

    return check


def slow(sim: Simulator, seconds: float, steps: int = 0) -> None:
    sim.node_durations = {"ImageBlur": seconds}
    sim.progress_steps = steps


# --- results and sync --------------------------------------------------------------------------


async def test_sync_completes_with_outputs_and_result_matches(server: Server) -> None:
    await wait_healthy(server)
    status, res, headers = await call(server, "POST", "/generate/sync", body(request_id="sync-ok"))
    assert (
        status == 200 and res["status"] == "completed" and headers["Location"] == "/result/sync-ok"
    )
    assert res["attempts"] == 1 and res["error"] is None and res["finished_at"]
    assert res["timings"]["total_ms"] is not None and res["timings"]["generation_ms"] >= 0
    (out,) = res["output"]
    assert (
        out["node_id"] == "3" and out["output_type"] == "images" and out["mimetype"] == "image/png"
    )
    assert (
        out["url"] == f"/outputs/sync-ok/{out['filename']}"
        and out["size"] > 0
        and "data" not in out
    )
    for path in ("/result/sync-ok", "/jobs/sync-ok"):
        status, again, _ = await call(server, "GET", path)
        assert status == 200 and again == res


async def test_result_of_unknown_job_is_404(server: Server) -> None:
    for method, path in (
        ("GET", "/result/nope"),
        ("GET", "/jobs/nope"),
        ("POST", "/cancel/nope"),
        ("DELETE", "/jobs/nope"),
        ("GET", "/jobs/nope/events"),
        ("GET", "/outputs/nope/x.png"),
    ):
        status, err, _ = await call(server, method, path)
        assert status == 404 and err["error"]["type"] == "not_found", path


async def test_result_in_every_state(server: Server, simulator: Simulator) -> None:
    slow(simulator, 0.6, steps=6)
    await wait_healthy(server)
    status, res, _ = await call(server, "POST", "/generate", body(request_id="states", blur=True))
    assert status == 202 and res["status"] == "queued"
    seen = set()
    steps = []
    for _ in range(400):
        _, r, _ = await call(server, "GET", "/result/states")
        seen.add(r["status"])
        if r["progress"] and r["progress"]["max"] == 6:
            steps.append(r["progress"])
        assert r["progress"] is None or r["status"] == "generating"
        if r["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    assert {"generating", "completed"} <= seen
    assert steps and all(
        p["node"] == "4" and p["node_type"] == "ImageBlur" and 0 < p["percent"] <= 100
        for p in steps
    )


async def test_sync_rejected_workflow_is_400_with_node_errors(server: Server) -> None:
    bad = {"input": {"workflow_json": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}}
    status, res, _ = await call(server, "POST", "/generate/sync", bad)
    assert (
        status == 400 and res["status"] == "failed" and res["error"]["type"] == "validation_error"
    )
    assert res["error"]["message"]


async def test_sync_node_error_is_500(server: Server, simulator: Simulator) -> None:
    simulator.fail_nodes = {"ImageInvert": ("RuntimeError", "the node broke")}
    status, res, _ = await call(server, "POST", "/generate/sync", body())
    assert status == 500 and res["error"]["type"] == "node_error"
    assert res["error"]["node_id"] == "2" and res["error"]["node_type"] == "ImageInvert"
    assert "the node broke" in res["error"]["message"]


async def test_sync_comfyui_down_is_502_after_retries(server: Server, simulator: Simulator) -> None:
    await wait_healthy(server)
    simulator.reject_next = [(500, "internal error")] * 10
    status, res, _ = await call(server, "POST", "/generate/sync", body())
    assert status == 502 and res["error"]["type"] in ("comfyui_unreachable", "prompt_lost")
    assert res["attempts"] == res["max_attempts"] == 3


async def test_sync_job_deadline_is_500_timeout(server: Server, simulator: Simulator) -> None:
    slow(simulator, 3.0)
    status, res, _ = await call(server, "POST", "/generate/sync", body(blur=True, timeout=0.4))
    assert status == 500 and res["error"]["type"] == "timeout"


async def test_sync_timeout_answers_202_and_the_job_goes_on(
    server: Server, simulator: Simulator
) -> None:
    slow(simulator, 0.8)
    req = body(request_id="st", blur=True)
    status, res, headers = await call(server, "POST", "/generate/sync?timeout=0.2", req)
    assert status == 202 and res["status"] not in ("completed", "failed", "cancelled")
    assert headers["Location"] == "/result/st"
    await until(state_is(server, "st", "completed"))
    status, res, _ = await call(server, "POST", "/generate/sync?timeout=0", req)
    assert status == 200 and res["status"] == "completed"  # same id, same payload: the finished job


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
async def test_sync_bad_timeout_is_400(server: Server, value: str) -> None:
    status, err, _ = await call(server, "POST", f"/generate/sync?timeout={value}", body())
    assert status == 400 and err["error"]["fields"][0]["path"] == "$.query.timeout"


async def test_sync_client_disconnect_does_not_cancel(server: Server, simulator: Simulator) -> None:
    slow(simulator, 0.8)
    with pytest.raises(asyncio.TimeoutError):
        async with server.session.post(
            server.u("/generate/sync"),
            json=body(request_id="gone", blur=True),
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as r:
            await r.read()
    await until(state_is(server, "gone", "completed", "failed", "cancelled"))
    job = await server.services.store.get("gone")
    assert job is not None and job.state == State.COMPLETED


# --- cancel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("comfyui_version", VERSIONS)  # the atomic route, and the 0.3.64 pair
async def test_cancel_waiting_running_finished(server: Server, simulator: Simulator) -> None:
    await wait_healthy(server)
    slow(simulator, 5.0)
    # Running: ComfyUI is interrupted for this prompt and the job ends cancelled.
    sync = asyncio.ensure_future(
        call(server, "POST", "/generate/sync", body(request_id="run", blur=True))
    )
    await until(state_is(server, "run", "running"))
    await until(lambda: _stage(server, "run", "generate"))
    await asyncio.sleep(0.2)
    status, res, _ = await call(server, "POST", "/cancel/run")
    assert status == 200 and res["status"] == "cancelled" and res["error"]["type"] == "cancelled"
    status, res, _ = await sync
    assert status == 499 and res["status"] == "cancelled"
    # Waiting: cancelled at once.
    pause(server, Stage.PREPROCESS)
    await call(server, "POST", "/generate", body(request_id="wait"))
    status, res, _ = await call(server, "DELETE", "/jobs/wait")
    assert status == 200 and res["status"] == "cancelled"
    # Finished: left as it is.
    resume(server, Stage.PREPROCESS)
    slow(simulator, 0.0)
    status, res, _ = await call(server, "POST", "/generate/sync", body(request_id="done"))
    assert status == 200
    for method, path in (("POST", "/cancel/done"), ("DELETE", "/jobs/done")):
        status, res, _ = await call(server, method, path)
        assert status == 200 and res["status"] == "completed"


async def _stage(srv: Server, job_id: str, stage: str) -> bool:
    job = await srv.services.store.get(job_id)
    return (
        job is not None
        and job.stage == stage
        and job.state == State.RUNNING
        and bool(job.comfy_prompt_id)
    )


# --- listing and queue info ---------------------------------------------------------------------


async def test_queue_info_counts_waiting_and_in_flight(server: Server) -> None:
    pause(server, Stage.PREPROCESS)
    for i in range(3):
        await call(server, "POST", "/generate", body(request_id=f"w{i}"))
    status, info, _ = await call(server, "GET", "/queue-info")
    assert status == 200
    assert (
        info["preprocess_queue_size"],
        info["generation_queue_size"],
        info["postprocess_queue_size"],
    ) == (3, 0, 0)
    assert (
        info["preprocess_in_flight"] == 0
        and info["unfinished"] == 3
        and info["max_queue_size"] == Settings().max_queue_size
    )


async def test_list_jobs_pages_and_filters(server: Server) -> None:
    await wait_healthy(server)
    await call(server, "POST", "/generate/sync", body(request_id="listed-done"))
    pause(server, Stage.PREPROCESS)
    for i in range(5):
        await call(server, "POST", "/generate", body(request_id=f"listed-{i}"))
    ids: list[str] = []
    cursor = ""
    for _ in range(10):
        status, page, _ = await call(
            server, "GET", f"/jobs?limit=2{'&cursor=' + cursor if cursor else ''}"
        )
        assert status == 200 and len(page["jobs"]) <= 2
        ids += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert ids == [f"listed-{i}" for i in range(4, -1, -1)] + [
        "listed-done"
    ]  # newest first, no repeats
    _, page, _ = await call(server, "GET", "/jobs?status=queued")
    assert sorted(j["id"] for j in page["jobs"]) == [f"listed-{i}" for i in range(5)]
    _, page, _ = await call(server, "GET", "/jobs?status=completed,cancelled")
    assert [j["id"] for j in page["jobs"]] == ["listed-done"] and page["jobs"][0]["output"]
    _, page, _ = await call(server, "GET", "/jobs?status=failed&status=completed")
    assert [j["id"] for j in page["jobs"]] == ["listed-done"]
    for query, param in (
        ("status=nope", "status"),
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("limit=501", "limit"),
        ("cursor=%%%", "cursor"),
        ("cursor=WzFd", "cursor"),
    ):
        status, err, _ = await call(server, "GET", f"/jobs?{query}")
        assert status == 400 and err["error"]["fields"][0]["path"] == f"$.query.{param}", query


# --- positions and estimates ----------------------------------------------------------------------


async def first_event(srv: Server, job_id: str) -> dict[str, Any]:
    """The first event that says where the job stands (the last one replayed)."""
    async with srv.session.get(srv.u(f"/jobs/{job_id}/events")) as r:
        async for line in r.content:
            if line.startswith(b"data: ") and b'"queue_position"' in line:
                return json.loads(line[6:])  # type: ignore[no-any-return]
    raise AssertionError("no event")


async def test_positions_follow_priority_then_age_and_eta_uses_measurements(
    server: Server, simulator: Simulator
) -> None:
    await wait_healthy(server)
    ev = None
    pause(server, Stage.GENERATE)
    await call(server, "POST", "/generate", body(request_id="first"))
    await until(state_is(server, "first", "pending"))
    await until(lambda: _waiting_in(server, "first", "generate"))
    ev = await first_event(server, "first")
    qp = ev["queue_position"]
    assert qp["current_queue"] == "generation" and qp["position"] == 1
    assert qp["estimated_wait_time"] is None  # nothing has been measured yet
    for rid, prio in (("second", 0), ("urgent", 5), ("third", 0)):
        await call(server, "POST", "/generate", body(request_id=rid, priority=prio))
        await until(lambda rid=rid: _waiting_in(server, rid, "generate"))
    positions = {}
    for rid in ("urgent", "first", "second", "third"):
        ev = await first_event(server, rid)
        positions[rid] = ev["queue_position"]["position"]
        assert (
            ev["queue_position"]["queue_size"] == 4
            and ev["queue_info"]["generation_queue_size"] == 4
        )
    assert positions == {"urgent": 1, "first": 2, "second": 3, "third": 4}
    # Measure: one job whose generation takes ~0.3 s; then estimates grow with the position.
    resume(server, Stage.GENERATE)
    for rid in ("urgent", "first", "second", "third"):
        await until(state_is(server, rid, "completed"))
    slow(simulator, 0.3)
    status, _, _ = await call(server, "POST", "/generate/sync", body(blur=True))
    assert status == 200
    pause(server, Stage.GENERATE)
    for rid in ("e1", "e2", "e3"):
        await call(server, "POST", "/generate", body(request_id=rid))
        await until(lambda rid=rid: _waiting_in(server, rid, "generate"))
    etas = [
        (await first_event(server, rid))["queue_position"]["estimated_wait_time"]
        for rid in ("e1", "e2", "e3")
    ]
    assert all(isinstance(e, float) for e in etas) and etas[0] > 0
    assert etas[0] <= etas[1] <= etas[2] and etas[0] < etas[2]
    resume(server, Stage.GENERATE)


async def _waiting_in(srv: Server, job_id: str, stage: str) -> bool:
    job = await srv.services.store.get(job_id)
    return job is not None and job.state == State.PENDING and job.stage == stage


# --- outputs and base64 ---------------------------------------------------------------------------


async def test_output_download_only_for_that_jobs_files(server: Server) -> None:
    await wait_healthy(server)
    _, a, _ = await call(server, "POST", "/generate/sync", body(request_id="out-a"))
    _, b, _ = await call(server, "POST", "/generate/sync", body(request_id="out-b"))
    out = a["output"][0]
    async with server.session.get(server.u(out["url"])) as r:
        assert r.status == 200 and r.content_type == "image/png"
        data = await r.read()
    assert data == Path(out["local_path"]).read_bytes() and data[:4] == b"\x89PNG"
    other = b["output"][0]["filename"]
    for path in (
        f"/outputs/out-a/{other}" if other != out["filename"] else "/outputs/out-a/zzz.png",
        "/outputs/out-a/..%2Fout-b%2F" + other,
        "/outputs/out-a/q.db",
        "/outputs/..%2F/q.db",
    ):
        status, err, _ = await call(server, "GET", path)
        assert status == 404 and err["error"]["type"] == "not_found", path


async def test_outputs_as_base64_by_header_and_field(make_server: MakeServer) -> None:
    srv = await make_server(output_base64_max_bytes=1_000_000)
    await wait_healthy(srv)
    status, res, _ = await call(
        srv, "POST", "/generate/sync", body(), headers={"X-Return-Outputs-As-Base64": "1"}
    )
    assert status == 200
    out = res["output"][0]
    assert base64.b64decode(out["data"]) == Path(out["local_path"]).read_bytes()
    status, res, _ = await call(srv, "POST", "/generate/sync", body(return_outputs_as_base64=True))
    assert status == 200 and res["output"][0]["data"]
    small = await make_server(output_base64_max_bytes=10)
    await wait_healthy(small)
    status, res, _ = await call(
        small, "POST", "/generate/sync", body(return_outputs_as_base64=True)
    )
    assert status == 200 and "data" not in res["output"][0] and "limit" in res["output"][0]["error"]


# --- webhooks -------------------------------------------------------------------------------------


async def test_webhook_delivery_history_is_on_the_result(make_server: MakeServer) -> None:
    from aiohttp import web

    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append({"headers": dict(request.headers), "body": await request.json()})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await serve.start(app)
    port = receiver.port
    try:
        srv = await make_server(url_allowlist=["127.0.0.1"])
        await wait_healthy(srv)
        req = body(
            request_id="hooked",
            webhook={
                "url": f"http://127.0.0.1:{port}/hook?token=abc",
                "secret": "whsec",
                "extra_params": {"k": "v"},
            },
        )
        status, res, _ = await call(srv, "POST", "/generate/sync", req)
        assert status == 200
        for _ in range(500):
            _, res, _ = await call(srv, "GET", "/result/hooked")
            if res["webhooks"] and res["webhooks"][0]["state"] == "delivered":
                break
            await asyncio.sleep(0.02)
        (delivery,) = res["webhooks"]
        assert delivery["state"] == "delivered" and delivery["event"] == "completed"
        assert (
            delivery["attempt_log"][0]["outcome"] == "delivered"
            and delivery["attempt_log"][0]["status_code"] == 204
        )
        assert "abc" not in json.dumps(res) and "whsec" not in json.dumps(
            res
        )  # no tokens, no secrets
        assert (
            got
            and got[0]["body"]["id"] == "hooked"
            and got[0]["headers"]["webhook-id"] == delivery["id"]
        )
    finally:
        await receiver.close()


async def test_a_long_queue_places_a_job_by_count_as_the_ranking_does(server: Server) -> None:
    """Past the inline ranking's size, a stream places its waiting job by one indexed count of
    the jobs ahead (no ranking of the whole queue per change); both give the same answer."""
    from comfyq.api.context import API
    from comfyq.store.sqlite.reads import INLINE_SNAPSHOT_ROWS

    await wait_healthy(server)
    pause(server, Stage.PREPROCESS)
    n = INLINE_SNAPSHOT_ROWS + 20
    for i in range(n):
        status, _, _ = await call(
            server, "POST", "/generate", body(request_id=f"q{i}", priority=i % 3)
        )
        assert status == 202
    queue = server.runner.app[API].queue
    ranking = await queue.snapshot()
    assert len(ranking.positions) == n
    assert queue.reads.queue_snapshot_now() is None  # too long to rank inline now
    for i in range(n):
        job = await server.services.store.get(f"q{i}")
        assert job is not None
        queue.version += 1  # as after a change elsewhere: the shared ranking is stale
        counted = await queue.position(job)
        assert counted is not None
        assert (counted.position, counted.queue_size) == (ranking.positions[job.id], n), i
    assert queue._snap is ranking  # placed by counts: the queue was never ranked again
    first = min(ranking.positions, key=ranking.positions.__getitem__)
    assert first.startswith("q") and int(first[1:]) % 3 == 2  # highest priority, oldest
    resume(server, Stage.PREPROCESS)
