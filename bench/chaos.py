"""Chaos run: jobs with S3 uploads and webhooks while comfyq is kill -9-ed and restarted, and the
ComfyUI simulator is kill -9-ed and restarted, at random (seeded) moments; then an account of what
was accepted, what ended how, which webhooks and objects arrived, and how often each workflow was
submitted to ComfyUI compared with the attempts comfyq counted.

Every part is a real process on loopback: ``comfyq serve`` on its own SQLite file, the simulator
(``--prompt-log``: its accepted prompts on file, across crashes), moto's S3 server, and a webhook
receiver that writes every delivery down before answering. Jobs are submitted through the HTTP API
by clients that retry on connection errors and 5xx with the same ``request_id`` (the idempotency
key), so a job is accepted exactly once; a 2xx is the only acceptance.

Chaos events fire at random points of the work (after a random share of the jobs has ended, plus a
random delay), so they land while jobs are in flight whatever the machine's speed. A share of the
comfyq kills (``--startup-kill-share``) come in pairs: the second hits the restarted comfyq before
it answers /health (while it migrates, recovers, reconnects). The receiver answers some posts 503
and takes a moment with each, so webhook posts are in flight (and retried) when comfyq dies.
Optionally some jobs carry a workflow ComfyUI rejects (``--bad-share``) or are cancelled
(``--cancel-share``), so every way a job can end is exercised under the same chaos.

    .venv/bin/python -m bench.chaos [--jobs 200] [--kills 20] [--sim-crashes 5] [--seed 1]
                                    [--node-duration 0.3] [--json PATH] [--keep DIR]

Exit status: 0 when nothing was lost, 1 when a job, a webhook or an S3 object was lost, 2 when the
run could not be carried out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_outputs import start_moto
from bench.chaos_client import BUCKET, World, api_final, counts, finished, submit, wait_all_done
from bench.chaos_procs import Child, ChildDied, http_ready, port_ready, python, tail
from bench.chaos_report import Inputs, account, lost_anything, render
from bench.common import free_port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--kills", type=int, default=20, help="comfyq kill -9 + restart")
    ap.add_argument("--sim-crashes", type=int, default=5, help="simulator kill -9 + restart")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--node-duration",
        type=float,
        default=0.3,
        help="seconds per simulated node (3 nodes a job)",
    )
    ap.add_argument(
        "--submit-every",
        type=float,
        default=0.0,
        help="mean seconds between submissions (0: spread over ~70%% of the expected work)",
    )
    ap.add_argument(
        "--webhook-error-rate",
        type=float,
        default=0.05,
        help="share of webhook posts the receiver answers 503 (they are retried)",
    )
    ap.add_argument(
        "--webhook-delay",
        type=float,
        default=0.3,
        help="the receiver answers after a random 0..this many seconds",
    )
    ap.add_argument(
        "--startup-kill-share",
        type=float,
        default=0.2,
        help="share of the comfyq kills that hit a comfyq still starting (before /health)",
    )
    ap.add_argument(
        "--input-share",
        type=float,
        default=0.5,
        help="share of jobs that start from an input image (base64 in the request)",
    )
    ap.add_argument(
        "--sim-freezes",
        type=int,
        default=0,
        help="simulator SIGSTOP-ed (hung, connections open) for 2..--freeze-max s, then SIGCONT",
    )
    ap.add_argument("--freeze-max", type=float, default=40.0)
    ap.add_argument(
        "--bad-share",
        type=float,
        default=0.0,
        help="share of jobs whose workflow ComfyUI rejects (they must fail, once, with a webhook)",
    )
    ap.add_argument(
        "--cancel-share",
        type=float,
        default=0.0,
        help="share of jobs cancelled (DELETE /jobs/{id}) 0-5 s after acceptance",
    )
    ap.add_argument(
        "--final-timeout",
        type=float,
        default=900.0,
        help="cap on the wait for every job (and webhook) to finish after the chaos",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    ap.add_argument(
        "--keep", type=Path, default=None, help="run in this folder and keep it (logs, db)"
    )
    return ap.parse_args(argv)


# --- chaos --------------------------------------------------------------------------------------


async def chaos(w: World, rng: random.Random) -> None:
    """Fire the kills and crashes, each once a random share of the jobs has ended (and a delay)."""
    twice = (
        int(w.args.kills * w.args.startup_kill_share) // 2
    )  # events of two kills, the second mid-start
    kinds = (
        ["comfyq-twice"] * twice
        + ["comfyq"] * (w.args.kills - 2 * twice)
        + ["sim"] * w.args.sim_crashes
        + ["freeze"] * w.args.sim_freezes
    )
    rng.shuffle(kinds)
    marks = sorted(rng.uniform(0.0, 0.9) for _ in kinds)
    for kind, mark in zip(kinds, marks, strict=True):
        last = time.monotonic()
        while True:  # a stall (a bug) must not stop the chaos: go on after 30 s regardless
            c = await counts(w)
            busy = any(":" in k for k in c)  # jobs pending or running: something to interrupt
            drained = (
                not busy and not c.get("webhooks_due") and w.outstanding == 0
            )  # nothing will come
            if (
                (busy and finished(c) >= mark * w.args.jobs)
                or drained
                or time.monotonic() - last > 30
            ):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(rng.uniform(0.0, 2.0))
        before = await counts(w)
        busy_now = any(":" in k for k in before) or bool(before.get("webhooks_due"))
        if kind.startswith("comfyq"):
            await w.comfyq.kill9()
            event = {"t": w.now(), "kind": "comfyq kill -9", "jobs": before, "busy": busy_now}
            if (
                kind == "comfyq-twice"
            ):  # restart, and kill that one too before (or just as) it is ready
                w.comfyq.spawn()
                usual = statistics.median(w.restarts) if w.restarts else 0.6  # spawn to /health
                await asyncio.sleep(rng.uniform(0.05, 0.95 * usual))
                alive, answered = w.comfyq.alive, await w.comfyq.ready()
                if not alive:  # it died on its own while starting: a crash on restart
                    w.comfyq.failed_starts.append(
                        f"exited by itself while starting\n{tail(w.comfyq.log)}"
                    )
                await w.comfyq.kill9()
                w.timeline.append(event)
                _show(event)
                event = {
                    "t": w.now(),
                    "kind": "comfyq kill -9",
                    "jobs": await counts(w),
                    "busy": True,
                    "during_start": not answered,
                    "died_by_itself": not alive,
                }
            took = await w.comfyq.start()
            w.restarts.append(took)
            event["restart_s"] = round(took, 2)
        elif kind == "freeze":
            w.sim.freeze(True)
            down = rng.uniform(2.0, w.args.freeze_max)
            event = {
                "t": w.now(),
                "kind": "simulator SIGSTOP",
                "jobs": before,
                "busy": busy_now,
                "down_s": round(down, 2),
            }
            await asyncio.sleep(down)
            w.sim.freeze(False)
        else:
            await w.sim.kill9()
            down = rng.uniform(0.3, 3.0)
            event = {
                "t": w.now(),
                "kind": "simulator kill -9",
                "jobs": before,
                "busy": busy_now,
                "down_s": round(down, 2),
            }
            await asyncio.sleep(down)
            await w.sim.start()
        w.timeline.append(event)
        _show(event)


def _show(event: dict[str, Any]) -> None:
    jobs = {k: v for k, v in event["jobs"].items() if ":" in k or (k == "webhooks_due" and v)}
    note = " (comfyq still starting)" if event.get("during_start") else ""
    print(f"  {event['t']:6.1f}s  {event['kind']:18s} in flight: {jobs}{note}", flush=True)


# --- the run ------------------------------------------------------------------------------------


def comfyq_env(root: Path, sim_url: str, port: int) -> dict[str, str]:
    """Settings of the comfyq under test: defaults, but quick to notice a simulator back."""
    return {
        "COMFYQ_CONFIG": str(root / "none.toml"),
        "COMFYQ_DATABASE": str(root / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(root / "out"),
        "COMFYQ_CACHE_DIR": str(root / "cache"),
        "COMFYUI_API_BASE": sim_url,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "COMFYQ_URL_ALLOWLIST": "127.0.0.1",  # the receiver and moto live on loopback
        "COMFYQ_BACKEND_PROBE_INTERVAL": "0.5",
        "COMFYQ_RETRY_BASE_DELAY": "1.0",
        "COMFYQ_WEBHOOK_RETRY_BASE_DELAY": "1.0",
        "COMFYQ_SHUTDOWN_GRACE": "10",
        "API_LOG_LEVEL": "info",
    }


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    t_start = time.time()
    rng = random.Random(args.seed)
    moto, s3_url = await asyncio.to_thread(start_moto)
    secret = "whsec_" + base64.b64encode(rng.randbytes(24)).decode()
    api_port, sim_port, hook_port = free_port(), free_port(), free_port()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
        sim_url = f"http://127.0.0.1:{sim_port}"
        sim = Child(
            "simulator",
            python(
                "-m",
                "comfyq.sim",
                "--port",
                str(sim_port),
                "--data-dir",
                str(root / "sim"),
                "--node-duration",
                str(args.node_duration),
                "--prompt-log",
                str(root / "prompts.jsonl"),
            ),
            root / "simulator.log",
            http_ready(http, sim_url + "/system_stats"),
        )
        receiver = Child(
            "receiver",
            python(
                "-m",
                "bench.chaos_receiver",
                "--port",
                str(hook_port),
                "--log",
                str(root / "webhooks.jsonl"),
                "--secret",
                secret,
                "--error-rate",
                str(args.webhook_error_rate),
                "--delay",
                str(args.webhook_delay),
                "--seed",
                str(args.seed),
            ),
            root / "receiver.log",
            port_ready(hook_port),
        )
        comfyq = Child(
            "comfyq",
            python("-m", "comfyq", "serve"),
            root / "comfyq.log",
            http_ready(http, f"http://127.0.0.1:{api_port}/health"),
            env=comfyq_env(root, sim_url, api_port),
            cwd=root,
        )
        w = World(
            root,
            args,
            f"http://127.0.0.1:{api_port}",
            comfyq,
            sim,
            receiver,
            f"http://127.0.0.1:{hook_port}/hook",
            s3_url,
            secret,
        )
        try:
            await asyncio.gather(sim.start(), receiver.start())
            await comfyq.start()
            w.t0, t0_abs = time.monotonic(), time.time()
            every = args.submit_every or 0.7 * 3 * args.node_duration
            arrivals, t = [], 0.0
            for n in range(args.jobs):
                t += rng.expovariate(1.0 / every)
                arrivals.append(t)
                w.plan[f"chaos-{args.seed}-{n:04d}"] = {
                    "bad": rng.random() < args.bad_share,
                    "input": rng.random() < args.input_share,
                    "cancel_after": rng.uniform(0.0, 5.0)
                    if rng.random() < args.cancel_share
                    else None,
                }
            print(
                f"chaos run in {root}: {args.jobs} jobs over ~{arrivals[-1]:.0f} s,"
                f" {args.kills} comfyq kills,"
                f" {args.sim_crashes} simulator crashes, seed {args.seed}",
                flush=True,
            )
            w.outstanding = args.jobs
            submitters = asyncio.gather(*(submit(w, http, n, at) for n, at in enumerate(arrivals)))
            await chaos(w, random.Random(rng.random()))
            await submitters
            print(
                f"  {w.now():6.1f}s  chaos over; waiting for every job and webhook to finish",
                flush=True,
            )
            left = await wait_all_done(w)
            print(f"  {w.now():6.1f}s  {left}", flush=True)
            final = await api_final(w, http)
            exit_code = await comfyq.stop()
            sim_exit = await sim.stop()
            await receiver.stop()
            inputs = Inputs(
                args.jobs,
                dict(w.accepted),
                dict(w.rejected),
                final,
                s3_url,
                BUCKET,
                w.timeline,
                dict(w.stats),
                time.time() - t_start,
                extra={
                    "seed": args.seed,
                    "t0_abs": t0_abs,
                    "comfyq_exit_code": exit_code,
                    "simulator_exit_code": sim_exit,
                    "comfyq_failed_starts": len(comfyq.failed_starts),
                    "comfyq_failed_start_logs": comfyq.failed_starts,
                    "restart_median_s": statistics.median(w.restarts) if w.restarts else 0.0,
                    "node_duration": args.node_duration,
                    "timeline": w.timeline,
                    "webhook_error_rate": args.webhook_error_rate,
                    "webhook_delay": args.webhook_delay,
                    "plan": w.plan,
                    "cancels": w.cancels,
                    "workdir": str(root),
                },
            )
            return await asyncio.to_thread(
                account, w.db, root / "webhooks.jsonl", root / "prompts.jsonl", inputs
            )
        finally:
            for child in (comfyq, sim, receiver):
                if child.alive:
                    await child.kill9()
            moto.kill()
            moto.wait()


def main(argv: list[str] | None = None) -> int:
    """Run, print the report, write --json; the exit status says whether anything was lost."""
    args = parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="comfyq-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        report = asyncio.run(run(args, root))
    except ChildDied as exc:
        print(f"chaos run failed: {exc}\n{tail(root / 'comfyq.log')}", file=sys.stderr)
        return 2
    print()
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    lost = lost_anything(report)
    if args.keep is None and not lost:
        shutil.rmtree(root, ignore_errors=True)
    elif args.keep is None:
        print(f"(kept {root} for inspection)")
    return 1 if lost else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
