"""Several instances: end to end jobs/s with 1, 2 and 3 ``comfyq serve`` processes on one
PostgreSQL database beside one process on SQLite, comfyq CPU ms per job for each, and the
cross-instance event delay (transition committed on one instance -> SSE event read from another),
and the cost of the output proxy (a file fetched from its holder vs through another instance).

Every instance is a real process with its own zero-time simulator process; jobs go in over HTTP
(round robin over the instances) and the run ends when the database says every job completed.
CPU is the user+system time of the comfyq processes (not the simulators, not this client).

    .venv/bin/python -m bench.bench_cluster [--jobs 600] [--event-jobs 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench.common import add_json_arg, summary_ms, write_json
from comfyq.clock import parse_iso

# The harness is test code (tests/support), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.cluster_harness import Cluster, OwnPostgres, create_database, drop_database

TICK = os.sysconf("SC_CLK_TCK")


def workflow(i: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i % 16777216},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}},
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def completed(database: str) -> int:
    if database.startswith("postgresql://"):
        with psycopg.connect(database) as conn:
            row = conn.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('completed', 'failed', 'cancelled')"
            ).fetchone()
            return int(row[0]) if row else 0
    conn2 = sqlite3.connect(database)
    try:
        return int(
            conn2.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('completed', 'failed', 'cancelled')"
            ).fetchone()[0]
        )
    finally:
        conn2.close()


async def submit(urls: list[str], first: int, n: int, concurrency: int = 32) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            async with sem:
                body = {"input": {"workflow_json": workflow(i)}}
                async with http.post(f"{urls[i % len(urls)]}/generate", json=body) as r:
                    if r.status != 202:
                        raise RuntimeError(f"admission {r.status}: {await r.text()}")

        await asyncio.gather(*(one(first + i) for i in range(n)))


def wait_done(database: str, total: int, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while completed(database) < total:
        if time.monotonic() > end:
            raise RuntimeError(f"only {completed(database)}/{total} jobs finished in {timeout}s")
        time.sleep(0.02)


POLLER = "SELECT count(*) FROM jobs WHERE state IN"  # this bench's own progress query


def stat_reset(url: str) -> bool:
    """Clear pg_stat_statements (False when the server does not have it loaded)."""
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            c.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


def stat_calls(url: str) -> tuple[int, list[tuple[str, int]]]:
    """Statements the server ran for this database since the reset (not this bench's own)."""
    name = url.partition("?")[0].rpartition("/")[2]
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT query, calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = %s AND query NOT ILIKE '%%pg_stat_statements%%'"
            " AND query NOT LIKE %s ORDER BY calls DESC",
            (name, POLLER + "%"),
        ).fetchall()
    return sum(int(r[1]) for r in rows), [(str(r[0])[:100], int(r[1])) for r in rows[:15]]


def e2e(
    root: Path, database: str, n: int, jobs: int, engine: str, pg: OwnPostgres | None = None
) -> dict[str, Any]:
    c = Cluster(root, database, env={"COMFYQ_CLAIM_POLL_INTERVAL": "2"})
    try:
        sims = [c.start_sim(f"s{i}", node_duration=0.0, progress_steps=0) for i in range(n)]
        urls = [c.start_instance(f"i{i}", [sims[i]], generation_workers="4") for i in range(n)]
        warm = 30
        asyncio.run(submit(urls, 0, warm))
        wait_done(database, warm)
        pids = [p.popen.pid for p in c.instances.values() if p.popen is not None]
        counting = engine == "postgres" and stat_reset(database)
        db_cpu0 = pg.cpu_seconds() if pg is not None else 0.0
        cpu0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.perf_counter()
        asyncio.run(submit(urls, warm, jobs))
        wait_done(database, warm + jobs)
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        out: dict[str, Any] = {
            "engine": engine,
            "instances": n,
            "jobs": jobs,
            "seconds": wall,
            "jobs_per_s": jobs / wall,
            "cpu_ms_per_job": cpu * 1000 / jobs,
        }
        if pg is not None and engine == "postgres":
            out["db_cpu_ms_per_job"] = (pg.cpu_seconds() - db_cpu0) * 1000 / jobs
        if counting:
            calls, top = stat_calls(database)
            out["statements_per_job"] = calls / jobs
            out["top_statements"] = top
        print(
            f"  e2e {engine:8s} x{n}: {out['jobs_per_s']:7.1f} jobs/s,"
            f" comfyq CPU {out['cpu_ms_per_job']:.2f} ms/job"
            + (
                f", database CPU {out['db_cpu_ms_per_job']:.2f} ms/job"
                if "db_cpu_ms_per_job" in out
                else ""
            )
            + (f", {out['statements_per_job']:.1f} statements/job" if counting else ""),
            flush=True,
        )
        return out
    finally:
        c.close()


