"""comfyq's CPU per job next to its floor: the same exchanges in bare aiohttp.

A trivial job through comfyq's ``POST /generate`` + SSE path is six HTTP exchanges and a dozen
websocket messages: three requests from the client (``POST /generate``, the SSE stream,
``GET /outputs``) and, towards ComfyUI, ``POST /prompt``, the prompt's messages and
``GET /view``. ``bench.floor_server`` makes exactly those exchanges with nothing else (no
queue, database, validation, logs or metrics). Both servers run in their own process in front
of one simulator and are driven by the same client (bench_sidebyside's), rounds alternating;
each one's CPU per job comes from /proc. The floor is what issue 13's "CPU per trivial job"
cannot go below without fewer exchanges or another HTTP stack; comfyq's figure over it is what
the queue, durability and the rest cost.

    .venv/bin/python -m bench.bench_floor [--jobs 300] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench.bench_sidebyside import ThroughComfyq, burst
from bench.common import (
    add_json_arg,
    cpu_seconds,
    free_port,
    http_process,
    server,
    simulator,
    write_json,
)
from comfyq.store.sqlite.writer import WRITER_THREAD


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU clock ticks so far of a process's threads: the event loop's (the main thread), the
    SQLite writer's (by its kernel name), and every other thread's together."""
    out = {"loop": 0, "writer": 0, "other": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        key = "loop" if int(tid) == pid else "writer" if name == WRITER_THREAD else "other"
        out[key] += ticks
    return out


def floor_server(comfy_url: str) -> AbstractContextManager[tuple[str, int]]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.floor_server", "--port", str(port), "--comfyui", comfy_url]
    return http_process(cmd, port, "/queue-info")


async def measure(jobs: int, rounds: int, in_flight: int, root: Path) -> dict[str, Any]:
    (root / "comfyq").mkdir(parents=True, exist_ok=True)
    with (
        simulator(root) as comfy,
        floor_server(comfy) as (floor_url, floor_pid),
        server(root / "comfyq", comfy) as (comfyq_url, comfyq_pid),
    ):
        servers = {"floor": (floor_url, floor_pid), "comfyq": (comfyq_url, comfyq_pid)}
        clients = {name: ThroughComfyq(url) for name, (url, _) in servers.items()}
        cpu = dict.fromkeys(servers, 0.0)
        split = {"loop": 0, "writer": 0, "other": 0}
        wall = dict.fromkeys(servers, 0.0)
        done = dict.fromkeys(servers, 0)
        try:
            for name in servers:  # warm-up: connections, first-use imports
                await burst(clients[name].sse, 20, 4)
            for r in range(rounds):
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                for name in order:
                    pid = servers[name][1]
                    c0, t0, th0 = cpu_seconds(pid), time.perf_counter(), thread_ticks(pid)
                    await burst(clients[name].sse, jobs, in_flight)
                    cpu[name] += cpu_seconds(pid) - c0
                    if name == "comfyq":
                        th1 = thread_ticks(pid)
                        for key in split:
                            split[key] += th1[key] - th0[key]
                    wall[name] += time.perf_counter() - t0
                    done[name] += jobs
        finally:
            for c in clients.values():
                await c.close()
    out: dict[str, Any] = {"jobs_per_server": jobs * rounds, "in_flight": in_flight}
    for name in servers:
        out[f"{name}_cpu_ms_per_job"] = cpu[name] / done[name] * 1000
        out[f"{name}_jobs_per_s"] = done[name] / wall[name]
    tick = os.sysconf("SC_CLK_TCK")
    for key, ticks in split.items():
        out[f"comfyq_{key}_thread_ms_per_job"] = ticks / tick / done["comfyq"] * 1000
    out["cpu_ratio"] = out["comfyq_cpu_ms_per_job"] / out["floor_cpu_ms_per_job"]
    out["above_floor_ms"] = out["comfyq_cpu_ms_per_job"] - out["floor_cpu_ms_per_job"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=300, help="jobs per server and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-flight", type=int, default=16)
    add_json_arg(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="comfyq-floor-") as tmp:
        f = asyncio.run(measure(args.jobs, args.rounds, args.in_flight, Path(tmp)))
    print(
        f"floor (bare aiohttp, same exchanges): {f['floor_cpu_ms_per_job']:.2f} ms CPU per job,"
        f" {f['floor_jobs_per_s']:.0f} jobs/s; comfyq: {f['comfyq_cpu_ms_per_job']:.2f} ms,"
        f" {f['comfyq_jobs_per_s']:.0f} jobs/s; comfyq = x{f['cpu_ratio']:.2f} the floor"
        f" (+{f['above_floor_ms']:.2f} ms); {f['jobs_per_server']} jobs each,"
        f" {f['in_flight']} in flight"
    )
    print(
        f"comfyq by thread: event loop {f['comfyq_loop_thread_ms_per_job']:.2f} ms,"
        f" SQLite writer {f['comfyq_writer_thread_ms_per_job']:.2f} ms,"
        f" other threads (file and read hops) {f['comfyq_other_thread_ms_per_job']:.2f} ms"
    )
    write_json(args.json, f)


if __name__ == "__main__":
    main()
