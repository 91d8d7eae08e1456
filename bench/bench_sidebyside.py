"""Side by side, over HTTP, as a user sees it: the same workflows sent (a) straight to ComfyUI with
comfyq's own ComfyClient (POST /prompt, follow to the end, download the outputs) and through
``comfyq serve`` in the two ways a client waits, (b) POST /generate then the job's SSE stream to
``final_result`` and (c) POST /generate/sync, each then GETting its output files; all against one
ComfyUI process. Latency runs take the paths in turn job by job (a,b,c,a,b,c...) so machine drift
cancels; throughput runs (N jobs in flight) alternate whole rounds, forward then reversed.

The simulator (zero-time nodes) always; with COMFYUI_TEST_URL set, a real ComfyUI as well
(model-free nodes: EmptyImage -> ImageInvert -> SaveImage). comfyq runs with its default settings.

    .venv/bin/python -m bench.bench_sidebyside [--latency-jobs 200] [--throughput-jobs 64]
        [--levels 1,4,16] [--real-latency-jobs 100] [--real-throughput-jobs 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_api import workflow
from bench.bench_e2e import run_direct
from bench.common import (
    add_json_arg,
    cpu_seconds,
    rss_mb,
    server,
    simulator,
    summary_ms,
    write_json,
)
from comfyq.comfy.client import ComfyClient
from comfyq.config import Settings
from comfyq.netguard import redact_url

Job = Callable[[dict[str, Any]], Awaitable[float]]
_colour = itertools.count(1)


def next_workflow() -> dict[str, Any]:
    # A new colour per job (either path), so ComfyUI's cache never skips the work.
    return workflow(next(_colour) % 0xFFFFFF, blur=False)


class ThroughComfyq:
    """The comfyq path of one job, as an HTTP client does it."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=300, sock_read=None),
        )

    async def close(self) -> None:
        await self.session.close()

    async def sse(self, wf: dict[str, Any]) -> float:
        """POST /generate, then GET /jobs/{id}/events until final_result, then the output files."""
        t0 = time.perf_counter()
        async with self.session.post(
            self.base + "/generate", json={"input": {"workflow_json": wf}}
        ) as r:
            if r.status != 202:
                raise RuntimeError(f"POST /generate answered {r.status}: {await r.text()}")
            job_id = (await r.json())["id"]
        result = await self._final(job_id)
        await self._outputs(result)
        return time.perf_counter() - t0

    async def sync(self, wf: dict[str, Any]) -> float:
        """POST /generate/sync (no timeout), then the output files."""
        t0 = time.perf_counter()
        async with self.session.post(
            self.base + "/generate/sync", json={"input": {"workflow_json": wf}}
        ) as r:
            result = await r.json()
        await self._outputs(result)
        return time.perf_counter() - t0

    async def _final(self, job_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/jobs/{job_id}/events") as r:
            async for raw in r.content:
                if raw.startswith(b"data: "):
                    ev = json.loads(raw[6:])
                    if ev.get("status") == "final_result":
                        return dict(ev["result"])
        raise RuntimeError(f"the event stream of {job_id} ended without final_result")

    async def _outputs(self, result: dict[str, Any]) -> None:
        if result.get("status") != "completed":
            raise RuntimeError(f"job ended {result.get('status')}: {result.get('error')}")
        for out in result.get("output") or []:
            async with self.session.get(self.base + out["url"]) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET {out['url']} answered {r.status}")
                await r.read()


async def alternating(paths: dict[str, Job], n: int) -> dict[str, list[float]]:
    """``n`` jobs per path, one at a time, taking the paths in turn: a, b, c, a, b, c..."""
    lat: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(n):
        for name, job in paths.items():
            lat[name].append(await job(next_workflow()))
    return lat


async def burst(job: Job, n: int, in_flight: int) -> tuple[float, list[float]]:
    """``n`` jobs with ``in_flight`` at a time; (seconds for all, each job's latency)."""
    left = iter(range(n))
    lat: list[float] = []

    async def worker() -> None:
        for _ in left:
            lat.append(await job(next_workflow()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - t0, lat


async def throughput(
    paths: dict[str, Job], n: int, levels: list[int], rounds: int = 2
) -> list[dict[str, Any]]:
    """Jobs/s per path at each level; every other round takes the paths in reverse order."""
    rows = []
    for c in levels:
        jobs = max(n, 2 * c)
        spent = dict.fromkeys(paths, 0.0)
        lat: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(rounds):
            order = list(paths.items())
            for name, job in order if r % 2 == 0 else order[::-1]:
                secs, got = await burst(job, jobs, c)
                spent[name] += secs
                lat[name] += got
        row: dict[str, Any] = {"in_flight": c, "jobs": jobs * rounds, "rate": {}, "latency_ms": {}}
        for name, secs in spent.items():
            row["rate"][name] = jobs * rounds / secs
            row["latency_ms"][name] = summary_ms(lat[name])
        rows.append(row)
        print(
            f"    {c:3d} in flight, {jobs * rounds:4d} jobs per path: "
            + "  ".join(f"{name} {rate:6.1f}/s" for name, rate in row["rate"].items())
        )
    return rows


async def side_by_side(
    comfy_url: str, root: Path, latency_jobs: int, throughput_jobs: int, levels: list[int]
) -> dict[str, Any]:
    """Every path against the ComfyUI at ``comfy_url``; comfyq serve runs in a subprocess."""
    (root / "direct").mkdir(parents=True)
    with server(root, comfy_url) as (base, pid):
        client = ComfyClient(comfy_url)
        await client.start()
        cq = ThroughComfyq(base)
        try:
            stats = await client.system_stats()

            async def direct(wf: dict[str, Any]) -> float:
                return await run_direct(client, wf, root / "direct")

            paths: dict[str, Job] = {"direct": direct, "comfyq_sse": cq.sse, "comfyq_sync": cq.sync}
            await alternating(paths, 5)  # warm-up: connections, caches, first-use imports
            cpu0 = cpu_seconds(pid)
            lat = await alternating(paths, latency_jobs)
            cpu_per_job = (cpu_seconds(pid) - cpu0) / (2 * latency_jobs) * 1000
            base_lat = lat["direct"]
            figures: dict[str, Any] = {}
            print(f"  one at a time, paths in turn, {latency_jobs} jobs per path:")
            for name, got in lat.items():
                f = figures[name] = {**summary_ms(got), "samples_ms": [x * 1000 for x in got]}
                line = (
                    f"    {name:12s} p50 {f['p50']:7.2f} ms  p90 {f['p90']:7.2f} ms"
                    f"  p99 {f['p99']:7.2f} ms"
                )
                if name != "direct":
                    f["added"] = summary_ms([y - x for x, y in zip(base_lat, got, strict=True)])
                    f["ratio_p50"] = f["p50"] / figures["direct"]["p50"]
                    line += f"   added p50 {f['added']['p50']:6.2f} ms (x{f['ratio_p50']:.2f})"
                print(line)
            print(f"    comfyq server CPU per job: {cpu_per_job:.1f} ms")
            print("  throughput:")
            rows = await throughput(paths, throughput_jobs, levels)
            return {
                "url": redact_url(comfy_url),
                "latency": figures,
                "throughput": rows,
                "comfyq_cpu_ms_per_job": cpu_per_job,
                "comfyq_rss_mb": rss_mb(pid),
                "comfyui_version": (stats.get("system") or {}).get("comfyui_version"),
                "generation_workers": Settings().generation_workers,
            }
        finally:
            await cq.close()
            await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-jobs", type=int, default=200, help="jobs per path, one at a time")
    ap.add_argument(
        "--throughput-jobs", type=int, default=64, help="jobs per path per round and level"
    )
    ap.add_argument("--levels", default="1,4,16", help="jobs in flight, comma separated")
    ap.add_argument("--real-latency-jobs", type=int, default=100)
    ap.add_argument("--real-throughput-jobs", type=int, default=32)
    add_json_arg(ap)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    real = os.environ.get("COMFYUI_TEST_URL", "")
    out: dict[str, Any] = {
        "args": {
            "latency_jobs": args.latency_jobs,
            "throughput_jobs": args.throughput_jobs,
            "levels": levels,
            "real_latency_jobs": args.real_latency_jobs,
            "real_throughput_jobs": args.real_throughput_jobs,
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench-sbs-") as tmp:
        root = Path(tmp)
        with simulator(root / "sim") as sim:
            print("side by side against the simulator (zero-time nodes):")
            out["simulator"] = asyncio.run(
                side_by_side(sim, root / "a", args.latency_jobs, args.throughput_jobs, levels)
            )
        if real:
            print(f"side by side against the real ComfyUI at {redact_url(real)}:")
            out["real"] = asyncio.run(
                side_by_side(
                    real, root / "b", args.real_latency_jobs, args.real_throughput_jobs, levels
                )
            )
        else:
            out["real"] = {"skipped": "COMFYUI_TEST_URL is not set"}
            print("real ComfyUI: skipped (COMFYUI_TEST_URL is not set)")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
