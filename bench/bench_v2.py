"""The Comfy API v2, side by side: the same trivial job (EmptyImage -> ImageInvert -> SaveImage)
sent straight to ComfyUI (comfyq's ComfyClient: POST /prompt, follow, download), through the
official comfy-api-proxy (with --state-dir: durable, as comfyq is) and through comfyq's /api/v2, the
last two each waited on by polling GET /api/v2/jobs/{id} and by the SSE stream, then the output
downloaded from its content URL. All against one ComfyUI (the simulator; with COMFYUI_TEST_URL set,
also that real ComfyUI).

Figures: latency one job at a time with the paths in turn (added p50/p90 paired against direct),
server CPU per job of the proxy and of comfyq, throughput at 16 in flight (rounds alternate forward
and reversed), and 100 event streams opened at once on 100 jobs: how many end with the job's
terminal status, how many stall, how many report a terminal status that is not the last word
(false terminal), how many the server refuses.

    .venv/bin/python -m bench.bench_v2 [--latency-jobs 100] [--throughput-jobs 64] [--streams 100]
        [--poll-ms 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_api import workflow
from bench.bench_e2e import run_direct
from bench.bench_sidebyside import ThroughComfyq
from bench.common import (
    add_json_arg,
    cpu_seconds,
    free_port,
    rss_mb,
    server,
    simulator,
    summary_ms,
    wait_http,
    write_json,
)
from comfyq.comfy.client import ComfyClient
from comfyq.netguard import redact_url

Job = Callable[[dict[str, Any]], Awaitable[float]]
TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
_colour = itertools.count(1)


def next_workflow() -> dict[str, Any]:
    return workflow(next(_colour) % 0xFFFFFF, blur=False)


@contextmanager
def official_proxy(root: Path, comfy_url: str) -> Iterator[tuple[str, int]]:
    """comfy-api-proxy in front of ``comfy_url``, with its durable state file; (URL, pid)."""
    exe = Path(sys.executable).with_name("comfy-api-proxy")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "proxy.log").open("ab")
    proc = subprocess.Popen(
        [str(exe), "run", "--comfyui", comfy_url, "--port", str(port)]
        + ["--state-dir", str(root / "state")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/api/v2/health", proc)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


class V2Client:
    """One Comfy API v2 server, as an HTTP client uses it (the SDK's calls, without its pauses)."""

    def __init__(self, base: str, poll: float) -> None:
        self.base = base
        self.poll_interval = poll
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=300, sock_read=None),
        )
        self.false_terminal = 0
        self.failed = 0
        self.stream_refused = 0

    async def close(self) -> None:
        await self.session.close()

    def url(self, link: str) -> str:
        return link if link.startswith("http") else self.base + link

    async def submit(self, wf: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(self.base + "/api/v2/jobs", json={"workflow": wf}) as r:
            if r.status != 201:
                raise RuntimeError(f"POST /api/v2/jobs answered {r.status}: {await r.text()}")
            return dict(await r.json())

    async def get(self, job: dict[str, Any]) -> dict[str, Any]:
        async with self.session.get(self.url(job["urls"]["self"])) as r:
            return dict(await r.json())

    async def settle(self, job: dict[str, Any], seen: str) -> dict[str, Any]:
        """A terminal status other than succeeded: poll on a little to see whether it was the
        last word (a false terminal state when it changes)."""
        end = time.perf_counter() + 2.0
        while time.perf_counter() < end:
            await asyncio.sleep(0.05)
            now = await self.get(job)
            if now["status"] != seen:
                self.false_terminal += 1
                while now["status"] not in TERMINAL:
                    await asyncio.sleep(self.poll_interval)
                    now = await self.get(now)
                return now
        return job

    async def download(self, job: dict[str, Any]) -> None:
        if job["status"] != "succeeded":
            job = await self.settle(job, job["status"])
        if job["status"] != "succeeded":
            self.failed += 1  # counted and reported; the run goes on
            return
        for out in job["outputs"]:
            async with self.session.get(self.url(out["url"])) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET {out['url']} answered {r.status}")
                await r.read()

    async def poll(self, wf: dict[str, Any]) -> float:
        """Submit, poll GET /api/v2/jobs/{id} until terminal, download the outputs."""
        t0 = time.perf_counter()
        job = await self.submit(wf)
        while job["status"] not in TERMINAL:
            await asyncio.sleep(self.poll_interval)
            job = await self.get(job)
        await self.download(job)
        return time.perf_counter() - t0

    async def stream(self, job: dict[str, Any]) -> tuple[str | None, list[str], int]:
        """Read a job's event stream to its end: (last status, statuses, HTTP status)."""
        statuses: list[str] = []
        event = ""
        async with self.session.get(self.url(job["urls"]["events"])) as r:
            if r.status != 200:
                await r.read()
                return None, statuses, r.status
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "status":
                    st = json.loads(line[5:])["status"]
                    statuses.append(st)
                    if st in TERMINAL:
                        break
        return (statuses[-1] if statuses else None), statuses, 200

    async def sse(self, wf: dict[str, Any]) -> float:
        """Submit, read the event stream to the terminal status, GET the job, download."""
        t0 = time.perf_counter()
        job = await self.submit(wf)
        last, _, code = await self.stream(job)
        if code != 200:
            # Refused (the proxy's cap of 8 streams): the job is still the truth; poll it.
            self.stream_refused += 1
        job = await self.get(job)
        if job["status"] not in TERMINAL or last != job["status"]:
            if last in TERMINAL and last != job["status"]:
                self.false_terminal += 1
            while job["status"] not in TERMINAL:
                await asyncio.sleep(self.poll_interval)
                job = await self.get(job)
        await self.download(job)
        return time.perf_counter() - t0


async def alternating(
    paths: dict[str, Job], n: int, pids: dict[str, int] | None = None
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """``n`` jobs per path, paths in turn; latencies, and each server's CPU ms per job of each
    path (the /proc tick is 10 ms: summed over many jobs the sampling evens out)."""
    lat: dict[str, list[float]] = {name: [] for name in paths}
    cpu = {name: dict.fromkeys(pids or {}, 0.0) for name in paths}
    for _ in range(n):
        for name, job in paths.items():
            before = {k: cpu_seconds(pid) for k, pid in (pids or {}).items()}
            lat[name].append(await job(next_workflow()))
            for k, pid in (pids or {}).items():
                cpu[name][k] += (cpu_seconds(pid) - before[k]) * 1000 / n
    return lat, cpu


async def burst(job: Job, n: int, in_flight: int) -> tuple[float, list[float]]:
    left = iter(range(n))
    lat: list[float] = []

    async def worker() -> None:
        for _ in left:
            lat.append(await job(next_workflow()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - t0, lat


async def throughput(
    paths: dict[str, Job], n: int, in_flight: int, rounds: int = 2
) -> dict[str, Any]:
    spent = dict.fromkeys(paths, 0.0)
    lat: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        order = list(paths.items())
        for name, job in order if r % 2 == 0 else order[::-1]:
            secs, got = await burst(job, n, in_flight)
            spent[name] += secs
            lat[name] += got
    rate = {name: n * rounds / secs for name, secs in spent.items()}
    return {
        "in_flight": in_flight,
        "jobs": n * rounds,
        "rate": rate,
        "ratio_to_direct": {name: r / rate["direct"] for name, r in rate.items()},
        "latency_ms": {name: summary_ms(v) for name, v in lat.items()},
    }


async def many_streams(client: V2Client, n: int, timeout: float = 30.0) -> dict[str, Any]:
    """``n`` jobs, each with its event stream opened at once; how the streams end."""
    jobs = await asyncio.gather(*(client.submit(next_workflow()) for _ in range(n)))

    async def one(job: dict[str, Any]) -> tuple[str, list[str], int]:
        try:
            last, statuses, code = await asyncio.wait_for(client.stream(job), timeout)
        except TimeoutError:
            return "stalled", [], 200
        return (last or "none"), statuses, code

    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(j) for j in jobs))
    elapsed = time.perf_counter() - t0
    finals = await asyncio.gather(*(client.get(j) for j in jobs))
    served = sum(1 for last, _, code in got if code == 200 and last in TERMINAL)
    false_term = 0
    for (last, statuses, _), final in zip(got, finals, strict=True):
        early = [s for s in statuses[:-1] if s in TERMINAL]
        if early or (last in TERMINAL and last != final["status"]):
            false_term += 1
    return {
        "streams": n,
        "served_to_terminal": served,
        "refused": sum(1 for _, _, code in got if code != 200),
        "refused_codes": sorted({code for _, _, code in got if code != 200}),
        "stalled": sum(1 for last, _, _ in got if last == "stalled"),
        "false_terminal": false_term,
        "seconds": elapsed,
    }


async def side_by_side(
    comfy_url: str,
    root: Path,
    latency_jobs: int,
    throughput_jobs: int,
    streams: int,
    poll: float,
    workers: int = 0,
) -> dict[str, Any]:
    (root / "direct").mkdir(parents=True)
    (root / "comfyq").mkdir()
    env = {"GENERATION_WORKERS": str(workers)} if workers else {}
    with (
        server(root / "comfyq", comfy_url, None, **env) as (cq_base, cq_pid),
        official_proxy(root / "proxy", comfy_url) as (px_base, px_pid),
    ):
        client = ComfyClient(comfy_url)
        await client.start()
        cq = V2Client(cq_base, poll)
        px = V2Client(px_base, poll)
        own = ThroughComfyq(cq_base)
        try:

            async def direct(wf: dict[str, Any]) -> float:
                return await run_direct(client, wf, root / "direct")

            paths: dict[str, Job] = {
                "direct": direct,
                "proxy_poll": px.poll,
                "comfyq_poll": cq.poll,
                "proxy_sse": px.sse,
                "comfyq_sse": cq.sse,
                "comfyq_own_sse": own.sse,  # comfyq's own API, for the v2 layer's share
            }
            await alternating(paths, 5)  # warm-up
            lat, per_path = await alternating(
                paths, latency_jobs, {"comfyq": cq_pid, "proxy": px_pid}
            )
            cpu = {
                "comfyq_poll": per_path["comfyq_poll"]["comfyq"],
                "comfyq_sse": per_path["comfyq_sse"]["comfyq"],
                "comfyq_own_sse": per_path["comfyq_own_sse"]["comfyq"],
                "proxy_poll": per_path["proxy_poll"]["proxy"],
                "proxy_sse": per_path["proxy_sse"]["proxy"],
            }
            figures: dict[str, Any] = {}
            print(f"  one at a time, paths in turn, {latency_jobs} jobs per path:")
            for name, got in lat.items():
                f: dict[str, Any] = dict(summary_ms(got))
                figures[name] = f
                line = f"    {name:12s} p50 {f['p50']:7.2f} ms  p90 {f['p90']:7.2f} ms"
                if name != "direct":
                    added = [y - x for x, y in zip(lat["direct"], got, strict=True)]
                    f["added"] = summary_ms(added)
                    line += (
                        f"   added p50 {f['added']['p50']:+6.2f} ms"
                        f"  p90 {f['added']['p90']:+6.2f} ms"
                    )
                print(line)
            print(
                "    server CPU per job: "
                + ", ".join(f"{name} {ms:.1f} ms" for name, ms in cpu.items())
            )
            print(f"  throughput at 16 in flight, {throughput_jobs} jobs per path and round:")
            tp = await throughput(paths, throughput_jobs, 16)
            for name, rate in tp["rate"].items():
                print(f"    {name:12s} {rate:6.1f} jobs/s  x{tp['ratio_to_direct'][name]:.2f}")
            print(f"  {streams} event streams at once:")
            st = {
                "comfyq": await many_streams(cq, streams),
                "proxy": await many_streams(px, streams),
            }
            for name, s in st.items():
                print(
                    f"    {name:7s} served {s['served_to_terminal']}/{s['streams']}"
                    f"  refused {s['refused']} {s['refused_codes']}  stalled {s['stalled']}"
                    f"  false terminal {s['false_terminal']}  in {s['seconds']:.1f} s"
                )
            false_terminal = {"comfyq": cq.false_terminal, "proxy": px.false_terminal}
            refused = {"comfyq": cq.stream_refused, "proxy": px.stream_refused}
            print(f"  false terminal states while polling/streaming: {false_terminal}")
            print(f"  event streams refused (the client polled instead): {refused}")
            return {
                "url": redact_url(comfy_url),
                "latency": figures,
                "cpu_ms_per_job": cpu,
                "throughput_16": tp,
                "streams": st,
                "false_terminal": false_terminal,
                "streams_refused": refused,
                "failed_jobs": {"comfyq": cq.failed, "proxy": px.failed},
                "rss_mb": {"comfyq": rss_mb(cq_pid), "proxy": rss_mb(px_pid)},
                "poll_ms": poll * 1000,
                "generation_workers": workers or "default",
            }
        finally:
            await cq.close()
            await px.close()
            await own.close()
            await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-jobs", type=int, default=100, help="jobs per path, one at a time")
    ap.add_argument("--throughput-jobs", type=int, default=64, help="jobs per path and round")
    ap.add_argument("--streams", type=int, default=100, help="event streams opened at once")
    ap.add_argument("--poll-ms", type=float, default=10.0, help="poll interval of the poll paths")
    ap.add_argument(
        "--generation-workers",
        type=int,
        default=0,
        help="comfyq's GENERATION_WORKERS (prompts in flight per backend; 0: its default)",
    )
    ap.add_argument("--real-latency-jobs", type=int, default=50)
    ap.add_argument("--real-throughput-jobs", type=int, default=32)
    add_json_arg(ap)
    args = ap.parse_args()
    poll = args.poll_ms / 1000
    out: dict[str, Any] = {"args": vars(args) | {"json": None}}
    real = os.environ.get("COMFYUI_TEST_URL", "")
    with tempfile.TemporaryDirectory(prefix="bench-v2-") as tmp:
        root = Path(tmp)
        with simulator(root / "sim") as sim:
            print("Comfy API v2 side by side against the simulator (zero-time nodes):")
            out["simulator"] = asyncio.run(
                side_by_side(
                    sim,
                    root / "a",
                    args.latency_jobs,
                    args.throughput_jobs,
                    args.streams,
                    poll,
                    args.generation_workers,
                )
            )
        if real:
            print(f"Comfy API v2 side by side against the real ComfyUI at {redact_url(real)}:")
            out["real"] = asyncio.run(
                side_by_side(
                    real,
                    root / "b",
                    args.real_latency_jobs,
                    args.real_throughput_jobs,
                    args.streams,
                    poll,
                    args.generation_workers,
                )
            )
        else:
            out["real"] = {"skipped": "COMFYUI_TEST_URL is not set"}
    write_json(args.json, out)


if __name__ == "__main__":
    main()
