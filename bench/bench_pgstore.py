"""The store alone on PostgreSQL: complete jobs/s through claim -> every transition -> completed
with 1, 2 and 4 instances (processes) x 16 workers, claim p50/p99 with 10k and 1M rows in the
jobs table, and database round trips per job (statements the server executed, counted by
pg_stat_statements, BEGIN and COMMIT included). The cluster's NOTIFY trigger is installed, as on
any database several instances share, so its cost is in the figures.

A PostgreSQL cluster of its own is started (initdb, with pg_stat_statements preloaded) when the
server binaries are installed; otherwise the shared server is used and round trips are not
counted. Each instance is a process with its own store (its own pool); its workers run the life
of a job the way the stage runners do: claim in preprocess, advance-and-claim into generate and
into postprocess, advance to completed with one output row.

    .venv/bin/python -m bench.bench_pgstore [--jobs 4000] [--instances 1,2,4] [--workers 16]
                                            [--big 1000000] [--samples 500] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import add_json_arg, summary_ms, write_json
from comfyq.cluster.migrate import apply_cluster_migrations
from comfyq.store import NewJob, Stage, open_store

# The harness is test code (tests/support), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.cluster_harness import OwnPostgres, create_database, drop_database

LEASE = 60.0


def new_job(i: int, tag: str) -> NewJob:
    payload = {"input": {"workflow_json": {"1": {"class_type": "EmptyImage", "inputs": {}}}}}
    return NewJob(id=f"{tag}-{i:07d}", payload=payload, payload_hash=f"h{i}", max_attempts=3)


async def admit(url: str, n: int, tag: str, concurrency: int = 32) -> float:
    """Admit ``n`` jobs; seconds taken."""
    store = open_store(url, owner=f"admit-{tag}")
    await store.open()
    try:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await store.create(new_job(i, tag), 10_000_000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0
    finally:
        await store.close()


async def worker_process(url: str, workers: int, owner: str) -> dict[str, Any]:
    """One instance: ``workers`` tasks running jobs through every stage until none is left."""
    store = open_store(url, owner=owner)
    await store.open()
    done = 0
    output = {
        "filename": "out.png",
        "node_id": "9",
        "output_type": "images",
        "comfy_type": "output",
        "subfolder": "",
        "mimetype": "image/png",
        "size": 100,
        "sha256": "0" * 64,
        "local_path": "/tmp/out.png",
        "url": "/outputs/x/out.png",
        "upload_error": None,
    }

    async def work() -> None:
        nonlocal done
        while True:
            jobs = await store.claim(Stage.PREPROCESS, 1, LEASE, "Preprocessing")
            if not jobs:
                return
            job = jobs[0]
            await store.advance_and_claim(
                job.id, "Prepared", {"prepared": {"workflow": {}}}, LEASE, "Waiting for ComfyUI"
            )
            await store.advance_and_claim(
                job.id,
                "Generation complete",
                {"result": {"outputs": {}}},
                LEASE,
                "Post-processing",
            )
            await store.advance(job.id, "Processing complete.", None, [dict(output)])
            done += 1

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(workers)))
        return {"done": done, "seconds": time.perf_counter() - t0}
    finally:
        await store.close()


def stat_reset(url: str) -> bool:
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            c.execute("SELECT pg_stat_statements_reset()")
        return True
    except psycopg.Error:
        return False


def stat_calls(url: str) -> tuple[int, list[tuple[str, int]]]:
    name = url.partition("?")[0].rpartition("/")[2]
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT query, calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = %s AND query NOT ILIKE '%%pg_stat_statements%%'"
            " ORDER BY calls DESC",
            (name,),
        ).fetchall()
    return sum(int(r[1]) for r in rows), [(str(r[0])[:90], int(r[1])) for r in rows[:12]]


async def cluster_schema(url: str) -> None:
    """The cluster's tables and the NOTIFY trigger, as every instance of a cluster has them."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await apply_cluster_migrations(conn)


