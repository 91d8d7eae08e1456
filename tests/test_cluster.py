"""Several ``comfyq serve`` processes on one PostgreSQL database, each with its own simulator.

Real processes on loopback, a database of their own per test: a job posted to either instance
runs on either, streams on either and downloads from either; an API-only instance hands its jobs
to a generate instance through LISTEN/NOTIFY (claim polling is set to 60 s, so nothing else could
wake it); an instance killed with SIGKILL leaves its jobs to the other, which finishes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from support.cluster_harness import Cluster, OwnPostgres, create_database, drop_database
from support.workflows import workflow

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_database("comfyq_c2_test")
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, pg_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


def rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


def held_by(url: str, job_id: str) -> str | None:
    ((raw,),) = rows(url, "SELECT result FROM jobs WHERE id = %s", job_id)
    result = json.loads(raw) if isinstance(raw, str) else raw
    return (result or {}).get("held_by")


async def post(http: aiohttp.ClientSession, base: str, color: int, **extra: Any) -> str:
    async with http.post(
        f"{base}/generate", json={"input": {"workflow_json": workflow(color), **extra}}
    ) as r:
        assert r.status == 202, await r.text()
        return str((await r.json())["id"])


async def follow(
    http: aiohttp.ClientSession, base: str, job_id: str, ready: asyncio.Event | None = None
) -> list[dict[str, Any]]:
    """Every SSE event of a job on ``base`` until final_result."""
    events: list[dict[str, Any]] = []
    async with http.get(f"{base}/jobs/{job_id}/events") as r:
        assert r.status == 200, await r.text()
        if ready is not None:
            ready.set()
        async for line in r.content:
            if line.startswith(b"data: "):
                ev = json.loads(line[6:])
                events.append(ev)
                if ev["event"] == "final_result":
                    return events
    raise AssertionError(f"stream of {job_id} on {base} ended without final_result: {events}")


async def final(http: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    events = await follow(http, base, job_id)
    return events[-1]["result"]  # type: ignore[no-any-return]


async def download(http: aiohttp.ClientSession, base: str, job_id: str, name: str) -> bytes:
    async with http.get(f"{base}/outputs/{job_id}/{name}") as r:
        assert r.status == 200, f"{base}: {r.status} {await r.text()}"
        return await r.read()


async def test_a_job_posted_to_either_runs_streams_and_downloads_on_either(
    cluster: Cluster, http: aiohttp.ClientSession, pg_url: str
) -> None:
    # Slow enough that one instance's two generate slots cannot take every job: the other's
    # idle workers must be woken by its jobs, or nothing would run there for 60 s.
    sims = {n: cluster.start_sim(n, node_duration=0.1) for n in ("a", "b")}
    urls = {n: cluster.start_instance(n, [sims[n]], generation_workers="2") for n in ("a", "b")}
    ids: dict[str, str] = {}
    for i in range(16):
        at = "ab"[i % 2]
        ids[await post(http, urls[at], 1000 + i)] = at
    # Each job followed on the instance it was NOT posted to, from admission to its result.
    results = await asyncio.gather(
        *(final(http, urls["b" if at == "a" else "a"], j) for j, at in ids.items())
    )
    assert [r["status"] for r in results] == ["completed"] * len(ids), results
    holders = {held_by(pg_url, j) for j in ids}
    assert holders == {"a", "b"}, f"every job ran on one instance: {holders}"
    for res in results:
        job_id = res["id"]
        for out in res["output"]:
            a = await download(http, urls["a"], job_id, out["filename"])
            b = await download(http, urls["b"], job_id, out["filename"])
            assert a == b and len(a) == out["size"] > 0
            assert hashlib.sha256(a).hexdigest() == out["sha256"]
    # Last-Event-ID resumes on the other instance: only what came after, then the result.
    job_id = next(iter(ids))
    first = await follow(http, urls["a"], job_id)
    mid = first[1]["id"]
    async with http.get(f"{urls['b']}/jobs/{job_id}/events", headers={"Last-Event-ID": mid}) as r:
        text = await r.text()
    resumed = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: ")]
    assert [e["id"] for e in resumed] == [e["id"] for e in first[2:]]
    # Both instances are registered and alive; each says which one answered.
    for name, base in urls.items():
        async with http.get(f"{base}/health") as r:
            body = await r.json()
        seen = {i["name"]: i for i in body["instances"]}
        assert {"a", "b"} <= set(seen) and all(seen[n]["alive"] for n in ("a", "b"))
        assert seen[name]["self"] and seen[name]["url"] == base
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
        assert "comfyq_instance_up{instance=" in metrics
        assert "comfyq_cluster_events_received_total" in metrics


async def test_an_api_only_instance_hands_jobs_to_a_generate_instance_at_once(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    sim = cluster.start_sim("gpu", node_duration=0.05, progress_steps=4)
    api = cluster.start_instance("api", [], roles="api")
    worker = cluster.start_instance("gpu", [sim])
    async with http.get(f"{api}/health") as r:
        body = await r.json()
        assert r.status == 200, body
        assert body["roles"] == ["api"] and body["stages"] == {}
    # /generate/sync on the API instance completes because the other one ran the job; claim
    # polling is 60 s, so only a cross-instance wake-up can have started it within the test.
    t0 = time.monotonic()
    async with http.post(
        f"{api}/generate/sync?timeout=50",
        json={"input": {"workflow_json": workflow(7, blur=True)}},
    ) as r:
        body = await r.json()
    assert r.status == 200 and body["status"] == "completed", body
    assert time.monotonic() - t0 < 50
    # Live progress of a job run on the worker reaches a stream held on the API instance.
    job_id = await post(http, api, 8)
    events = await follow(http, api, job_id)
    kinds = [e["event"] for e in events]
    assert "final_result" in kinds and events[-1]["result"]["status"] == "completed"
    states = [e["status"] for e in events if e["event"] == "state"]
    assert "generating" in states, states
    # The file is on the worker; the API instance streams it from there.
    out = events[-1]["result"]["output"][0]
    data = await download(http, api, job_id, out["filename"])
    assert hashlib.sha256(data).hexdigest() == out["sha256"]
    # comfyq instances lists both.
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "comfyq", "instances", "--json"],
        env={**cluster.instances["api"].env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    names = {i["name"]: i for i in json.loads(listed.stdout)}
    assert names["api"]["roles"] == ["api"] and names["gpu"]["alive"]
    assert worker in {i["url"] for i in names.values()}


async def test_kill_9_an_instance_and_its_jobs_finish_on_the_other(
    cluster: Cluster, http: aiohttp.ClientSession, pg_url: str
) -> None:
    sims = {n: cluster.start_sim(n, node_duration=0.3) for n in ("a", "b")}
    urls = {n: cluster.start_instance(n, [sims[n]], generation_workers="2") for n in ("a", "b")}
    (a_id,) = [
        r[0]
        for r in rows(pg_url, "SELECT id FROM instances WHERE name = 'a' AND stopped_at IS NULL")
    ]
    ids = [await post(http, urls["a"], 2000 + i) for i in range(10)]
    # Streams held on b for every job, opened before the kill.
    ready = [asyncio.Event() for _ in ids]
    streams = [
        asyncio.create_task(follow(http, urls["b"], j, ev))
        for j, ev in zip(ids, ready, strict=True)
    ]
    await asyncio.gather(*(e.wait() for e in ready))
    # Kill a while it holds a job in generate (its prompt submitted to its own simulator).
    end = time.monotonic() + 60
    while not rows(
        pg_url,
        "SELECT 1 FROM jobs WHERE lease_owner = %s AND stage = 'generate'"
        " AND comfy_prompt_id IS NOT NULL",
        a_id,
    ):
        assert time.monotonic() < end, "a never ran a job"
        await asyncio.sleep(0.05)
    cluster.kill("a")
    done = await asyncio.wait_for(asyncio.gather(*streams), 120)
    results = {ev[-1]["result"]["id"]: ev[-1]["result"] for ev in done}
    assert {r["status"] for r in results.values()} == {"completed"}, results
    for job_id, state, attempts, max_attempts in rows(
        pg_url, "SELECT id, state, attempts, max_attempts FROM jobs"
    ):
        assert state == "completed" and attempts <= max_attempts, job_id
    terminal = dict(
        rows(
            pg_url,
            "SELECT job_id, count(*) FROM job_events WHERE to_state IN"
            " ('completed', 'failed', 'cancelled') GROUP BY job_id",
        )
    )
    assert terminal == {j: 1 for j in ids}
    # a comes back under its name: files it held are served again, from b too.
    cluster.restart("a")
    for job_id, res in results.items():
        for out in res["output"]:
            data = await download(http, urls["b"], job_id, out["filename"])
            assert hashlib.sha256(data).hexdigest() == out["sha256"]
    assert cluster.stop("a") == 0 and cluster.stop("b") == 0


async def test_streams_miss_no_final_result_while_the_listener_connection_is_cut(
    cluster: Cluster, http: aiohttp.ClientSession, pg_url: str
) -> None:
    """The API instance's LISTEN connection is terminated again and again (as a database
    restart does) while the other instance runs the jobs: notifications committed while it
    reconnects are never heard, yet every SSE stream, every /ws subscription and a
    /generate/sync held on the API instance get the job's end, from the event rows."""
    sim = cluster.start_sim("gpu", node_duration=0.05, progress_steps=2)
    api = cluster.start_instance("api", [], roles="api")
    cluster.start_instance("gpu", [sim], generation_workers="3")
    api_pid = cluster.instances["api"].popen.pid  # type: ignore[union-attr]
    cuts = 0
    done = asyncio.Event()

    async def cut_the_listener() -> None:
        nonlocal cuts
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            while not done.is_set():
                cur = await conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name LIKE %s",
                    (f"%:{api_pid}:%/listen",),
                )
                row = await cur.fetchone()
                cuts += int(row[0]) if row else 0
                await asyncio.sleep(0.15)

    async def ws_finals(ids: list[str]) -> dict[str, str]:
        finals: dict[str, str] = {}
        async with http.ws_connect(f"{api}/ws") as ws:
            await ws.send_json({"subscribe": ids})
            async for msg in ws:
                ev = json.loads(msg.data)
                if ev.get("event") == "final_result":
                    finals[ev["request_id"]] = ev["result"]["status"]
                    if len(finals) == len(ids):
                        return finals
        raise AssertionError(f"/ws closed with {len(finals)} of {len(ids)} final results")

    async def sync() -> dict[str, Any]:
        async with http.post(
            f"{api}/generate/sync?timeout=100", json={"input": {"workflow_json": workflow(5999)}}
        ) as r:
            body: dict[str, Any] = await r.json()
            return body

    cutter = asyncio.create_task(cut_the_listener())
    try:
        # Each job followed from its admission on (they queue behind three generate slots).
        ids: list[str] = []
        streams: list[asyncio.Task[dict[str, Any]]] = []
        for i in range(24):
            ids.append(await post(http, api, 5000 + i))
            streams.append(asyncio.create_task(final(http, api, ids[-1])))
        results, ws, synced = await asyncio.gather(asyncio.gather(*streams), ws_finals(ids), sync())
    finally:
        done.set()
        await cutter
    assert [r["status"] for r in results] == ["completed"] * len(ids)
    assert ws == dict.fromkeys(ids, "completed")
    assert synced["status"] == "completed", synced
    # The connection was cut while the streams were open, and the instance made it again.
    async with http.get(f"{api}/metrics") as r:
        metrics = await r.text()
    [line] = [ln for ln in metrics.splitlines() if ln.startswith("comfyq_cluster_listener_recon")]
    assert cuts > 0 and float(line.split()[-1]) >= 1, (cuts, line)


