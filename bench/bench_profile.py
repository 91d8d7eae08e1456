"""``python -m bench --profile``: where comfyq's CPU goes for a burst of trivial jobs over HTTP.

One ``comfyq serve`` (default settings, SQLite) in front of the zero-time simulator, run under
pyinstrument (bench/profiled_serve.py). After a warm-up, a burst of trivial jobs (POST /generate,
the job's SSE stream to final_result, the output downloaded; ``--in-flight`` at a time) runs while
the profiler samples the event-loop thread and ``strace -c`` counts the server's system calls.

It prints and writes (``--json``): server CPU ms per job (event-loop thread and other threads:
the SQLite writer, file hops), the loop thread's time split by layer (HTTP parsing and middleware,
admission, store, stage runner, ComfyUI client and feed, events/SSE, result building, output
fetch...), socket sends and fsyncs (≈ commits) per job; and leaves the call tree in
``bench/results/profile.{html,txt}``.

    .venv/bin/python -m bench.bench_profile [--jobs 400] [--in-flight 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_sidebyside import ThroughComfyq, burst
from bench.common import SIM_PIDS, add_json_arg, cpu_seconds, server, simulator, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SENDS = ("sendto", "sendmsg", "write", "writev")
SYNCS = ("fsync", "fdatasync")


def thread_cpu(pid: int) -> tuple[float, float]:
    """(event-loop thread, all other threads) CPU seconds of process ``pid`` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if task.name == str(pid):
            main += cpu
        else:
            other += cpu
    return main, other


def machine_free(text: str, tmp: Path) -> str:
    """The call tree without this machine's paths (checkout, venv, interpreter, temp folder)."""
    for path, name in (
        (str(ROOT) + "/", ""),
        (str(ROOT), "."),
        (sys.prefix, "<venv>"),
        (sys.base_prefix, "<python>"),
        (str(tmp), "<tmp>"),
    ):
        text = text.replace(path, name)
    return text


def parse_strace(text: str) -> dict[str, int]:
    """Calls per syscall from ``strace -c`` output."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


async def run(jobs: int, in_flight: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="comfyq-profile-") as tmp:
        root = Path(tmp)
        prefix = root / "profile"
        with (
            simulator(root) as sim,
            server(
                root,
                sim,
                argv=[sys.executable, "-m", "bench.profiled_serve"],
                COMFYQ_PROFILE_OUT=str(prefix),
                PYTHONPATH=str(ROOT),
            ) as (url, pid),
        ):
            client = ThroughComfyq(url)
            try:
                await burst(client.sse, warmup, min(in_flight, warmup))
                # Burst 1, profiled: CPU per job and the loop thread's split by layer.
                os.kill(pid, signal.SIGUSR1)
                main0, other0 = thread_cpu(pid)
                sim0 = cpu_seconds(SIM_PIDS[sim])
                wall, _ = await burst(client.sse, jobs, in_flight)
                main1, other1 = thread_cpu(pid)
                sim_ms = (cpu_seconds(SIM_PIDS[sim]) - sim0) * 1000 / jobs
                os.kill(pid, signal.SIGUSR2)
                for _ in range(100):  # the launcher writes its files on SIGUSR2
                    if prefix.with_suffix(".layers.json").exists():
                        break
                    await asyncio.sleep(0.1)
                # Burst 2, traced (strace slows the server a lot, so never during burst 1).
                trace_out = root / "strace.txt"
                traced = 0
                if shutil.which("strace"):
                    strace = await asyncio.create_subprocess_exec(
                        *["strace", "-c", "-f", "-o", str(trace_out), "-p", str(pid)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    await asyncio.sleep(0.5)  # attached to every thread before the burst
                    traced = max(20, jobs // 4)
                    await burst(client.sse, traced, in_flight)
                    strace.send_signal(signal.SIGINT)
                    await asyncio.wait_for(strace.wait(), 30)
            finally:
                await client.close()
        log = (root / "server.log").read_text(errors="replace")
        if not prefix.with_suffix(".layers.json").exists():
            raise SystemExit("the profiler wrote nothing; server log:\n" + log[-3000:])
        sys_calls = parse_strace(trace_out.read_text()) if trace_out.exists() else {}
        prof = json.loads(prefix.with_suffix(".layers.json").read_text())
        RESULTS.mkdir(parents=True, exist_ok=True)
        for ext in (".html", ".txt"):
            text = prefix.with_suffix(ext).read_text()
            (RESULTS / f"profile{ext}").write_text(machine_free(text, root))
    loop_ms = (main1 - main0) * 1000 / jobs
    other_ms = (other1 - other0) * 1000 / jobs
    sampled = sum(prof["layers_s"].values()) or 1.0
    layers = {
        name: round(loop_ms * s / sampled, 3)
        for name, s in sorted(prof["layers_s"].items(), key=lambda kv: -kv[1])
    }
    figures: dict[str, Any] = {
        "jobs": jobs,
        "in_flight": in_flight,
        "jobs_per_s": round(jobs / wall, 1),
        "cpu_ms_per_job": round(loop_ms + other_ms, 3),
        "loop_thread_cpu_ms_per_job": round(loop_ms, 3),
        "other_threads_cpu_ms_per_job": round(other_ms, 3),
        "loop_ms_per_job_by_layer": layers,
        # The simulator's own CPU per job in the same burst (not profiled): what of the
        # end-to-end figures is not comfyq's.
        "simulator_cpu_ms_per_job": round(sim_ms, 3),
        "note": "profiler overhead included: CPU figures run ~1.3-2x the unprofiled ones; "
        "the split between layers is what to read",
    }
    if sys_calls and traced:
        n = traced or 1
        figures["traced_jobs"] = traced
        figures["socket_sends_per_job"] = round(sum(sys_calls.get(s, 0) for s in SENDS) / n, 2)
        figures["fsyncs_per_job"] = round(sum(sys_calls.get(s, 0) for s in SYNCS) / n, 2)
        figures["syscalls_per_job"] = round(sum(sys_calls.values()) / n, 1)
        top = sorted(sys_calls.items(), key=lambda kv: -kv[1])[:8]
        figures["top_syscalls_per_job"] = {name: round(c / n, 1) for name, c in top}
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=40)
    add_json_arg(ap)
    args = ap.parse_args()
    t0 = time.perf_counter()
    figures = asyncio.run(run(args.jobs, args.in_flight, args.warmup))
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures, indent=1))
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
