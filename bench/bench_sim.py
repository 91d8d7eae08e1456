"""What the zero-time ComfyUI simulator itself costs: CPU seconds of the simulator process per
trivial job (EmptyImage 16x16 -> ImageInvert -> SaveImage, a new colour per job so no cache
skips the work), driven straight by comfyq's own ComfyClient (POST /prompt, follow the websocket
to the end, download the image) with a few jobs in flight. This is the part of every
"end to end through the simulator" figure that is not comfyq's.

User and system time are reported apart: the system part is mostly the kernel's (loopback TCP
sends, creating the output file) and moves with the machine, e.g. ext4 without a journal scans
recently deleted inodes on every file creation while other processes churn temporary files.

    .venv/bin/python -m bench.bench_sim [--jobs 400] [--in-flight 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_api import workflow
from bench.bench_e2e import run_direct
from bench.common import SIM_PIDS, add_json_arg, simulator, write_json
from comfyq.comfy.client import ComfyClient


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def sim_cost(url: str, out: Path, jobs: int, in_flight: int) -> dict[str, Any]:
    """Drive ``jobs`` trivial jobs through the simulator at ``url``; its CPU per job."""
    pid = SIM_PIDS[url]
    client = ComfyClient(url)
    await client.start()  # the websocket, as comfyq's pool keeps it
    colours = iter(range(1, jobs + 1))

    async def worker() -> None:
        for c in colours:
            await run_direct(client, workflow(c, blur=False), out)

    try:
        # Warm up (imports, first connections) outside the measured burst.
        for c in range(jobs + 1, jobs + 11):
            await run_direct(client, workflow(c, blur=False), out)
        (user0, sys0), t0 = user_system_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        wall = time.perf_counter() - t0
        user1, sys1 = user_system_seconds(pid)
        user, system = user1 - user0, sys1 - sys0
    finally:
        await client.close()
    return {
        "jobs": jobs,
        "in_flight": in_flight,
        "sim_cpu_ms_per_job": (user + system) / jobs * 1000,
        "sim_user_ms_per_job": user / jobs * 1000,
        "sim_system_ms_per_job": system / jobs * 1000,
        "jobs_per_s": jobs / wall,
    }


async def measure(jobs: int, in_flight: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "out").mkdir()
        with simulator(root) as url:
            return await sim_cost(url, root / "out", jobs, in_flight)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--in-flight", type=int, default=4)
    add_json_arg(ap)
    args = ap.parse_args()
    fig = asyncio.run(measure(args.jobs, args.in_flight))
    print(
        f"simulator: {fig['sim_cpu_ms_per_job']:.2f} ms CPU per trivial job"
        f" ({fig['sim_user_ms_per_job']:.2f} user + {fig['sim_system_ms_per_job']:.2f} system;"
        f" {fig['jobs']} jobs, {fig['in_flight']} in flight, {fig['jobs_per_s']:.0f} jobs/s)"
    )
    write_json(args.json, fig)


if __name__ == "__main__":
    main()