async def follow_resuming(
    http: aiohttp.ClientSession, base: str, job_id: str, opened: asyncio.Event
) -> tuple[dict[str, Any], int]:
    """As an EventSource does: follow the job, and when the stream ends or breaks before the
    final result, open it again with Last-Event-ID. The final event and how many resumes."""
    last: str | None = None
    resumes = 0
    while True:
        headers = {"Last-Event-ID": last} if last else {}
        try:
            async with http.get(f"{base}/jobs/{job_id}/events", headers=headers) as r:
                if r.status == 200:
                    async for line in r.content:
                        if line.startswith(b"id: "):
                            last = line[4:].strip().decode()
                        if line.startswith(b"data: "):
                            opened.set()
                            ev = json.loads(line[6:])
                            if ev["event"] == "final_result":
                                return ev, resumes
                else:  # 503 while the database is away
                    assert r.status == 503, (r.status, await r.text())
        except aiohttp.ClientPayloadError:
            pass  # a stream cut midway: resumed below
        resumes += 1
        await asyncio.sleep(0.2)


@pytest.mark.skipif(not OwnPostgres.available(), reason="needs the PostgreSQL server binaries")
async def test_streams_open_across_a_database_restart_all_get_their_final_result(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is stopped (for longer than a heartbeat) and started while streams are open
    on an API instance and a generate instance runs the jobs: no stream hangs (one that failed
    after its head went out used to get a 503 answer written into it, which left the client
    waiting forever), and every one gets its job's final result, resuming with Last-Event-ID
    where it was cut."""
    # Not under tmp_path: the server runs as the postgres user, who cannot enter pytest's
    # folders (mode 0700).
    pg = OwnPostgres(Path(tempfile.mkdtemp(prefix="comfyq-c2-pg-")))
    monkeypatch.setenv("COMFYQ_TEST_POSTGRES", pg.start())
    url = create_database("comfyq_c2_restart")
    c = Cluster(tmp_path, url)
    try:
        sim = c.start_sim("gpu", node_duration=0.2, progress_steps=2)
        api = c.start_instance("api", [], roles="api")
        c.start_instance("gpu", [sim], generation_workers="2")
        ids = [await post(http, api, 7000 + i) for i in range(12)]
        opened = [asyncio.Event() for _ in ids]
        streams = [
            asyncio.create_task(follow_resuming(http, api, j, o)) for j, o in zip(ids, opened)
        ]
        ws_closes: list[int | None] = []

        async def ws_finals() -> dict[str, str]:
            # One websocket subscribed to every job; closed while the database is away, it
            # subscribes again to the jobs it has not seen end.
            finals: dict[str, str] = {}
            while len(finals) < len(ids):
                async with http.ws_connect(f"{api}/ws") as ws:
                    await ws.send_json({"subscribe": [j for j in ids if j not in finals]})
                    async for msg in ws:
                        ev = json.loads(msg.data)
                        if ev.get("event") == "final_result":
                            finals[ev["request_id"]] = ev["result"]["status"]
                            if len(finals) == len(ids):
                                return finals
                    ws_closes.append(ws.close_code)
                    assert ws.close_code == 1013, ws.close_code  # try again later
                await asyncio.sleep(0.2)
            return finals

        on_ws = asyncio.create_task(ws_finals())
        await asyncio.gather(*(o.wait() for o in opened))
        await asyncio.to_thread(pg.down)
        # Longer than the SSE heartbeat (15 s): every stream still open, quiet since the database
        # went away, reads its job's rows on its heartbeat and finds the database away.
        await asyncio.sleep(17)
        await asyncio.to_thread(pg.up)
        got = await asyncio.gather(*streams)
        assert [ev["result"]["status"] for ev, _ in got] == ["completed"] * len(ids)
        assert [ev["request_id"] for ev, _ in got] == ids
        assert await on_ws == dict.fromkeys(ids, "completed"), ws_closes
        assert "cluster listener reconnected" in c.instances["api"].log.read_text()
    finally:
        c.close()
        pg.destroy()
        shutil.rmtree(pg.data.parent, ignore_errors=True)