def throughput(url: str, instances: int, workers: int, jobs: int) -> dict[str, Any]:
    asyncio.run(admit(url, 0, "warm"))  # migrations
    asyncio.run(cluster_schema(url))  # each state change NOTIFYs, as in a running cluster
    counting = stat_reset(url)
    admit_s = asyncio.run(admit(url, jobs, f"n{instances}"))
    admit_calls = stat_calls(url)[0] if counting else None
    counting = stat_reset(url)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.bench_pgstore", "--worker", url, str(workers), f"i{k}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(instances)
    ]
    t0 = time.perf_counter()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    done = sum(o["done"] for o in outs)
    calls, top = stat_calls(url) if counting else (None, [])
    fig: dict[str, Any] = {
        "instances": instances,
        "workers_per_instance": workers,
        "jobs": done,
        "seconds": wall,
        "jobs_per_s": done / wall,
        "admit_jobs_per_s": jobs / admit_s,
        "statements_per_job_lifecycle": calls / done if calls else None,
        "statements_per_admission": admit_calls / jobs if admit_calls else None,
        "top_statements": top,
    }
    rt = fig["statements_per_job_lifecycle"]
    print(
        f"  {instances} instance(s) x {workers} workers: {fig['jobs_per_s']:7.0f} jobs/s"
        f" (admission {fig['admit_jobs_per_s']:.0f}/s)"
        + (
            f", {rt + fig['statements_per_admission']:.1f} statements per job"
            f" ({fig['statements_per_admission']:.1f} admit + {rt:.1f} claim..done)"
            if rt
            else ""
        ),
        flush=True,
    )
    return fig


async def claim_latency(url: str, rows: int, samples: int) -> dict[str, Any]:
    """Claim one job at a time with ``rows`` finished jobs in the table (plus the ones claimed)."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            "INSERT INTO jobs (id, state, stage, payload, payload_hash, run_after, deadline_at,"
            " created_at, updated_at, stage_entered_at, finished_at, attempts)"
            " SELECT 'old-' || g, 'completed', 'postprocess', '{}'::json, 'h', now(), now(),"
            " now() - interval '1 day', now(), now(), now(), 1 FROM generate_series(1, %s) g",
            (rows,),
        )
        c.execute("ANALYZE jobs")
    await admit(url, samples, f"c{rows}")
    store = open_store(url, owner="claimer")
    await store.open()
    try:
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            got = await store.claim(Stage.PREPROCESS, 1, LEASE, "Preprocessing")
            times.append(time.perf_counter() - t0)
            assert got, "ran out of jobs to claim"
        s = summary_ms(times)
        print(
            f"  claim with {rows:>9,} rows: p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms",
            flush=True,
        )
        return {"rows": rows, "claim_ms": s}
    finally:
        await store.close()


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        url, workers, owner = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        print(json.dumps(asyncio.run(worker_process(url, workers, owner))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--instances", default="1,2,4")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=500)
    add_json_arg(ap)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pgstore-", dir=os.environ.get("BENCH_TMP")))
    own = OwnPostgres(root, settings="shared_preload_libraries = 'pg_stat_statements'\n")
    figures: dict[str, Any] = {"throughput": [], "claim": [], "cores": os.cpu_count()}
    started = False
    try:
        if OwnPostgres.available():
            os.environ["COMFYQ_TEST_POSTGRES"] = own.start()
            started = True
        figures["own_cluster"] = started
        for n in [int(x) for x in args.instances.split(",")]:
            url = create_database("comfyq_pgstore")
            try:
                figures["throughput"].append(throughput(url, n, args.workers, args.jobs))
            finally:
                drop_database(url)
        for rows in (10_000, args.big):
            url = create_database("comfyq_pgstore")
            try:
                asyncio.run(admit(url, 0, "m"))
                figures["claim"].append(asyncio.run(claim_latency(url, rows, args.samples)))
            finally:
                drop_database(url)
    finally:
        if started:
            own.destroy()
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
