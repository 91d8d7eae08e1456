"""Multi-instance chaos: 3 ``comfyq serve`` processes on one PostgreSQL database, 2 simulators
(one instance on each, the third sharing both), jobs with webhooks submitted through random
instances, rounds of ``kill -9`` of a random instance (started again after a pause), and the
database itself restarted mid-run; then an account of what ended how.

Every part is a real process: a PostgreSQL cluster of its own (``initdb`` into a temporary folder,
when the server binaries are installed, so that it can be stopped and started; otherwise a fresh
database on the shared server and no database restart), the simulators, the webhook receiver of
bench/chaos_receiver.py. Each job has an SSE follower on an instance other than the one that
admitted it; a follower whose instance dies resumes on another with Last-Event-ID.

Checks: every accepted job reaches exactly one terminal state (one terminal event row), attempts
never exceed max_attempts, every job's webhook reached the receiver with a 2xx (retries and
duplicates carry the same webhook-id), every follower saw the final result.

    .venv/bin/python -m bench.chaos_cluster [--jobs 300] [--kills 10] [--seed 1] [--json PATH]

Exit status: 0 when nothing was lost, 1 when something was, 2 when the run could not be done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench.common import free_port, write_json

# The harness is test code (tests/support), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.cluster_harness import Cluster, OwnPostgres, create_database, drop_database

SECRET = "whsec_" + "Y2hhb3MtY2x1c3Rlci1zZWNyZXQtMDEyMzQ1"


def workflow(i: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": (i * 7919) % 16777216},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}},
    }


class Run:
    def __init__(self, cluster: Cluster, hook_url: str, rng: random.Random) -> None:
        self.c = cluster
        self.hook_url = hook_url
        self.rng = rng
        self.accepted: dict[str, str] = {}  # job id -> instance that admitted it
        self.admitted_at: dict[str, float] = {}
        self.kill_times: dict[str, list[float]] = {}  # instance -> when it was killed
        self.finals: dict[str, str] = {}  # job id -> instance whose stream gave the final result
        self.unbroken: set[str] = set()  # jobs whose first stream saw the end
        self.resumes = 0
        self.following: dict[str, str] = {}  # job id -> instance its stream is open on
        self.admission_retries = 0
        self.killed_admitters: set[str] = set()

    def alive(self) -> list[str]:
        return [n for n, p in self.c.instances.items() if p.alive and p.url]

    async def submit(self, http: aiohttp.ClientSession, i: int) -> str:
        rid = f"chaos-{i:05d}"
        body = {
            "input": {
                "request_id": rid,
                "workflow_json": workflow(i),
                "webhook": {"url": self.hook_url, "secret": SECRET, "extra_params": {"i": i}},
            }
        }
        while True:
            names = self.alive()
            if not names:
                await asyncio.sleep(0.1)
                continue
            name = self.rng.choice(names)
            try:
                async with http.post(f"{self.c.instances[name].url}/generate", json=body) as r:
                    if r.status in (200, 202):
                        job_id = str((await r.json())["id"])
                        self.accepted.setdefault(job_id, name)
                        self.admitted_at.setdefault(job_id, time.monotonic())
                        return job_id
                    if r.status < 500:
                        raise RuntimeError(f"admission refused {r.status}: {await r.text()}")
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.admission_retries += 1  # the same request_id again: admitted once at most
            await asyncio.sleep(0.2)

    async def follow(self, http: aiohttp.ClientSession, job_id: str) -> None:
        last: str | None = None
        first = True
        while True:
            names = [n for n in self.alive() if n != self.accepted.get(job_id)] or self.alive()
            if not names:
                await asyncio.sleep(0.1)
                continue
            name = self.rng.choice(names)
            where = f"{name} after {last}"
            self.following[job_id] = f"{where}: requesting"
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with http.get(
                    f"{self.c.instances[name].url}/jobs/{job_id}/events",
                    headers=headers,
                    trace_request_ctx={"job_id": job_id, "where": where},
                ) as r:
                    self.following[job_id] = f"{where}: answered {r.status}, reading"
                    if r.status == 204:  # nothing after last: it had already ended
                        self.finals[job_id] = name
                        return
                    async for line in r.content:
                        if line.startswith(b"id: "):
                            last = line[4:].strip().decode()
                        if line.startswith(b"data: "):
                            ev = json.loads(line[6:])
                            if ev["event"] == "final_result":
                                self.finals[job_id] = name
                                if first:
                                    self.unbroken.add(job_id)
                                return
            except (aiohttp.ClientError, TimeoutError):
                pass
            first = False
            self.resumes += 1
            await asyncio.sleep(0.1)


async def drive(
    args: argparse.Namespace, c: Cluster, pg: OwnPostgres | None, hook: str
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    run = Run(c, hook, rng)
    # sock_read above the SSE heartbeat (15 s): a stream that sends nothing at all is retried.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=25)
    db_restarted_at = None
    trace = aiohttp.TraceConfig()

    def phase(text: str) -> Any:
        async def note(_s: Any, ctx: Any, _p: Any) -> None:
            info = ctx.trace_request_ctx or {}
            if "job_id" in info:
                run.following[info["job_id"]] = f"{info['where']}: {text}"

        return note

    trace.on_connection_queued_start.append(phase("waiting for a client connection slot"))
    trace.on_connection_create_start.append(phase("connecting"))
    trace.on_request_headers_sent.append(phase("request sent"))
    async with aiohttp.ClientSession(timeout=timeout, trace_configs=[trace]) as http:
        followers: list[asyncio.Task[None]] = []

        async def submitter() -> None:
            for i in range(args.jobs):
                job_id = await run.submit(http, i)
                followers.append(asyncio.create_task(run.follow(http, job_id), name=job_id))
                await asyncio.sleep(rng.expovariate(1 / args.submit_every))

        sub = asyncio.create_task(submitter())
        kills: list[dict[str, Any]] = []
        for k in range(args.kills):
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            name = rng.choice(list(c.instances))
            c.kill(name)
            run.killed_admitters.add(name)
            run.kill_times.setdefault(name, []).append(time.monotonic())
            kills.append({"round": k, "instance": name, "at_jobs": len(run.accepted)})
            if pg is not None and k == args.kills // 2:
                pg.down()  # the database goes away while two instances run and hold work
                await asyncio.sleep(args.pause)
                pg.up()
                db_restarted_at = len(run.accepted)
            await asyncio.sleep(args.pause)
            await asyncio.to_thread(c.restart, name)
        await sub
        _, stuck = await asyncio.wait(followers, timeout=args.timeout)
        for t in stuck:  # counted as final_not_seen; where they hang is in the log
            print(f"follower of {t.get_name()} still waiting on {run.following.get(t.get_name())}")
            t.cancel()
    return {"run": run, "kills": kills, "db_restarted_at": db_restarted_at}


def account(url: str, run: Run, receiver_log: Path, deadline: float) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        while True:
            (left,) = conn.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')"
            ).fetchone() or (0,)
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        jobs = {
            r[0]: r[1:]
            for r in conn.execute("SELECT id, state, attempts, max_attempts FROM jobs").fetchall()
        }
        terminal: dict[str, int] = dict(
            conn.execute(
                "SELECT job_id, count(*) FROM job_events WHERE to_state IN"
                " ('completed', 'failed', 'cancelled') GROUP BY job_id"
            ).fetchall()
        )
        hook_ids: dict[str, int] = dict(
            conn.execute("SELECT job_id, count(DISTINCT id) FROM webhook_deliveries GROUP BY 1")
        )
    delivered: dict[str, set[str]] = {}
    posts = 0
    while True:
        delivered.clear()
        posts = 0
        for line in receiver_log.read_text().splitlines() if receiver_log.exists() else []:
            rec = json.loads(line)
            posts += 1
            if isinstance(rec.get("answered"), int) and 200 <= rec["answered"] < 300:
                delivered.setdefault(rec["job_id"], set()).add(rec["webhook_id"])
        if all(j in delivered for j in run.accepted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    states: dict[str, int] = {}
    for state, _, _ in jobs.values():
        states[state] = states.get(state, 0) + 1
    lost = [j for j in run.accepted if j not in jobs]
    problems = {
        "lost_jobs": lost,
        "unfinished": [j for j, (s, _, _) in jobs.items() if s in ("pending", "running")],
        "terminal_not_once": [j for j in run.accepted if terminal.get(j) != 1],
        "attempts_over_max": [j for j, (_, a, m) in jobs.items() if a > m],
        "webhook_not_delivered": [j for j in run.accepted if j not in delivered],
        "webhook_ids_not_one": [j for j, ids in delivered.items() if len(ids) != 1],
        "outbox_rows_not_one": [j for j in run.accepted if hook_ids.get(j) != 1],
        "final_not_seen": [j for j in run.accepted if j not in run.finals],
    }
    return {
        "accepted": len(run.accepted),
        "states": states,
        "webhook_posts": posts,
        "webhook_posts_beyond_one_per_job": posts - len(delivered),  # 503 retries, kills
        "admission_retries": run.admission_retries,
        "stream_resumes": run.resumes,
        "streams_unbroken": len(run.unbroken),
        # Jobs admitted through an instance that was killed afterwards, whose final result a
        # stream on a surviving instance saw.
        "finals_of_jobs_admitted_by_a_killed_instance": sum(
            1
            for j, n in run.accepted.items()
            if j in run.finals
            and run.finals[j] != n
            and any(t > run.admitted_at[j] for t in run.kill_times.get(n, []))
        ),
        "problems": {k: v[:20] for k, v in problems.items()},
        "problem_counts": {k: len(v) for k, v in problems.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.chaos_cluster", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--node-duration", type=float, default=0.05)
    ap.add_argument("--submit-every", type=float, default=0.03, help="mean seconds between jobs")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds a killed instance stays down")
    ap.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait at the end for the streams, then again for jobs and webhooks",
    )
    ap.add_argument(
        "--shared-db",
        action="store_true",
        help="use COMFYQ_TEST_POSTGRES's server (no database restart)",
    )
    ap.add_argument("--json")
    ap.add_argument("--keep", type=Path, help="keep logs in this folder")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="chaos-cluster-", dir=os.environ.get("BENCH_TMP")))
    pg = None if args.shared_db or not OwnPostgres.available() else OwnPostgres(root)
    url = ""
    c: Cluster | None = None
    receiver: subprocess.Popen[bytes] | None = None
    t0 = time.monotonic()
    saved_admin = os.environ.get("COMFYQ_TEST_POSTGRES")
    try:
        if pg is not None:
            admin = pg.start()
            os.environ["COMFYQ_TEST_POSTGRES"] = admin
        url = create_database("comfyq_chaos")
        hook_port = free_port()
        receiver_log = root / "webhooks.jsonl"
        receiver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.chaos_receiver",
                "--port",
                str(hook_port),
                "--log",
                str(receiver_log),
                "--secret",
                SECRET,
                "--error-rate",
                "0.05",
                "--delay",
                "0.1",
                "--seed",
                str(args.seed),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", hook_port)) == 0:
                    break
            time.sleep(0.05)
        c = Cluster(
            root,
            url,
            env={"COMFYQ_WEBHOOK_RETRY_BASE_DELAY": "0.2", "COMFYQ_WEBHOOK_RETRY_MAX_DELAY": "2"},
        )
        s0 = c.start_sim("s0", node_duration=args.node_duration)
        s1 = c.start_sim("s1", node_duration=args.node_duration)
        c.start_instance("i0", [s0])
        c.start_instance("i1", [s1])
        c.start_instance("i2", [s0, s1])
        out = asyncio.run(drive(args, c, pg, f"http://127.0.0.1:{hook_port}/hook"))
        figures = account(url, out["run"], receiver_log, time.monotonic() + args.timeout)
        figures.update(
            jobs=args.jobs,
            kills=out["kills"],
            database_restarted=out["db_restarted_at"] is not None,
            database_restarted_after_jobs=out["db_restarted_at"],
            seconds=time.monotonic() - t0,
            own_postgres=pg is not None,
        )
        exit_codes = {n: c.stop(n) for n in list(c.instances)}
        figures["graceful_exit_codes"] = exit_codes
        bad = sum(figures["problem_counts"].values())
        print(json.dumps({k: v for k, v in figures.items() if k != "problems"}, indent=1))
        if bad:
            print(json.dumps(figures["problems"], indent=1))
            print(c.logs()[-6000:])
        write_json(args.json, figures)
        return 1 if bad else 0
    except Exception as exc:  # noqa: BLE001 - the run could not be carried out: say why
        print(f"chaos_cluster: {type(exc).__name__}: {exc}", file=sys.stderr)
        if c is not None:
            print(c.logs()[-6000:], file=sys.stderr)
        return 2
    finally:
        if c is not None:
            c.close()
        if receiver is not None:
            receiver.kill()
            receiver.wait()
        if url:
            with contextlib.suppress(Exception):
                drop_database(url)
        if pg is not None:
            pg.destroy()
            if saved_admin is None:
                os.environ.pop("COMFYQ_TEST_POSTGRES", None)
            else:
                os.environ["COMFYQ_TEST_POSTGRES"] = saved_admin
        if args.keep:
            shutil.copytree(
                root, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pgdata")
            )
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