async def _event_delays(api: str, jobs: int) -> tuple[list[float], int]:
    delays: list[float] = []
    finals = 0
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            nonlocal finals
            body = {"input": {"workflow_json": workflow(50_000 + i)}}
            async with http.post(f"{api}/generate", json=body) as r:
                job_id = (await r.json())["id"]
            async with http.get(f"{api}/jobs/{job_id}/events") as r:
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.time()
                    ev = json.loads(line[6:])
                    if ev["event"] == "final_result":
                        finals += 1
                        return
                    # Every state change after admission was committed by the other instance.
                    if ev["event"] == "state" and ev.get("status") != "queued":
                        delays.append(now - parse_iso(ev["timestamp"]))

        for i in range(0, jobs, 4):  # four at a time: a light load, so the delay is the link's
            await asyncio.gather(*(one(i + k) for k in range(min(4, jobs - i))))
    return delays, finals


async def _link_delays(database: str, jobs: int) -> list[float]:
    """The link alone: a state change committed by one store -> handed to another instance's
    listeners (the bus and the stage runners) by its PgLink."""
    from comfyq.cluster.model import Instance
    from comfyq.cluster.pg import PgLink
    from comfyq.store import NewJob, open_store

    store = open_store(database, owner="writer-instance")
    await store.open()
    link = PgLink(database, app_name="reader-instance")
    got: dict[str, float] = {}
    arrived = asyncio.Event()

    def on_transitions(trs: list[Any]) -> None:
        for t in trs:
            got.setdefault(t.job_id, time.perf_counter())
        arrived.set()

    me = Instance(id="reader-instance", name="reader")
    await link.open(me, on_transitions, lambda *a: None)
    delays = []
    try:
        for i in range(jobs):
            job_id = f"link-{i}"
            new = NewJob(id=job_id, payload={"input": {}}, payload_hash=job_id)
            await store.create(new, 1_000_000)
            committed = time.perf_counter()  # create() returns after the commit
            while job_id not in got:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 10)
            delays.append(got[job_id] - committed)
    finally:
        await link.close(me)
        await store.close()
    return delays


def _event_delay(root: Path, database: str, jobs: int, coalesce_ms: int) -> dict[str, Any]:
    """Cross-instance delay with SSE events held up to ``coalesce_ms`` (the API instance's
    sse_coalesce_ms) before they leave together."""
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster(root, database)
    try:
        sim = c.start_sim("ev", node_duration=0.0, progress_steps=0)
        api = c.start_instance("api", [], roles="api", sse_coalesce_ms=str(coalesce_ms))
        c.start_instance("worker", [sim])
        delays, finals = asyncio.run(_event_delays(api, jobs))
        s = summary_ms(delays)
        print(
            f"  cross-instance event delay, SSE_COALESCE_MS={coalesce_ms}:"
            f" p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms"
            f" ({s['n']} events, {finals} final results)",
            flush=True,
        )
    finally:
        c.close()
    return {"delay_ms": s, "final_results": finals}


def event_delay(root: Path, database: str, jobs: int) -> dict[str, Any]:
    default = _event_delay(root / "coalesced", database, jobs, 20)
    at_once = _event_delay(root / "at_once", database, jobs, 0)
    s, finals = default["delay_ms"], default["final_results"]
    link = summary_ms(asyncio.run(_link_delays(database, jobs)))
    print(
        f"  link alone (commit returned on one -> listeners called on the other):"
        f" p50 {link['p50']:.2f} ms, p99 {link['p99']:.2f} ms",
        flush=True,
    )
    return {
        "delay_ms": s,
        "final_results": finals,
        "jobs": jobs,
        "link_delay_ms": link,
        "delay_ms_at_once": at_once["delay_ms"],
    }


