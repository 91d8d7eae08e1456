"""Store alone: complete jobs/s through claim -> every transition -> done, at synchronous=FULL,
with 1, 4 and 16 concurrent workers; and claim latency p50/p99 with 10k and 1M rows in the table.

    .venv/bin/python -m bench.bench_store [--jobs 4000] [--big 1000000] [--samples 1000]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import add_json_arg, pct, summary_ms, write_json
from comfyq.store import Job, NewJob
from comfyq.store.model import STAGES, Stage, State
from comfyq.store.sqlite import SqliteStore
from comfyq.store.sqlite.writer import connect


def _new(i: int) -> NewJob:
    return NewJob(
        id=f"job-{i:08d}",
        payload={"input": {"workflow_json": {"1": {"class_type": "X"}}}},
        payload_hash=str(i),
        kind="workflow",
    )


def thread_cpu(native_id: int | None) -> float:
    """CPU seconds a thread of this process has used (schedstat: nanoseconds, not ticks)."""
    if native_id is None:
        return 0.0
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


async def throughput(
    path: Path, jobs: int, workers: int, include_create: bool
) -> tuple[float, int, float, float]:
    """(complete jobs/s, commits, writer-thread CPU ms per job, process CPU ms per job)."""
    store = SqliteStore(path)
    await store.open()
    try:
        if not include_create:
            await asyncio.gather(*(store.create(_new(i), jobs + 1) for i in range(jobs)))
        done = 0
        next_id = 0

        async def worker() -> None:
            nonlocal done, next_id
            while done < jobs:
                if include_create and next_id < jobs:
                    i = next_id
                    next_id += 1
                    await store.create(_new(i), jobs + 1)
                progressed = False
                for stage in STAGES:
                    for job in await store.claim(stage, 1, 30.0, stage):
                        await store.advance(job.id, f"{stage} done")
                        progressed = True
                        if stage == "postprocess":
                            done += 1
                if not progressed and not (include_create and next_id < jobs):
                    await asyncio.sleep(0)

        commits0 = store.writer.commits
        thread = store.writer._thread
        tid = thread.native_id if thread is not None else None
        w0, p0 = thread_cpu(tid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        elapsed = time.perf_counter() - t0
        writer_ms = (thread_cpu(tid) - w0) / jobs * 1000
        process_ms = (time.process_time() - p0) / jobs * 1000
        return jobs / elapsed, store.writer.commits - commits0, writer_ms, process_ms
    finally:
        await store.close()


async def through_runner(path: Path, jobs: int, workers: int) -> float:
    """The same work through the real stage runner (batched claims, wake-ups) with no-op stages."""
    from comfyq.events import EventBus
    from comfyq.stages.runner import JobContext, Pipeline, RunnerConfig, StageDone

    store = SqliteStore(path)
    await store.open()
    finished = asyncio.Event()
    count = 0

    def on_tr(trs: list) -> None:  # type: ignore[type-arg]
        nonlocal count
        count += sum(1 for t in trs if t.to_state == State.COMPLETED)
        if count >= jobs:
            finished.set()

    store.listen(on_tr)

    async def noop(job: Job, ctx: JobContext) -> StageDone:
        return StageDone("ok")

    pipe = Pipeline(
        store,
        EventBus(),
        {s: noop for s in STAGES},
        {s: workers for s in STAGES},
        RunnerConfig(lease=30),
    )
    await asyncio.gather(*(store.create(_new(i), jobs + 1) for i in range(jobs)))
    t0 = time.perf_counter()
    await pipe.start()
    await finished.wait()
    elapsed = time.perf_counter() - t0
    await pipe.stop(1)
    await store.close()
    return jobs / elapsed


async def runner_admitted(path: Path, jobs: int, clients: int, workers: int) -> dict[str, float]:
    """The real stage runner with no-op stages while ``clients`` clients each admit a job and
    wait for it to complete, then the next (the shape of the end-to-end benchmark): complete
    jobs/s, writes and commits per job, writer-thread and process CPU per job."""
    from comfyq.events import EventBus
    from comfyq.stages.runner import JobContext, Pipeline, RunnerConfig, StageDone

    store = SqliteStore(path)
    await store.open()
    waiting: dict[str, asyncio.Future[None]] = {}

    def on_tr(trs: list) -> None:  # type: ignore[type-arg]
        for t in trs:
            if t.to_state == State.COMPLETED and t.job_id in waiting:
                waiting.pop(t.job_id).set_result(None)

    store.listen(on_tr)

    async def noop(job: Job, ctx: JobContext) -> StageDone:
        return StageDone("ok")

    pipe = Pipeline(
        store,
        EventBus(),
        {s: noop for s in STAGES},
        {s: workers for s in STAGES},
        RunnerConfig(lease=30),
    )
    await pipe.start()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(0.1)  # the workers are waiting

        async def client(k: int) -> None:
            for i in range(k, jobs, clients):
                fut = waiting[f"job-{i:08d}"] = loop.create_future()
                await store.create(_new(i), jobs + 1)
                await fut

        ops0, commits0 = store.writer.ops, store.writer.commits
        thread = store.writer._thread
        tid = thread.native_id if thread is not None else None
        w0, p0 = thread_cpu(tid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
        return {
            "jobs_per_s": jobs / elapsed,
            "writes_per_job": (store.writer.ops - ops0) / jobs,
            "commits_per_job": (store.writer.commits - commits0) / jobs,
            "writer_ms": (thread_cpu(tid) - w0) / jobs * 1000,
            "process_ms": (time.process_time() - p0) / jobs * 1000,
        }
    finally:
        await pipe.stop(1)
        await store.close()


class _Intake:
    """An always idle preprocess worker of this process (comfyq.store.base.Intake), as the stage
    runner offers admission: the job a create claims for it is kept here."""

    lease = 30.0
    message = "claimed"

    def __init__(self) -> None:
        self.job: Job | None = None

    def take(self) -> object | None:
        return self

    def hand(self, ticket: object, job: Job | None) -> None:
        self.job = job


PATHS = ("claim_advance", "hand_off", "hand_off_prompt", "folded")


async def statement_counts(path: Path, jobs: int, how: str) -> dict[str, float]:
    """SQL statements, trigger programs and commits per job on the writer connection, one job at
    a time: ``claim_advance``: create, then claim + advance per stage; ``hand_off``: create,
    claim, two advance_and_claim hand-offs and the last advance; ``hand_off_prompt``: the same
    with the generate stage's write of its prompt id before submitting (the stage runner's path
    before the folds); ``folded``: create claimed at once by an idle preprocess worker, the
    prompt id stored by the preprocess -> generate hand-off, the second hand-off, the end (the
    stage runner's path with idle workers)."""
    store = SqliteStore(path)
    await store.open()
    intake = _Intake()
    seen: list[str] = []
    conn = store.writer._conn
    assert conn is not None
    # The callback gets the expanded SQL; each statement a trigger starts is reported with the
    # text of the statement that fired it, so a repeat of the same text right after it counts as
    # one "trigger program". Since migration 0005 one trigger runs on a state change and starts
    # its three guarded statements (legality, count, webhook), where three triggers used to stop
    # at their WHEN clauses: that count rose (claim_advance 21 -> 26) while the work fell.
    conn.set_trace_callback(seen.append)
    commits0 = store.writer.commits
    try:
        for i in range(jobs):
            if how == "folded":
                store.intake = intake
                await store.create(_new(i), jobs + 1)
                store.intake = None
                assert intake.job is not None and intake.job.state == State.RUNNING
                job = intake.job
                prompt = {"comfy_prompt_id": f"p-{i}", "comfy_backend": "http://127.0.0.1:8188"}
                for stage, assign in (("preprocess", prompt), ("generate", None)):
                    await store.advance_and_claim(
                        job.id, f"{stage} done", None, 30.0, "claimed", claim_fields=assign
                    )
                await store.advance(job.id, "done")
                continue
            await store.create(_new(i), jobs + 1)
            (job,) = await store.claim(Stage.PREPROCESS, 1, 30.0, "claimed")
            if how in ("hand_off", "hand_off_prompt"):
                for stage in ("preprocess", "generate"):
                    await store.advance_and_claim(job.id, f"{stage} done", None, 30.0, "claimed")
                    if stage == "preprocess" and how == "hand_off_prompt":
                        await store.update(
                            job.id,
                            {"comfy_prompt_id": f"p-{i}", "comfy_backend": "http://127.0.0.1:8188"},
                        )
                await store.advance(job.id, "done")
            else:
                await store.advance(job.id, "preprocess done")
                for stage in (Stage.GENERATE, Stage.POSTPROCESS):
                    (job,) = await store.claim(stage, 1, 30.0, "claimed")
                    await store.advance(job.id, f"{stage} done")
        commits = store.writer.commits - commits0
    finally:
        conn.set_trace_callback(None)
        await store.close()
    statements = triggers = 0
    for prev, sql in zip(["", *seen], seen, strict=False):
        if sql in ("BEGIN IMMEDIATE", "COMMIT") or sql.startswith(("SAVEPOINT", "RELEASE")):
            continue
        if sql == prev:
            triggers += 1
        else:
            statements += 1
    return {
        "statements": statements / jobs,
        "trigger_programs": triggers / jobs,
        "commits": commits / jobs,
    }


def fill(path: Path, rows: int) -> None:
    """``rows`` finished jobs plus 2,000 waiting ones, written straight into the file."""
    conn = connect(path)
    conn.execute("BEGIN")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
        " INSERT INTO jobs (id, state, stage, payload, payload_hash, run_after,"
        " deadline_at, created_at,"
        " updated_at, stage_entered_at, finished_at, attempts)"
        " SELECT printf('done-%09d', i), 'completed', 'postprocess', '{}', 'h',"
        " '2026-01-01T00:00:00.000000Z',"
        " '2027-01-01T00:00:00.000000Z', printf('2026-01-01T00:00:%02d.%06dZ',"
        " i / 1000000 % 60, i % 1000000),"
        " '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z',"
        " '2026-01-01T00:00:01.000000Z', 1"
        " FROM n",
        (rows - 1,),
    )
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 1999)"
        " INSERT INTO jobs (id, state, stage, payload, payload_hash, run_after,"
        " deadline_at, created_at,"
        " updated_at, stage_entered_at, priority)"
        " SELECT printf('wait-%09d', i), 'pending', 'generate', '{}', 'h',"
        " '2026-01-01T00:00:00.000000Z',"
        " '2099-01-01T00:00:00.000000Z', printf('2026-06-01T00:00:00.%06dZ', i),"
        " '2026-01-01T00:00:00.000000Z',"
        " '2026-01-01T00:00:00.000000Z', i % 3 FROM n"
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


