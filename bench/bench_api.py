"""HTTP API: admissions/s (each one durable before its 202) and 1,000 SSE subscribers on running
jobs (server RSS, event delay p50/p99), plus the idle RSS of a fresh server.

The server is ``comfyq serve`` in a subprocess, the simulator another; this process is the client.
Targets (issue 4): >= 3,000 admissions/s; 1,000 subscribers under 150 MB RSS with p99 delay under
50 ms; idle RSS under 60 MB. Figures are printed, never judged.

    .venv/bin/python -m bench.bench_api [--admissions 20000] [--concurrency 64]
        [--subscribers 1000] [--jobs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    add_json_arg,
    cpu_seconds,
    free_port,
    pct,
    rss_mb,
    server,
    simulator,
    summary_ms,
    write_json,
)


def workflow(color: int, blur: bool) -> dict[str, Any]:
    wf: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "bench"},
        },
    }
    if blur:
        wf["4"] = {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        }
        wf["2"]["inputs"]["image"] = ["4", 0]
    return wf


# --- admissions ----------------------------------------------------------------------------------


async def raw_admissions(
    url: str, n: int, concurrency: int
) -> tuple[float, list[float], dict[int, int]]:
    """``admissions`` with a minimal HTTP/1.1 client: one keep-alive connection per concurrent
    client, each request's bytes built before the clock starts, each answer read by its
    Content-Length. The same requests and answers as aiohttp's client at a fraction of its CPU
    (on a 2-core machine the client shares the cores with the server it measures)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = []
    for i in range(n):
        body = json.dumps({"input": {"workflow_json": workflow(i, False)}}).encode()
        head = (
            f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_i = 0

    async def client() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while next_i < n:
                i = next_i
                next_i += 1
                t = time.perf_counter()
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                        break
                if length:
                    await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(time.perf_counter() - t)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return n / elapsed, latencies, statuses


async def admissions(
    url: str, n: int, concurrency: int
) -> tuple[float, list[float], dict[int, int]]:
    bodies = [
        json.dumps({"input": {"workflow_json": workflow(i, False)}}).encode() for i in range(n)
    ]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_i = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def client() -> None:
            nonlocal next_i
            while next_i < n:
                i = next_i
                next_i += 1
                t = time.perf_counter()
                async with s.post(
                    url + "/generate", data=bodies[i], headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return n / elapsed, latencies, statuses


# --- subscribers ---------------------------------------------------------------------------------


def _at(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


async def subscribers(url: str, pid: int, n_subs: int, n_jobs: int) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        ids = []
        for i in range(n_jobs):
            async with s.post(
                url + "/generate", json={"input": {"workflow_json": workflow(10_000 + i, True)}}
            ) as r:
                ids.append((await r.json())["id"])
        # Wait until every job holds a generation slot (running), then subscribe.
        while True:
            async with s.get(url + "/queue-info") as r:
                info = await r.json()
            if info["generation_in_flight"] == n_jobs:
                break
            await asyncio.sleep(0.05)
        connected = asyncio.Event()
        ready = 0
        delays: list[float] = []
        received = 0
        finals = 0

        async def one(job_id: str) -> None:
            nonlocal ready, received, finals
            async with s.get(url + f"/jobs/{job_id}/events") as r:
                t_conn = time.time()
                ready += 1
                if ready == n_subs:
                    connected.set()
                async for raw in r.content:
                    if not raw.startswith(b"data: "):
                        continue
                    now = time.time()
                    ev = json.loads(raw[6:])
                    received += 1
                    if ev["event"] in ("state", "final_result"):
                        at = _at(ev["timestamp"])
                        if at >= t_conn:  # a live state change, not one replayed from the table
                            delays.append(now - at)
                    if ev["status"] == "final_result":
                        finals += 1
                        return

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(one(ids[i % n_jobs])) for i in range(n_subs)]
        await asyncio.wait_for(connected.wait(), 120)
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        rss_connected = rss_mb(pid)
        peak = rss_connected
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            peak = max(peak, rss_mb(pid))
        await asyncio.gather(*tasks)
        return {
            "connect_s": connect_s,
            "rss_connected": rss_connected,
            "rss_peak": peak,
            "delays": delays,
            "received": received,
            "finals": finals,
            "elapsed": time.perf_counter() - t0,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--admissions", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=20, help="running jobs the subscribers watch")
    ap.add_argument("--job-seconds", type=float, default=0.5, help="simulated run time of each job")
    ap.add_argument(
        "--client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="the admissions' client: a minimal HTTP/1.1 one (default) or aiohttp's",
    )
    ap.add_argument("--admissions-only", action="store_true", help="skip the subscribers' part")
    add_json_arg(ap)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {
        "args": {
            "admissions": args.admissions,
            "concurrency": args.concurrency,
            "subscribers": args.subscribers,
            "jobs": args.jobs,
            "job_seconds": args.job_seconds,
            "client": args.client,
        }
    }

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        # Admissions: the backend never answers, so admitted jobs are preprocessed and then wait for
        # ComfyUI, as on a busy server; every 202 is sent after the job's commit (synchronous=FULL).
        (root / "a").mkdir()
        with server(root / "a", f"http://127.0.0.1:{free_port()}") as (url, pid):
            time.sleep(1.0)
            out["idle_rss_mb"] = rss_mb(pid)
            print(
                "idle RSS of a fresh server:"
                f"         {out['idle_rss_mb']:7.1f} MB   (target < 60 MB)"
            )
            admit = raw_admissions if args.client == "raw" else admissions
            asyncio.run(admit(url, 500, args.concurrency))  # warm-up
            s0, c0, t0 = cpu_seconds(pid), cpu_seconds(), time.perf_counter()
            rate, lat, statuses = asyncio.run(admit(url, args.admissions, args.concurrency))
            wall = time.perf_counter() - t0
            server_s = cpu_seconds(pid) - s0
            server_cpu, client_cpu = server_s / wall, (cpu_seconds() - c0) / wall
            print(
                f"POST /generate admissions/s:        {rate:7.0f}      (target >= 3000;"
                f" {args.admissions} requests,"
                f" {args.concurrency} concurrent, {args.client} client, statuses {statuses})"
            )
            print(
                "  server CPU per admission:"
                f"         {server_s / args.admissions * 1000:7.3f} ms   (all its threads)"
            )
            print(
                "  latency p50/p99:"
                f"                  {pct(lat, 0.5) * 1000:7.1f} / {pct(lat, 0.99) * 1000:.1f} ms"
            )
            print(
                "  CPU busy: server / this client:"
                f"   {server_cpu * 100:5.0f}% / {client_cpu * 100:.0f}%"
                f"   (of one core each; {os.cpu_count()} cores)"
            )
            rss_after = rss_mb(pid)
            print(f"  server RSS after admissions:      {rss_after:7.1f} MB")
            out["admissions"] = {
                "rate": rate,
                "latency_ms": summary_ms(lat),
                "statuses": {str(k): v for k, v in statuses.items()},
                "server_cpu": server_cpu,
                "server_cpu_ms_per_admission": server_s / args.admissions * 1000,
                "client_cpu": client_cpu,
                "rss_after_mb": rss_after,
            }
        if args.admissions_only:
            write_json(args.json, out)
            return 0
        (root / "b").mkdir()
        durations = f"ImageBlur={args.job_seconds}"
        with (
            simulator(root / "b", durations, steps=20) as sim,
            server(root / "b", sim, GENERATION_WORKERS=str(args.jobs)) as (url, pid),
        ):
            time.sleep(1.0)
            idle = rss_mb(pid)
            r = asyncio.run(subscribers(url, pid, args.subscribers, args.jobs))
            d = r["delays"]
            print(f"{args.subscribers} SSE subscribers on {args.jobs} running jobs:")
            print(
                "  server RSS idle / connected / peak:"
                f" {idle:.1f} / {r['rss_connected']:.1f} / {r['rss_peak']:.1f} MB"
                "   (target < 150 MB)"
            )
            print(f"  all connected in:                 {r['connect_s']:7.2f} s")
            print(
                f"  events received:                  {r['received']:7d}"
                f"  ({r['finals']} final_result,"
                f" {r['received'] / r['elapsed']:.0f} events/s)"
            )
            print(
                "  live state-event delay p50/p99:"
                f"   {pct(d, 0.5) * 1000:7.1f} / {pct(d, 0.99) * 1000:.1f} ms"
                f"   (target p99 < 50 ms; {len(d)} samples,"
                " from the commit's timestamp to the client)"
            )
            out["subscribers"] = {
                "rss_idle_mb": idle,
                "rss_connected_mb": r["rss_connected"],
                "rss_peak_mb": r["rss_peak"],
                "connect_s": r["connect_s"],
                "received": r["received"],
                "finals": r["finals"],
                "events_per_s": r["received"] / r["elapsed"],
                "delay_ms": summary_ms(d),
                "delays_ms": [x * 1000 for x in d],
            }
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