async def _downloads(a: str, b: str, job_id: str, name: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for label, base in (("direct", a), ("proxied", b)):
            times = []
            size = 0
            for _ in range(n):
                t0 = time.perf_counter()
                async with http.get(f"{base}/outputs/{job_id}/{name}") as r:
                    assert r.status == 200, await r.text()
                    size = len(await r.read())
                times.append(time.perf_counter() - t0)
            out[label] = {"ms": summary_ms(times), "bytes": size}
    return out


def outputs(root: Path, database: str, big_mb: int) -> dict[str, Any]:
    """A file held by one instance, fetched from it and through another (the proxy hop)."""
    c = Cluster(root, database)
    try:
        sim = c.start_sim("out", node_duration=0.0, progress_steps=0)
        holder = c.start_instance("holder", [sim])
        api = c.start_instance("api", [], roles="api")

        async def one() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http:
                body = {"input": {"workflow_json": workflow(777)}}
                async with http.post(f"{api}/generate/sync", json=body) as r:
                    return dict(await r.json())

        res = asyncio.run(one())
        out = res["output"][0]
        small = asyncio.run(_downloads(holder, api, res["id"], out["filename"], 100))
        # The same route with a big file: the holder's copy replaced by random bytes.
        Path(out["local_path"]).write_bytes(os.urandom(big_mb << 20))
        big = asyncio.run(_downloads(holder, api, res["id"], out["filename"], 5))
        fig = {"small": small, "big": big, "big_mb": big_mb}
        for label in ("direct", "proxied"):
            mbps = big_mb / (big[label]["ms"]["p50"] / 1000)
            fig[f"{label}_mb_per_s"] = mbps
            print(
                f"  output {label:8s}: small file p50 {small[label]['ms']['p50']:.2f} ms,"
                f" p99 {small[label]['ms']['p99']:.2f} ms; {big_mb} MB at {mbps:.0f} MB/s",
                flush=True,
            )
        return fig
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--event-jobs", type=int, default=200)
    ap.add_argument("--instances", default="1,2,3")
    ap.add_argument("--big-mb", type=int, default=64, help="size of the proxied big file")
    add_json_arg(ap)
    args = ap.parse_args()
    base = Path(os.environ.get("BENCH_TMP") or tempfile.gettempdir())
    figures: dict[str, Any] = {"e2e": [], "machine_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        root = Path(tmp)
        # A cluster of its own (pg_stat_statements loaded, its CPU measurable) when possible.
        pg = (
            OwnPostgres(root, settings="shared_preload_libraries = 'pg_stat_statements'\n")
            if OwnPostgres.available()
            else None
        )
        if pg is not None:
            os.environ["COMFYQ_TEST_POSTGRES"] = pg.start()
        figures["own_cluster"] = pg is not None
        try:
            run_all(args, root, pg, figures)
        finally:
            if pg is not None:
                pg.destroy()
    write_json(args.json, figures)


def run_all(
    args: argparse.Namespace, root: Path, pg: OwnPostgres | None, figures: dict[str, Any]
) -> None:
    sq = root / "sqlite"
    sq.mkdir()
    figures["e2e"].append(e2e(sq, str(sq / "q.db"), 1, args.jobs, "sqlite"))
    for n in [int(x) for x in args.instances.split(",")]:
        url = create_database("comfyq_bench")
        try:
            d = root / f"pg{n}"
            d.mkdir()
            figures["e2e"].append(e2e(d, url, n, args.jobs, "postgres", pg))
        finally:
            drop_database(url)
    url = create_database("comfyq_bench")
    try:
        d = root / "events"
        d.mkdir()
        figures["events"] = event_delay(d, url, args.event_jobs)
    finally:
        drop_database(url)
    url = create_database("comfyq_bench")
    try:
        d = root / "outputs"
        d.mkdir()
        figures["outputs"] = outputs(d, url, args.big_mb)
    finally:
        drop_database(url)


if __name__ == "__main__":
    main()
