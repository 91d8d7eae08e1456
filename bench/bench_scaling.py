"""How comfyq's cost per job grows with the work (issue 13, "scaling curves"), side by side with a
client talking to the same ComfyUI simulator directly, all over HTTP:

* **database size**: added latency and server CPU per job with 0, 10k and 1M finished jobs in
  the SQLite database, and with 1k jobs queued. The rows are written straight into a database
  that ``comfyq serve`` migrated, in one transaction, as copies of a job the server really ran
  (its jobs row, events and outputs) with fresh ids and timestamps spread over the last five days
  (inside the default retention); queued ones wait for a ``run_after`` far in the future, so they
  stay in the queue (counted, ahead of every new job) without being claimed.
* **jobs in flight** (1, 16, 64, 256): jobs/s, p50 latency and server CPU per job, direct vs
  ``POST /generate/sync``, rounds alternating.
* **SSE subscribers** (1 -> 1,000) on one job: ``POST /generate``, then N streams of
  ``GET /jobs/{id}/events`` opened at once and read to ``final_result``; the job takes 0.4 s so
  most subscribers attach while it runs and get its events live. Server CPU per job and per
  subscriber, final_result delivery delay.
* issue 13's table rows nobody else measures: **200 streams opened at once** (``POST
  /generate/stream``, default settings) against 200 prompts sent at once straight to ComfyUI, and
  **a 0.4 s job** (EmptyImage 1024x1024 -> ImageBlur, the simulator told ImageBlur takes 0.4 s ->
  SaveImage) one at a time through ``/generate/sync`` vs direct.

    .venv/bin/python -m bench.bench_scaling [--quick] [--only streams,subscribers] [--rounds N]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_api import workflow
from bench.bench_e2e import run_direct
from bench.bench_floor import thread_ticks
from bench.bench_sidebyside import ThroughComfyq, alternating, burst, next_workflow
from bench.common import (
    SIM_PIDS,
    add_json_arg,
    cpu_seconds,
    pct,
    server,
    simulator,
    summary_ms,
    write_json,
)
from comfyq.comfy.client import ComfyClient
from comfyq.config import Settings

BLUR_S = 0.4  # ImageBlur's run time in the simulator: the "0.4 s job"
FAR = "2999-01-01T00:00:00.000000Z"  # run_after / deadline of seeded queued jobs

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "finished": [0, 10_000, 1_000_000],
        "queued": 1000,
        "latency_jobs": 100,
        "levels": [1, 16, 64, 256],
        "level_jobs": 128,
        "level_mult": 2,  # at least this many jobs per path and round per job in flight
        "rounds": 2,  # in-flight and streams-at-once rounds per path (alternating order)
        "subscribers": [1, 10, 100, 1000],
        "sub_jobs": 8,
        "streams": 200,
        "slow_jobs": 30,
    },
    "quick": {
        "finished": [0, 10_000],
        "queued": 1000,
        "latency_jobs": 12,
        "levels": [1, 16, 64, 256],
        "level_jobs": 32,
        "level_mult": 1,
        "rounds": 1,
        "subscribers": [1, 10, 100],
        "sub_jobs": 2,
        "streams": 200,
        "slow_jobs": 4,
    },
}


def slow_workflow(colour: int) -> dict[str, Any]:
    """EmptyImage 1024x1024 -> ImageBlur (0.4 s in the simulator) -> ImageInvert -> SaveImage."""
    wf = workflow(colour, blur=True)
    wf["1"]["inputs"].update(width=1024, height=1024)
    return wf


# --- seeding --------------------------------------------------------------------------------------


def seed(
    db: Path, finished: int, queued: int, rebuild_indexes: bool | None = None
) -> dict[str, Any]:
    """Copy the one job the server ran ``finished`` times as finished jobs and ``queued`` times as
    waiting ones, straight into the SQLite file, in one transaction. ``rebuild_indexes`` (default:
    from 50,000 rows) drops the three tables' indexes first and builds them again at the end."""
    t0 = time.perf_counter()
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=DELETE")  # one big write: no WAL the size of the data
        con.execute("PRAGMA synchronous=OFF")
        con.execute("PRAGMA cache_size=-200000")
        (tid,) = con.execute(
            "SELECT id FROM jobs WHERE state = 'completed' ORDER BY created_at LIMIT 1"
        ).fetchone()
        cols = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
        ev_cols = [r[1] for r in con.execute("PRAGMA table_info(job_events)") if r[1] != "id"]
        out_cols = [r[1] for r in con.execute("PRAGMA table_info(outputs)") if r[1] != "id"]
        now_ms = int(time.time() * 1000)
        span_ms = 5 * 86400 * 1000  # inside the default 7-day retention: nothing gets pruned
        phases: dict[str, float] = {}
        mark = time.perf_counter()

        def done(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = now - mark
            mark = now

        con.execute("BEGIN")
        # Indexes are built once at the end (a sort each) rather than row by row: the same SQL
        # as the migrations created them with, read back from sqlite_master.
        indexes = con.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            " AND tbl_name IN ('jobs', 'job_events', 'outputs')"
        ).fetchall()
        if rebuild_indexes is None:
            rebuild_indexes = finished + queued >= 50_000
        if rebuild_indexes:
            for name, _sql in indexes:
                con.execute(f'DROP INDEX "{name}"')
        else:
            indexes = []

        def numbered(count: int, start: int, step: int) -> None:
            # temp.seq: each copy's time-ordered id like comfyq's own (12 hex digits of ms, 20
            # random ones) and its timestamp, computed once per row rather than once per column.
            con.execute("DROP TABLE IF EXISTS temp.seq")
            con.execute("CREATE TEMP TABLE seq (n INTEGER PRIMARY KEY, id TEXT, at TEXT)")
            con.execute(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < :count)"
                " INSERT INTO temp.seq SELECT n,"
                " printf('%012x', :start + n * :step) || lower(hex(randomblob(10))),"
                " strftime('%Y-%m-%dT%H:%M:%f', (:start + n * :step) / 1000.0, 'unixepoch')"
                " || '000Z' FROM c",
                {"count": count, "start": start, "step": step},
            )

        iso = "s.at"
        if finished:
            numbered(finished, now_ms - span_ms, max(1, span_ms // finished))
            over = {
                "id": "s.id",
                "created_at": iso,
                "updated_at": iso,
                "stage_entered_at": iso,
                "finished_at": iso,
                "run_after": iso,
                "payload_hash": "lower(hex(randomblob(32)))",
            }
            con.execute(
                f"INSERT INTO jobs ({', '.join(cols)})"
                f" SELECT {', '.join(over.get(c, 'j.' + c) for c in cols)}"
                " FROM temp.seq s, jobs j WHERE j.id = :tid ORDER BY s.n",
                {"tid": tid},
            )
            done("finished_jobs")
            # Events and outputs of each copy, in id order (appends to their indexes).
            ev_over = {"job_id": "c.id", "at": "c.created_at"}
            con.execute(
                f"INSERT INTO job_events ({', '.join(ev_cols)})"
                f" SELECT {', '.join(ev_over.get(c, 'e.' + c) for c in ev_cols)}"
                " FROM jobs c, job_events e"
                " WHERE c.state = 'completed' AND c.id <> :tid AND e.job_id = :tid"
                " ORDER BY c.id, e.id",
                {"tid": tid},
            )
            done("finished_events")
            out_over = {
                "job_id": "c.id",
                "created_at": "c.created_at",
                # Unique like a UUID, but in insertion order (a random one costs a random page).
                "asset_id": "printf('%08x-0000-4000-8000-%012x', c.rowid, o.id)",
            }
            con.execute(
                f"INSERT INTO outputs ({', '.join(out_cols)})"
                f" SELECT {', '.join(out_over.get(c, 'o.' + c) for c in out_cols)}"
                " FROM jobs c, outputs o"
                " WHERE c.state = 'completed' AND c.id <> :tid AND o.job_id = :tid"
                " ORDER BY c.id, o.id",
                {"tid": tid},
            )
            done("finished_outputs")
        if queued:
            # Waiting jobs admitted in the last minute (ahead of every new job in the queue),
            # not claimable before FAR: they stay queued for the whole measurement.
            numbered(queued, now_ms - 60_000, 1)
            pending = {
                "id": "s.id",
                "state": "'pending'",
                "stage": "'preprocess'",
                "attempts": "0",
                "prepared": "NULL",
                "result": "NULL",
                "error": "NULL",
                "timings": "'{}'",
                "lease_owner": "NULL",
                "lease_expires_at": "NULL",
                "run_after": f"'{FAR}'",
                "deadline_at": f"'{FAR}'",
                "comfy_prompt_id": "NULL",
                "comfy_backend": "NULL",
                "created_at": iso,
                "updated_at": iso,
                "stage_entered_at": iso,
                "finished_at": "NULL",
                "payload_hash": "lower(hex(randomblob(32)))",
            }
            con.execute(
                f"INSERT INTO jobs ({', '.join(cols)})"
                f" SELECT {', '.join(pending.get(c, 'j.' + c) for c in cols)}"
                " FROM temp.seq s, jobs j WHERE j.id = :tid ORDER BY s.n",
                {"tid": tid},
            )
            first = con.execute(
                "SELECT * FROM job_events WHERE job_id = ? ORDER BY id LIMIT 1", (tid,)
            ).fetchone()
            assert first is not None
            con.execute(
                f"INSERT INTO job_events ({', '.join(ev_cols)})"
                f" SELECT {', '.join('c.id' if c == 'job_id' else ('c.created_at' if c == 'at' else 'e.' + c) for c in ev_cols)}"  # noqa: E501
                " FROM jobs c, job_events e"
                " WHERE c.state = 'pending' AND c.run_after = :far AND e.id = :eid ORDER BY c.id",
                {"far": FAR, "eid": first[0]},
            )
        con.execute("DROP TABLE IF EXISTS temp.seq")
        for _name, sql in indexes:
            con.execute(sql)
        done("indexes")
        con.execute("COMMIT")
        done("commit")
        con.execute("PRAGMA journal_mode=WAL")  # as comfyq keeps it
        counts = dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        events = con.execute("SELECT count(*) FROM job_events").fetchone()[0]
    finally:
        con.close()
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
    return {
        "seconds": time.perf_counter() - t0,
        "phases_s": phases,
        "jobs_by_state": counts,
        "events": events,
        "db_mb": size / 1e6,
    }


# --- measurements ---------------------------------------------------------------------------------


async def _pair(comfy: str, base: str, out: Path) -> tuple[ComfyClient, ThroughComfyq, Any]:
    client = ComfyClient(comfy)
    await client.start()
    cq = ThroughComfyq(base)

    async def direct(wf: dict[str, Any]) -> float:
        return await run_direct(client, wf, out)

    return client, cq, direct


async def latency_cost(comfy: str, base: str, pid: int, out: Path, jobs: int) -> dict[str, Any]:
    """One job at a time, direct / SSE / sync in turn: added p50 and server CPU per job."""
    client, cq, direct = await _pair(comfy, base, out)
    try:
        paths = {"direct": direct, "comfyq_sse": cq.sse, "comfyq_sync": cq.sync}
        await alternating(paths, 3)  # warm-up
        cpu0 = cpu_seconds(pid)
        lat = await alternating(paths, jobs)
        cpu = (cpu_seconds(pid) - cpu0) / (2 * jobs) * 1000
        t0 = time.perf_counter()
        async with cq.session.get(base + "/queue-info") as r:
            await r.read()
        info_ms = (time.perf_counter() - t0) * 1000
    finally:
        await cq.close()
        await client.close()
    row: dict[str, Any] = {"cpu_ms_per_job": cpu, "queue_info_ms": info_ms}
    for name, got in lat.items():
        row[name] = summary_ms(got)
        if name != "direct":
            row[name]["added"] = summary_ms(
                [y - x for x, y in zip(lat["direct"], got, strict=True)]
            )
    return row


async def in_flight(
    comfy: str,
    base: str,
    pid: int,
    out: Path,
    levels: list[int],
    jobs: int,
    mult: int,
    rounds: int,
) -> list[dict[str, Any]]:
    """Jobs/s, latency and server CPU per job at each level; rounds alternate the order."""
    client, cq, direct = await _pair(comfy, base, out)
    rows = []
    try:
        await alternating({"direct": direct, "comfyq_sync": cq.sync}, 3)
        for c in levels:
            n = max(jobs, mult * c)
            spent = {"direct": 0.0, "comfyq_sync": 0.0}
            lat: dict[str, list[float]] = {"direct": [], "comfyq_sync": []}
            cpu = 0.0
            order = [("direct", direct), ("comfyq_sync", cq.sync)]
            for r in range(rounds):
                for name, job in order if r % 2 == 0 else order[::-1]:
                    c0 = cpu_seconds(pid)
                    secs, got = await burst(job, n, c)
                    if name == "comfyq_sync":
                        cpu += cpu_seconds(pid) - c0
                    spent[name] += secs
                    lat[name] += got
            row: dict[str, Any] = {
                "in_flight": c,
                "jobs": rounds * n,
                "rate": {k: rounds * n / v for k, v in spent.items()},
                "latency_ms": {k: summary_ms(v) for k, v in lat.items()},
                "cpu_ms_per_job": cpu / (rounds * n) * 1000,
            }
            row["ratio"] = row["rate"]["comfyq_sync"] / row["rate"]["direct"]
            row["added_p50_ms"] = (
                row["latency_ms"]["comfyq_sync"]["p50"] - row["latency_ms"]["direct"]["p50"]
            )
            rows.append(row)
            print(
                f"  {c:3d} in flight: direct {row['rate']['direct']:6.1f}/s,"
                f" comfyq sync {row['rate']['comfyq_sync']:6.1f}/s (x{row['ratio']:.2f}),"
                f" added p50 {row['added_p50_ms']:6.1f} ms,"
                f" server CPU {row['cpu_ms_per_job']:.2f} ms/job",
                flush=True,
            )
    finally:
        await cq.close()
        await client.close()
    return rows


def _at(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


async def subscribers(
    base: str, pid: int, counts: list[int], jobs: int, colour0: int
) -> list[dict[str, Any]]:
    """N streams of one 0.4 s job's events, opened at once after its admission."""
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600, sock_read=None)
    rows: list[dict[str, Any]] = []
    colour = colour0
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

        async def follow(job_id: str, delays: list[float]) -> bool:
            async with s.get(f"{base}/jobs/{job_id}/events") as r:
                if r.status != 200:
                    return False
                async for raw in r.content:
                    if raw.startswith(b"data: "):
                        ev = json.loads(raw[6:])
                        if ev.get("status") == "final_result":
                            delays.append(time.time() - _at(ev["timestamp"]))
                            return True
            return False

        async def one_job(n: int, delays: list[float]) -> tuple[float, int]:
            nonlocal colour
            colour += 1
            t0 = time.perf_counter()
            body = {"input": {"workflow_json": slow_workflow(colour)}}
            async with s.post(base + "/generate", json=body) as r:
                if r.status != 202:
                    raise RuntimeError(f"POST /generate answered {r.status}")
                job_id = (await r.json())["id"]
            got = await asyncio.gather(*(follow(job_id, delays) for _ in range(n)))
            return time.perf_counter() - t0, sum(got)

        await one_job(1, [])  # warm-up
        for n in counts:
            delays: list[float] = []
            walls, finals = [], 0
            cpu0 = cpu_seconds(pid)
            for _ in range(jobs):
                wall, ok = await one_job(n, delays)
                walls.append(wall)
                finals += ok
            cpu = (cpu_seconds(pid) - cpu0) / jobs * 1000
            rows.append(
                {
                    "subscribers": n,
                    "jobs": jobs,
                    "finals": finals,
                    "cpu_ms_per_job": cpu,
                    "wall_ms": summary_ms(walls),
                    "final_delay_ms": summary_ms(delays),
                }
            )
            print(
                f"  {n:5d} subscribers on one 0.4 s job: server CPU {cpu:8.1f} ms/job,"
                f" final_result delay p50 {pct(delays, 0.5) * 1000:6.1f} ms"
                f" p99 {pct(delays, 0.99) * 1000:6.1f} ms, {finals}/{n * jobs} finals",
                flush=True,
            )
    base_cpu = rows[0]["cpu_ms_per_job"] if rows else 0.0
    for row in rows[1:]:
        row["cpu_ms_per_subscriber"] = (row["cpu_ms_per_job"] - base_cpu) / (
            row["subscribers"] - rows[0]["subscribers"]
        )
    return rows


async def streams_at_once(
    comfy: str, base: str, out: Path, n: int, rounds: int, pid: int | None = None
) -> dict[str, Any]:
    """``n`` POST /generate/stream at once vs ``n`` prompts at once to ComfyUI; rounds alternate.

    With the server's ``pid``: its CPU per job over the comfyq rounds, split by thread (event
    loop, SQLite writer, others), and the share of comfyq's wall that CPU accounts for (the rest
    is waiting: the simulator, the client, the other processes on the machine). Also the events
    and socket reads per stream, by kind: what the queue-position messages add."""
    client = ComfyClient(comfy)
    await client.start()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600, sock_read=None)
    walls: dict[str, list[float]] = {"direct": [], "comfyq_stream": []}
    statuses: dict[str, int] = {}
    kinds: dict[str, int] = {}
    chunks = 0
    cpu = 0.0
    ticks = {"loop": 0, "writer": 0, "other": 0}
    sim_cpu = 0.0
    sim_pid = SIM_PIDS.get(comfy)
    completed = 0
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

            async def stream(wf: dict[str, Any]) -> bool:
                nonlocal chunks
                async with s.post(
                    base + "/generate/stream", json={"input": {"workflow_json": wf}}
                ) as r:
                    statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
                    if r.status != 200:
                        await r.read()
                        return False
                    async for data, _ in r.content.iter_chunks():
                        chunks += 1
                        for raw in data.split(b"\n"):
                            if not raw.startswith(b"data: "):
                                continue
                            ev = json.loads(raw[6:])
                            kind = str(ev.get("event"))
                            kinds[kind] = kinds.get(kind, 0) + 1
                            if ev.get("status") == "final_result":
                                result = ev["result"]
                                for o in result.get("output") or []:
                                    async with s.get(base + o["url"]) as f:
                                        await f.read()
                                return bool(result.get("status") == "completed")
                return False

            async def via_comfyq() -> float:
                nonlocal completed, cpu, sim_cpu
                c0 = cpu_seconds(pid) if pid else 0.0
                th0 = thread_ticks(pid) if pid else {}
                s0 = cpu_seconds(sim_pid) if sim_pid else 0.0
                t0 = time.perf_counter()
                done = await asyncio.gather(*(stream(next_workflow()) for _ in range(n)))
                wall = time.perf_counter() - t0
                if pid:
                    cpu += cpu_seconds(pid) - c0
                    th1 = thread_ticks(pid)
                    for key in ticks:
                        ticks[key] += th1[key] - th0[key]
                if sim_pid:
                    sim_cpu += cpu_seconds(sim_pid) - s0
                completed += sum(done)
                return wall

            async def via_direct() -> float:
                t0 = time.perf_counter()
                await asyncio.gather(*(run_direct(client, next_workflow(), out) for _ in range(n)))
                return time.perf_counter() - t0

            await via_direct()  # warm-up
            statuses.clear()
            order = [("direct", via_direct), ("comfyq_stream", via_comfyq)]
            for r in range(rounds):
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    walls[name].append(await fn())
    finally:
        await client.close()
    ratio = sum(walls["comfyq_stream"]) / sum(walls["direct"])
    jobs = rounds * n
    row: dict[str, Any] = {
        "streams": n,
        "rounds": rounds,
        "completed": completed,
        "statuses": statuses,
        "wall_s": walls,
        "ratio": ratio,
        "events_per_stream": {k: v / jobs for k, v in sorted(kinds.items())},
        "reads_per_stream": chunks / jobs,
    }
    extra = ""
    if pid:
        tick = os.sysconf("SC_CLK_TCK")
        row["cpu_ms_per_job"] = cpu / jobs * 1000
        row["thread_ms_per_job"] = {k: v / tick / jobs * 1000 for k, v in ticks.items()}
        # comfyq's CPU for the n jobs against its wall: near 1, the wall is CPU per job x n.
        row["cpu_share_of_wall"] = cpu / sum(walls["comfyq_stream"])
        split = ", ".join(f"{k} {v:.2f}" for k, v in row["thread_ms_per_job"].items())
        extra = (
            f"; server CPU {row['cpu_ms_per_job']:.2f} ms/job ({split}),"
            f" {row['cpu_share_of_wall']:.0%} of comfyq's wall"
        )
    if sim_pid:
        row["simulator_cpu_ms_per_job"] = sim_cpu / jobs * 1000
    print(
        f"  {n} streams at once: {completed}/{jobs} completed, statuses {statuses},"
        f" wall {sum(walls['comfyq_stream']) / rounds:.2f} s vs direct"
        f" {sum(walls['direct']) / rounds:.2f} s (x{ratio:.3f}){extra};"
        f" {row['events_per_stream'].get('queue', 0):.1f} queue events and"
        f" {row['reads_per_stream']:.1f} reads per stream",
        flush=True,
    )
    return row


async def slow_job(comfy: str, base: str, out: Path, jobs: int) -> dict[str, Any]:
    """The 0.4 s job one at a time, direct and /generate/sync in turn."""
    client, cq, direct = await _pair(comfy, base, out)
    colour = 0x500000
    try:

        def wf() -> dict[str, Any]:
            nonlocal colour
            colour += 1
            return slow_workflow(colour)

        await direct(wf())
        await cq.sync(wf())
        lat: dict[str, list[float]] = {"direct": [], "comfyq_sync": []}
        for _ in range(jobs):
            lat["direct"].append(await direct(wf()))
            lat["comfyq_sync"].append(await cq.sync(wf()))
    finally:
        await cq.close()
        await client.close()
    row = {k: summary_ms(v) for k, v in lat.items()}
    ratio = row["comfyq_sync"]["p50"] / row["direct"]["p50"]
    print(
        f"  0.4 s job, one at a time: direct p50 {row['direct']['p50']:.1f} ms,"
        f" comfyq sync p50 {row['comfyq_sync']['p50']:.1f} ms (x{ratio:.3f})",
        flush=True,
    )
    return {"jobs": jobs, **row, "ratio_p50": ratio}


# --- the run --------------------------------------------------------------------------------------


def template_job(root: Path, comfy: str) -> None:
    """Let the server migrate a database and run one trivial job in it (the copies' model)."""
    with server(root, comfy) as (base, _pid):

        async def one() -> None:
            cq = ThroughComfyq(base)
            try:
                await cq.sync(workflow(0xABCDEF, blur=False))
            finally:
                await cq.close()

        asyncio.run(one())


def database_sizes(comfy: str, root: Path, size: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    configs = [("finished", n) for n in size["finished"]] + [("queued", size["queued"])]
    for kind, n in configs:
        d = root / f"db-{kind}-{n}"
        d.mkdir()
        (d / "direct").mkdir()
        template_job(d, comfy)
        seeded = seed(d / "q.db", n if kind == "finished" else 0, n if kind == "queued" else 0)
        print(
            f"  seeded {n:,} {kind} jobs in {seeded['seconds']:.1f} s"
            f" ({seeded['db_mb']:.0f} MB, {seeded['events']:,} events)",
            flush=True,
        )
        with server(d, comfy) as (base, pid):
            row = asyncio.run(latency_cost(comfy, base, pid, d / "direct", size["latency_jobs"]))
        row.update(kind=kind, count=n, seed=seeded)
        rows.append(row)
        print(
            f"  {n:9,} {kind:8s}: added p50 sync {row['comfyq_sync']['added']['p50']:6.2f} ms,"
            f" SSE {row['comfyq_sse']['added']['p50']:6.2f} ms;"
            f" server CPU {row['cpu_ms_per_job']:.2f} ms/job",
            flush=True,
        )
    return rows


PARTS = ("database", "in_flight", "subscribers", "slow_job", "streams")


def run(
    size_name: str, root: Path, parts: tuple[str, ...] = PARTS, rounds: int | None = None
) -> dict[str, Any]:
    """The measurements named in ``parts`` (all by default); ``rounds`` overrides the size's."""
    size = dict(SIZES[size_name])
    if rounds is not None:
        size["rounds"] = rounds
    out: dict[str, Any] = {"size": size_name, "args": size}
    with simulator(root / "sim", durations=f"ImageBlur={BLUR_S}") as comfy:
        if "database" in parts:
            print("database size (one job at a time, paths in turn):", flush=True)
            out["database"] = database_sizes(comfy, root, size)
        if {"in_flight", "subscribers", "slow_job"} & set(parts):
            d = root / "live"
            d.mkdir()
            (d / "direct").mkdir()
            with server(d, comfy) as (base, pid):
                if "in_flight" in parts:
                    print("jobs in flight (direct vs POST /generate/sync):", flush=True)
                    out["in_flight"] = asyncio.run(
                        in_flight(
                            comfy,
                            base,
                            pid,
                            d / "direct",
                            size["levels"],
                            size["level_jobs"],
                            size["level_mult"],
                            size["rounds"],
                        )
                    )
                if "subscribers" in parts:
                    print("SSE subscribers on one job:", flush=True)
                    out["subscribers"] = asyncio.run(
                        subscribers(base, pid, size["subscribers"], size["sub_jobs"], 0x300000)
                    )
                if "slow_job" in parts:
                    print("issue 13's 0.4 s job:", flush=True)
                    out["slow_job"] = asyncio.run(
                        slow_job(comfy, base, d / "direct", size["slow_jobs"])
                    )
        if "streams" in parts:
            d = root / "streams"
            d.mkdir()
            (d / "direct").mkdir()
            default_limit = Settings().max_queue_size
            with server(d, comfy, MAX_QUEUE_SIZE=str(default_limit)) as (base, pid):
                print(f"streams at once (default settings, MAX_QUEUE_SIZE {default_limit}):")
                out["streams"] = asyncio.run(
                    streams_at_once(comfy, base, d / "direct", size["streams"], size["rounds"], pid)
                )
                out["streams"]["max_queue_size"] = default_limit
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (under 90 s)")
    ap.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated measurements to run (default all: {','.join(PARTS)})",
    )
    ap.add_argument("--rounds", type=int, help="rounds per path (default: the size's)")
    add_json_arg(ap)
    args = ap.parse_args()
    parts = tuple(p for p in args.only.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown measurement(s): {', '.join(sorted(unknown))}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        out = run("quick" if args.quick else "full", Path(tmp), parts, args.rounds)
    out["duration_s"] = time.perf_counter() - t0
    out["run_id"] = uuid.uuid4().hex[:8]
    print(f"scaling: done in {out['duration_s']:.0f} s")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
