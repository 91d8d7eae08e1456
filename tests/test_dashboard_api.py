"""The dashboard's reads and actions over a real server: rows, filters, search, keyset pages,
counts, a job's detail, stats, modifier schemas, retry and delete."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from support.servers import MakeServer, Server, pause, resume, wait_healthy
from support.workflows import workflow

from comfyq.store.model import Stage

_colors = itertools.count(52000)


def body(**extra: Any) -> dict[str, Any]:
    return {"input": {"workflow_json": workflow(next(_colors)), **extra}}


async def get(srv: Server, path: str) -> tuple[int, Any]:
    async with srv.session.get(srv.u(path)) as r:
        return r.status, await r.json()


async def post(srv: Server, path: str, payload: Any = None) -> tuple[int, Any]:
    async with srv.session.post(srv.u(path), json=payload) as r:
        return r.status, await r.json()


async def test_rows_filters_search_pages_and_counts(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    done = []
    for i in range(7):
        status, res = await post(srv, "/generate/sync", body(request_id=f"row-{i}"))
        assert status == 200
        done.append(res["id"])
    bad = {"input": {"request_id": "row-bad", "workflow_json": {"1": {"class_type": "Nope"}}}}
    assert (await post(srv, "/generate/sync", bad))[0] == 400
    pause(srv, Stage.PREPROCESS)
    assert (await post(srv, "/generate", body(request_id="row-wait")))[0] == 202

    status, page = await get(srv, "/ui/api/jobs?limit=3")
    assert status == 200
    assert [j["id"] for j in page["jobs"]] == ["row-wait", "row-bad", "row-6"]
    first = page["jobs"][0]
    assert first["status"] == "queued" and first["kind"] == "workflow" and first["attempts"] == 0
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"]:
        status, page = await get(srv, f"/ui/api/jobs?limit=3&cursor={page['next_cursor']}")
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ["row-wait", "row-bad", *reversed(done)]  # every job once, newest first

    status, page = await get(srv, "/ui/api/jobs?status=failed")
    assert [j["id"] for j in page["jobs"]] == ["row-bad"]
    status, page = await get(srv, "/ui/api/jobs?status=completed,queued&limit=2")
    assert [j["id"] for j in page["jobs"]] == ["row-wait", "row-6"]
    completed = page["jobs"][1]
    assert completed["backend"] and completed["finished_at"] and completed["max_attempts"] >= 1
    status, page = await get(srv, "/ui/api/jobs?q=row-")
    assert len(page["jobs"]) == 9
    status, page = await get(srv, "/ui/api/jobs?q=row-b")
    assert [j["id"] for j in page["jobs"]] == ["row-bad"]
    status, page = await get(srv, "/ui/api/jobs?q=zzz")
    assert page["jobs"] == [] and page["next_cursor"] is None

    status, counts = await get(srv, "/ui/api/counts")
    assert counts["counts"] == {
        "queued": 1,
        "processing": 0,
        "generating": 0,
        "postprocessing": 0,
        "completed": 7,
        "failed": 1,
        "cancelled": 0,
    }
    assert counts["total"] == 9
    # Bad input names the parameter.
    for path, field in (
        ("/ui/api/jobs?status=nope", "$.query.status"),
        ("/ui/api/jobs?limit=0", "$.query.limit"),
        ("/ui/api/jobs?cursor=!!", "$.query.cursor"),
        ("/ui/api/jobs?q=" + "x" * 200, "$.query.q"),
    ):
        status, err = await get(srv, path)
        assert status == 400 and err["error"]["fields"][0]["path"] == field, (path, err)
    resume(srv, Stage.PREPROCESS)


async def test_detail_retry_delete_and_stats(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    status, res = await post(srv, "/generate/sync", body(request_id="d-ok"))
    assert status == 200 and res["status"] == "completed"
    status, d = await get(srv, "/ui/api/jobs/d-ok")
    assert status == 200
    assert d["job"]["status"] == "completed" and d["result"]["output"]
    assert d["events"][0]["status"] == "queued"
    assert d["events"][-1]["status"] == "completed"
    assert d["workflow"]["3"]["class_type"] == "SaveImage"
    assert "workflow_json" in d["input"] and d["timings"] is not None and d["prompt_id"]
    status, err = await get(srv, "/ui/api/jobs/nope")
    assert status == 404 and err["error"]["type"] == "not_found"

    bad = {"input": {"request_id": "d-bad", "workflow_json": {"1": {"class_type": "Nope"}}}}
    assert (await post(srv, "/generate/sync", bad))[0] == 400
    status, d = await get(srv, "/ui/api/jobs/d-bad")
    assert d["error"]["type"] and d["job"]["status"] == "failed"
    # Retry: only failed or cancelled jobs; the job runs again (and fails again here).
    status, err = await post(srv, "/jobs/d-ok/retry")
    assert status == 409 and "only failed or cancelled" in err["error"]["message"]
    status, again = await post(srv, "/jobs/d-bad/retry")
    assert status == 200 and again["status"] in ("queued", "processing", "failed")
    assert (await post(srv, "/jobs/nope/retry"))[0] == 404
    # Delete: only finished jobs; everything of the job goes, its files too.
    pause(srv, Stage.PREPROCESS)
    assert (await post(srv, "/generate", body(request_id="d-wait")))[0] == 202
    status, err = await post(srv, "/jobs/d-wait/delete")
    assert status == 409 and "cancel it first" in err["error"]["message"]
    folder = srv.services.output_dir / "d-ok"
    assert folder.is_dir()
    status, gone = await post(srv, "/jobs/d-ok/delete")
    assert status == 200 and gone == {"deleted": "d-ok"}
    assert not folder.exists()
    assert (await get(srv, "/result/d-ok"))[0] == 404
    assert (await post(srv, "/jobs/d-ok/delete"))[0] == 404
    resume(srv, Stage.PREPROCESS)

    for name in ("d-bad", "d-wait"):  # both end (again) before the figures are read
        while (await get(srv, f"/result/{name}"))[1]["status"] not in ("failed", "completed"):
            await asyncio.sleep(0.02)
    status, stats = await get(srv, "/ui/api/stats")
    assert status == 200 and len(stats["minutes"]) == 60
    _, counts = await get(srv, "/ui/api/counts")
    # d-ok was deleted: it counts no more; d-wait completed once preprocess resumed.
    assert stats["completed"] == counts["counts"]["completed"] and "d-ok" not in str(stats)
    assert stats["failed"] == counts["counts"]["failed"] == 1
    assert sum(m["failed"] for m in stats["minutes"]) == stats["failed"]


async def test_modifiers_come_with_their_parameter_schemas(server: Server) -> None:
    status, data = await get(server, "/ui/api/modifiers")
    assert status == 200
    mods = {m["name"]: m for m in data["modifiers"]}
    effects = mods["ImageEffects"]
    props = effects["schema"]["properties"]
    assert {"width", "height", "blur_radius", "color", "invert"} <= set(props)
    if effects["typed"]:  # typed Params (issue 15): real JSON Schema per parameter
        assert "integer" in str(props["blur_radius"])