async def claim_latency(path: Path, samples: int = 1000) -> list[float]:
    """``samples`` claim round trips of one job (released again after each), in seconds."""
    store = SqliteStore(path)
    await store.open()
    try:
        lat = []
        for _ in range(samples):
            t0 = time.perf_counter()
            got = await store.claim(Stage.GENERATE, 1, 30.0, "g")
            lat.append(time.perf_counter() - t0)
            await store.release(got[0].id, "back")
        return lat
    finally:
        await store.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=1000, help="claims timed per table size")
    add_json_arg(ap)
    args = ap.parse_args()
    out: dict[str, Any] = {
        "args": {"jobs": args.jobs, "big": args.big, "samples": args.samples},
        "throughput": {},
        "writes_per_commit": {},
        "claim_latency": {},
        "per_job": {},
    }
    print(
        f"store benchmark: synchronous=FULL, WAL, {os.cpu_count()} cores, {args.jobs} jobs per run"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        for include_create in (False, True):
            label = (
                "create+claim+transitions" if include_create else "claim+transitions (pre-filled)"
            )
            key = "create_claim_transitions" if include_create else "claim_transitions"
            for w in (1, 4, 16):
                path = Path(d) / f"t{w}{include_create}.db"
                rate, commits, writer_ms, process_ms = await throughput(
                    path, args.jobs, w, include_create
                )
                writes = args.jobs * (7 if include_create else 6)
                out["throughput"].setdefault(key, {})[str(w)] = rate
                out["writes_per_commit"].setdefault(key, {})[str(w)] = writes / max(commits, 1)
                out.setdefault("cpu_ms_per_job", {}).setdefault(key, {})[str(w)] = {
                    "writer_thread": writer_ms,
                    "process": process_ms,
                }
                print(
                    f"  {label:32s} workers={w:2d}: {rate:8.0f} complete jobs/s"
                    f"  ({writes} writes in {commits} commits,"
                    f" {writes / max(commits, 1):.1f}/fsync;"
                    f" CPU/job: writer {writer_ms:.2f} ms, process {process_ms:.2f} ms)"
                )
        for w in (1, 4, 16):
            rate = await through_runner(Path(d) / f"r{w}.db", args.jobs, w)
            out["throughput"].setdefault("stage_runner", {})[str(w)] = rate
            print(
                f"  {'stage runner, no-op stages':32s} workers={w:2d}/stage:"
                f" {rate:8.0f} complete jobs/s"
            )
        for clients in (1, 16):
            fig = await runner_admitted(Path(d) / f"a{clients}.db", args.jobs, clients, 16)
            out.setdefault("runner_admitted", {})[str(clients)] = fig
            print(
                f"  {'stage runner, admitted while running':32s} clients={clients:2d}:"
                f" {fig['jobs_per_s']:8.0f} complete jobs/s  ({fig['writes_per_job']:.2f} writes,"
                f" {fig['commits_per_job']:.2f} commits per job;"
                f" CPU/job: writer {fig['writer_ms']:.2f} ms, process {fig['process_ms']:.2f} ms)"
            )
        labels = {
            "claim_advance": "create, claim+advance x3",
            "hand_off": "create, claim, 2 hand-offs, end",
            "hand_off_prompt": "... + prompt id write (before)",
            "folded": "create claimed, 2 hand-offs, end",
        }
        for key in PATHS:
            counts = await statement_counts(Path(d) / f"count{key}.db", 200, key)
            out["per_job"][key] = counts
            label = labels[key]
            print(
                f"  per job, {label:32s}: {counts['statements']:.1f} SQL statements"
                f" (+{counts['trigger_programs']:.1f} trigger programs),"
                f" {counts['commits']:.1f} commits"
            )
        results = {}
        for rows in (10_000, args.big):
            path = Path(d) / f"big{rows}.db"
            s = SqliteStore(path)  # open() migrates the new file
            await s.open()
            await s.close()
            t0 = time.perf_counter()
            fill(path, rows)
            fill_s = time.perf_counter() - t0
            lat = await claim_latency(path, args.samples)
            p50, p99 = statistics.median(lat) * 1000, pct(lat, 0.99) * 1000
            results[rows] = (p50, p99)
            out["claim_latency"][str(rows)] = {
                **summary_ms(lat),
                "fill_s": fill_s,
                "samples_ms": [x * 1000 for x in lat],
            }
            print(
                f"  claim latency with {rows:>9,} rows: p50 {p50:.3f} ms  p99 {p99:.3f} ms"
                f"  (fill {fill_s:.1f}s)"
            )
        (a50, a99), (b50, b99) = results[10_000], results[args.big]
        out["claim_p50_ratio"], out["claim_p99_ratio"] = b50 / a50, b99 / a99
        print(f"  ratio {args.big:,} vs 10,000 rows: p50 x{b50 / a50:.2f}  p99 x{b99 / a99:.2f}")
    write_json(args.json, out)


if __name__ == "__main__":
    asyncio.run(main())
