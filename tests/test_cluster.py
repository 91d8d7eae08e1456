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
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from support.cluster_harness import Cluster, create_database, drop_database
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
