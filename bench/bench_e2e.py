"""End to end against the simulator with zero-time nodes: jobs/s through comfyq with 1 and 4
backends, and the latency comfyq adds over a direct client of the same simulator (p50, p99).

Each simulator runs in its own process (as ComfyUI would); comfyq runs in this one. Sequential
latency runs alternate comfyq and the direct client job by job so that machine drift cancels.

    .venv/bin/python -m bench.bench_e2e [--jobs 500] [--latency-jobs 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import add_json_arg, free_port, pct, summary_ms, write_json
from comfyq.comfy.client import ComfyClient
from comfyq.config import load_settings
from comfyq.services import Services
from comfyq.store import NewJob
from comfyq.store.model import State


def workflow(i: int) -> dict[str, Any]:
    # Different colour per job so that ComfyUI's cache does not skip the work.
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i % 16777216},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "bench"},
        },
    }


def start_simulators(n: int, root: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, urls = [], []
    for i in range(n):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "comfyq.sim",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(root / f"sim{i}"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        assert line.startswith("SIMULATOR_READY"), line
    return procs, urls


async def run_services(urls: list[str], root: Path) -> Services:
    s = load_settings(
        env={},
        overrides={
            "database": str(root / "q.db"),
            "output_dir": str(root / "out"),
            "cache_dir": str(root / "cache"),
            "max_queue_size": "100000",
            "generation_workers": os.environ.get("BENCH_GEN_WORKERS", "4"),
            "preprocess_workers": "4",
            "postprocess_workers": "4",
            "api_log_level": "warning",
        },
    )
    svc = Services(s, backends=urls)
    await svc.start()
    await svc.pool.wait_ready(10)
    return svc


async def throughput(svc: Services, jobs: int, offset: int) -> float:
    done = asyncio.Event()
    remaining = jobs
    ids = {f"t{offset}-{i}" for i in range(jobs)}

    def on_tr(trs: list[Any]) -> None:
        nonlocal remaining
        for t in trs:
            if t.job_id in ids and t.to_state in ("completed", "failed", "cancelled"):
                remaining -= 1
        if remaining <= 0:
            done.set()

    svc.store.listen(on_tr)
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            svc.store.create(
                NewJob(
                    id=f"t{offset}-{i}",
                    payload={"input": {"workflow_json": workflow(offset + i)}},
                    payload_hash=str(i),
                ),
                1_000_000,
            )
            for i in range(jobs)
        )
    )
    await done.wait()
    elapsed = time.perf_counter() - t0
    failed = sum(
        1 for j in await svc.store.list_jobs(states=[State.FAILED], limit=100000) if j.id in ids
    )
    if failed:
        print(f"    ({failed} failed)")
    return jobs / elapsed


async def one_comfyq(svc: Services, i: int) -> float:
    return await timed_job(svc, f"lat-{i}", {"workflow_json": workflow(10_000_000 + i)})


async def timed_job(svc: Services, job_id: str, input_: dict[str, Any]) -> float:
    """Seconds from admitting one job (straight into the store) to its final event."""
    sub = svc.bus.subscribe(job_id)
    t0 = time.perf_counter()
    await svc.store.create(
        NewJob(id=job_id, payload={"input": input_}, payload_hash=job_id), 1_000_000
    )
    while True:
        ev = await sub.get(30)
        assert ev is not None
        if ev.final:
            break
    sub.close()
    return time.perf_counter() - t0


async def one_direct(client: ComfyClient, i: int, out: Path) -> float:
    return await run_direct(client, workflow(20_000_000 + i), out)


async def run_direct(client: ComfyClient, wf: dict[str, Any], out: Path) -> float:
    """Seconds for one prompt straight to ComfyUI: submit, follow to the end, fetch every image."""
    t0 = time.perf_counter()
    pid = str(uuid.uuid4())
    await client.submit(wf, pid)
    run = await client.follow(pid)
    for node in run.outputs.values():
        for img in node.get("images", []):
            await client.download(
                img["filename"],
                img.get("subfolder", ""),
                img.get("type", "output"),
                out / f"{pid}-{img['filename']}",
            )
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--latency-jobs", type=int, default=200)
    add_json_arg(ap)
    args = ap.parse_args()
    out: dict[str, Any] = {
        "args": {
            "jobs": args.jobs,
            "latency_jobs": args.latency_jobs,
            "generation_workers": int(os.environ.get("BENCH_GEN_WORKERS", "4")),
        },
        "throughput": {},
    }
    print(
        "end-to-end benchmark: simulator with zero-time nodes in separate processes,"
        f" {os.cpu_count()} cores"
    )
    for n in (1, 4):
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            procs, urls = start_simulators(n, root)
            svc = await run_services(urls, root)
            try:
                await throughput(svc, 50, 0)  # warm-up
                rate = await throughput(svc, args.jobs, 1000)
                out["throughput"][str(n)] = rate
                print(f"  {n} backend(s): {rate:7.1f} jobs/s end to end ({args.jobs} jobs)")
                if n == 1:
                    client = ComfyClient(urls[0])
                    await client.start()
                    (root / "direct").mkdir()
                    cq, direct = [], []
                    for i in range(args.latency_jobs):  # alternate, so drift cancels
                        cq.append(await one_comfyq(svc, i))
                        direct.append(await one_direct(client, i, root / "direct"))
                    await client.close()
                    added = [a - b for a, b in zip(cq, direct, strict=True)]
                    print(f"  sequential latency, {args.latency_jobs} jobs each, alternating:")
                    print(
                        f"    direct client : p50 {1000 * pct(direct, 0.5):6.2f} ms"
                        f"  p99 {1000 * pct(direct, 0.99):6.2f} ms"
                    )
                    print(
                        f"    through comfyq: p50 {1000 * pct(cq, 0.5):6.2f} ms"
                        f"  p99 {1000 * pct(cq, 0.99):6.2f} ms"
                    )
                    print(
                        f"    added by comfyq: p50 {statistics.median(added) * 1000:6.2f} ms"
                        f"  p99 {1000 * pct(added, 0.99):6.2f} ms"
                        f"  ratio p50 x{pct(cq, 0.5) / pct(direct, 0.5):.2f}"
                    )
                    out["latency"] = {
                        "direct": summary_ms(direct),
                        "comfyq": summary_ms(cq),
                        "added": summary_ms(added),
                        "direct_ms": [x * 1000 for x in direct],
                        "comfyq_ms": [x * 1000 for x in cq],
                    }
            finally:
                await svc.stop()
                for p in procs:
                    p.kill()
                    p.wait()
    write_json(args.json, out)


if __name__ == "__main__":
    asyncio.run(main())
