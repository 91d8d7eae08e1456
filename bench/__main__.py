"""``python -m bench``: run every benchmark, each in a subprocess of its own (clean RSS figures),
collect their ``--json`` figures into one results file, and render BENCHMARKS.md from it.

    .venv/bin/python -m bench [--quick] [--only a,b] [--skip a,b] [--out BENCHMARKS.md]
    .venv/bin/python -m bench --render-only bench/results/latest.json

Steps: store, e2e, api, preprocess, outputs, sidebyside, v2, chaos (when bench/chaos.py exists),
hostile, scaling, sim, floor, pgstore, cluster, chaos_cluster;
profile with --profile (CPU per job by layer, call tree in bench/results/profile.{html,txt}).
With COMFYUI_TEST_URL set, the side-by-side run also measures that real ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
CHARTS = ROOT / "bench" / "charts"


@dataclass(frozen=True)
class Step:
    """One benchmark module and its arguments in the default and in the --quick run."""

    name: str
    module: str
    full: list[str]
    quick: list[str]
    title: str
    needs: str | None = None  # a file that must exist for the step to run (written by someone else)
    opt_in: bool = False  # runs only when asked for (--profile, or --only NAME)


STEPS = [
    Step(
        "store",
        "bench.bench_store",
        ["--jobs", "4000", "--big", "1000000"],
        ["--jobs", "300", "--big", "50000", "--samples", "300"],
        "store alone (#2)",
    ),
    Step(
        "e2e",
        "bench.bench_e2e",
        ["--jobs", "500", "--latency-jobs", "200"],
        ["--jobs", "100", "--latency-jobs", "30"],
        "end to end, in-process client (#3)",
    ),
    Step(
        "api",
        "bench.bench_api",
        ["--admissions", "20000", "--subscribers", "1000", "--jobs", "20"],
        ["--admissions", "2000", "--subscribers", "200", "--jobs", "10"],
        "HTTP API (#4)",
    ),
    Step(
        "preprocess",
        "bench.bench_preprocess",
        ["--jobs", "2000", "--big-mib", "1024"],
        ["--jobs", "200", "--big-mib", "64"],
        "preprocess and inputs (#5)",
    ),
    Step(
        "outputs",
        "bench.bench_outputs",
        ["--size-mb", "500", "--deliveries", "2000", "--jobs", "60"],
        ["--size-mb", "50", "--deliveries", "200", "--jobs", "10"],
        "outputs, S3, webhooks (#6)",
    ),
    Step(
        "sidebyside",
        "bench.bench_sidebyside",
        ["--latency-jobs", "200", "--throughput-jobs", "64"],
        [
            "--latency-jobs",
            "30",
            "--throughput-jobs",
            "16",
            "--real-latency-jobs",
            "10",
            "--real-throughput-jobs",
            "8",
        ],
        "side by side over HTTP (#7)",
    ),
    Step(
        "v2",
        "bench.bench_v2",
        ["--latency-jobs", "100", "--throughput-jobs", "64", "--streams", "100"],
        ["--latency-jobs", "20", "--throughput-jobs", "16", "--streams", "100"],
        "Comfy API v2: direct vs the official proxy vs comfyq (#18)",
    ),
    Step(
        "ui",
        "bench.bench_ui",
        ["--jobs", "200", "--big", "100000", "--rate", "50", "--seconds", "20"],
        ["--jobs", "40", "--big", "20000", "--seconds", "4", "--rounds", "1", "--emulated", "5"],
        "dashboard (#14)",
    ),
    Step(
        "chaos",
        "bench.chaos",
        [],
        ["--jobs", "30", "--kills", "3", "--sim-crashes", "1"],
        "chaos run (#7)",
        needs="bench/chaos.py",
    ),
    Step(
        "hostile",
        "bench.bench_hostile",
        ["--bodies", "10"],
        ["--bodies", "10"],  # the figure is RSS after 10 bodies; about a minute
        "hostile bodies: loop lag, /health and RSS under the largest allowed bodies (#19)",
    ),
    Step(
        "profile",
        "bench.bench_profile",
        ["--jobs", "600"],
        ["--jobs", "150", "--warmup", "20"],
        "where the CPU of a job goes, profiled (#13)",
        opt_in=True,
    ),
    Step(
        "queue_depth",
        "bench.bench_queue_depth",
        ["--depths", "0,1000,10000,50000", "--samples", "200"],
        ["--depths", "0,1000,5000", "--samples", "40"],
        "answers with a deep queue: the MAX_QUEUE_SIZE default (#13)",
    ),
    Step(
        "scaling",
        "bench.bench_scaling",
        [],
        ["--quick"],
        "how the cost per job grows: database size, jobs in flight, SSE subscribers (#13)",
    ),
    Step(
        "sim",
        "bench.bench_sim",
        ["--jobs", "3000"],
        ["--jobs", "1500"],  # CPU read from /proc in 10 ms ticks: 200 jobs were mostly noise
        "the ComfyUI simulator's own CPU per trivial job (#13)",
    ),
    Step(
        "floor",
        "bench.bench_floor",
        ["--jobs", "500", "--rounds", "3"],
        ["--jobs", "200", "--rounds", "2"],
        "comfyq's CPU per job next to the same exchanges in bare aiohttp (#13)",
    ),
]
STEPS += [
    Step(
        "pgstore",
        "bench.bench_pgstore",
        ["--jobs", "4000", "--big", "1000000"],
        ["--jobs", "400", "--big", "50000", "--samples", "200", "--instances", "1,2"],
        "PostgreSQL store alone (#12)",
    ),
    Step(
        "cluster",
        "bench.bench_cluster",
        ["--jobs", "600", "--event-jobs", "200"],
        ["--jobs", "100", "--event-jobs", "40", "--instances", "1,2"],
        "several instances end to end (#12)",
    ),
    Step(
        "chaos_cluster",
        "bench.chaos_cluster",
        [],
        # --timeout bounds each of the two waits at the end (streams, then jobs and webhooks),
        # so that a run that loses something reports it within the 240 s step limit.
        ["--jobs", "60", "--kills", "3", "--timeout", "60"],
        "multi-instance chaos (#12)",
    ),
]
NAMES = [s.name for s in STEPS]


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(NAMES)}"
        )
    return names


def run_step(
    step: Step, quick: bool, work: Path, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    """Run one benchmark in a subprocess, echoing its output; its figures, status and output."""
    out_json = work / f"{step.name}.json"
    argv = [
        sys.executable,
        "-m",
        step.module,
        *(step.quick if quick else step.full),
        "--json",
        str(out_json),
    ]
    shown = "python -m " + " ".join(shlex.quote(a) for a in argv[2:-2])
    print(f"\n=== {step.name}: {shown}", flush=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    watchdog = threading.Timer(timeout, proc.kill)  # a step that hangs silently still ends
    watchdog.start()
    try:
        for line in proc.stdout:
            print(f"  {line}", end="", flush=True)
            lines.append(line)
        code = proc.wait()
    finally:
        watchdog.cancel()
    timed_out = time.perf_counter() - t0 >= timeout and code < 0
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "command": shown,
        "exit_code": code,
        "duration_s": elapsed,
        "output": "".join(lines)[-20_000:],
        "title": step.title,
    }
    figures = json.loads(out_json.read_text()) if out_json.exists() else None
    if figures is not None:
        result["figures"] = figures
    if timed_out:
        result.update(status="failed", reason=f"killed after the {timeout:.0f} s step timeout")
    elif figures is None:
        result.update(status="failed", reason=f"exit code {code}, no figures written")
    elif code != 0:
        # e.g. the chaos run exits 1 when it lost something: its figures say what, so keep them.
        result.update(status="ok", reason=f"exit code {code}")
    else:
        result["status"] = "ok"
    print(f"=== {step.name}: {result['status']} in {elapsed:.0f} s", flush=True)
    return result


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected steps in order; the results document (JSON-ready)."""
    chosen = args.only or NAMES
    data_dir = Path(args.tmp or tempfile.gettempdir())
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(data_dir),
        "BENCH_TMP": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if args.quick else "full",
        "command": args.command_line,
        "started": started.isoformat(timespec="seconds"),
        "machine": machine.describe(data_dir, ROOT),
        "comfyui_test_url": bool(os.environ.get("COMFYUI_TEST_URL")),
        "steps": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-run-", dir=data_dir) as work:
        for step in STEPS:
            if step.opt_in and not (args.profile or step.name in (args.only or [])):
                results["steps"][step.name] = {
                    "status": "skipped",
                    "reason": "opt-in: --profile",
                    "title": step.title,
                }
                continue
            if step.name not in chosen or step.name in (args.skip or []):
                why = "--skip" if step.name in (args.skip or []) else "--only"
                results["steps"][step.name] = {
                    "status": "skipped",
                    "reason": f"not selected ({why})",
                    "title": step.title,
                }
                continue
            if step.needs and not (ROOT / step.needs).exists():
                results["steps"][step.name] = {
                    "status": "skipped",
                    "title": step.title,
                    "reason": f"{step.needs} does not exist in this checkout",
                }
                print(f"\n=== {step.name}: skipped ({step.needs} does not exist)")
                continue
            results["steps"][step.name] = run_step(
                step, args.quick, Path(work), args.step_timeout, env
            )
    results["duration_s"] = time.perf_counter() - t0
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="small sizes: checks the plumbing in a minute or two"
    )
    ap.add_argument("--only", type=_names, help=f"comma-separated steps to run ({','.join(NAMES)})")
    ap.add_argument("--skip", type=_names, help="comma-separated steps not to run")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile comfyq's server for a burst of trivial jobs (pyinstrument, strace): "
        "CPU per job by layer, socket sends and fsyncs per job, call tree in bench/results/",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="the Markdown report")
    ap.add_argument(
        "--results", type=Path, default=RESULTS, help="where the raw JSON of the run goes"
    )
    ap.add_argument("--charts", type=Path, default=CHARTS, help="folder for the PNG charts")
    ap.add_argument(
        "--tmp",
        help="folder for the benchmarks' databases and files (default: the system temp dir)",
    )
    ap.add_argument(
        "--step-timeout", type=float, default=1800, help="seconds before a step is killed"
    )
    ap.add_argument(
        "--render-only",
        type=Path,
        metavar="RESULTS_JSON",
        help="re-render the report from a results file without running anything",
    )
    args = ap.parse_args(argv)
    args.command_line = "python -m bench" + "".join(
        f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])
    )
    if args.render_only:
        results = json.loads(args.render_only.read_text())
    else:
        results = run_all(args)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
        print(f"\nraw figures: {args.results}")
    report.render(
        results, args.out, args.charts, args.results if not args.render_only else args.render_only
    )
    print(f"report: {args.out}  (charts in {args.charts})")
    failed = [n for n, s in results["steps"].items() if s["status"] == "failed"]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and not args.render_only else 0


if __name__ == "__main__":
    sys.exit(main())
