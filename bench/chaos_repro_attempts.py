"""A finding of the chaos run, reproduced on purpose: one POST /prompt that fails ambiguously
(ComfyUI hung or died while the request was in flight) costs a job two attempts, so two ComfyUI
incidents fail a job with the default max_attempts=3 although ComfyUI accepted one prompt of it.

Why: Generate stores the prompt id before POST /prompt (right: the request may have got in). The
failed POST is a retryable comfyui_unreachable: attempt 2, prompt id kept. Attempt 2 reconciles that
id, ComfyUI does not know it (it never got in, or ComfyUI restarted), and ``_reconcile`` raises
PromptLost: attempt 3, although nothing was submitted in attempt 2. The same reconcile path charges
an attempt when comfyq itself was killed between storing the id and sending it (a restart that
``recover`` deliberately does not count).

Steps, all real processes on loopback: the simulator is SIGSTOP-ed; a job is submitted; its POST
/prompt times out (request timeout 3 s); the simulator is killed and restarted; the job's reconcile
finds the prompt unknown; while the resubmitted prompt runs the simulator is killed once more.

    .venv/bin/python -m bench.chaos_repro_attempts

Exit status 1 while the double count is there (the job fails after 3 attempts with 1 prompt
accepted), 0 once a fix lets it complete.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import aiohttp

from bench.chaos_client import workflow
from bench.chaos_procs import Child, http_ready, python
from bench.common import free_port

JobRow = tuple[str, int, str | None]  # state, attempts, comfy_prompt_id


def _job(db: Path) -> JobRow:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT state, attempts, comfy_prompt_id FROM jobs").fetchone()
    finally:
        conn.close()
    return str(row[0]), int(row[1]), row[2]


async def _until(
    db: Path, cond: str, check: Callable[[JobRow], bool], timeout: float = 60.0
) -> JobRow:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        job = _job(db)
        if check(job):
            return job
        await asyncio.sleep(0.05)
    raise TimeoutError(f"job never reached: {cond}; it is {_job(db)}")


async def reproduce(root: Path) -> int:
    """Run the scenario in ``root``; print what happened; 1 if the job ran out of attempts."""
    sim_port, api_port = free_port(), free_port()
    db = root / "q.db"
    async with aiohttp.ClientSession() as http:
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
                "2",
                "--prompt-log",
                str(root / "prompts.jsonl"),
            ),
            root / "simulator.log",
            http_ready(http, f"http://127.0.0.1:{sim_port}/system_stats"),
        )
        env = {
            "COMFYQ_CONFIG": str(root / "none.toml"),
            "COMFYQ_DATABASE": str(db),
            "COMFYQ_OUTPUT_DIR": str(root / "out"),
            "COMFYQ_CACHE_DIR": str(root / "cache"),
            "COMFYUI_API_BASE": f"http://127.0.0.1:{sim_port}",
            "API_PORT": str(api_port),
            "COMFYQ_COMFYUI_REQUEST_TIMEOUT": "3",
            "COMFYQ_BACKEND_PROBE_INTERVAL": "0.5",
            "COMFYQ_RETRY_BASE_DELAY": "0.5",
        }
        comfyq = Child(
            "comfyq",
            python("-m", "comfyq", "serve"),
            root / "comfyq.log",
            http_ready(http, f"http://127.0.0.1:{api_port}/health"),
            env=env,
            cwd=root,
        )
        try:
            await sim.start()
            await comfyq.start()
            sim.freeze(
                True
            )  # ComfyUI hangs (a model load, swapping...): POST /prompt will time out
            body = {"input": {"request_id": "repro", "workflow_json": workflow("repro", 1)}}
            async with http.post(f"http://127.0.0.1:{api_port}/generate", json=body) as r:
                assert r.status == 202, await r.text()
            first = await _until(db, "attempt 2", lambda j: j[1] >= 2)
            print("1. POST /prompt to a hung ComfyUI:", first)
            await sim.kill9()  # incident 1: the hung ComfyUI is restarted
            await sim.start()
            print(
                "2. ComfyUI restarted, prompt id reconciled, a fresh prompt runs:",
                await _until(
                    db,
                    "a fresh prompt running",
                    lambda j: j[0] == "running" and j[2] not in (None, first[2]),
                ),
            )
            await asyncio.sleep(1.0)
            await sim.kill9()  # incident 2: ComfyUI dies while the resubmitted prompt runs
            await sim.start()
            final = await _until(
                db, "an end", lambda j: j[0] in ("completed", "failed", "cancelled")
            )
            print("3. ComfyUI restarted again; the job ends:", final)
        finally:
            await comfyq.stop()
            await sim.stop()
    prompts = [
        json.loads(line)["prompt_id"] for line in (root / "prompts.jsonl").read_text().splitlines()
    ]
    conn = sqlite3.connect(db)
    events = conn.execute(
        "SELECT to_state, stage, attempt, message FROM job_events ORDER BY id"
    ).fetchall()
    conn.close()
    print(f"prompts ComfyUI accepted: {len(prompts)}; ComfyUI incidents: 2; attempts: {final[1]}")
    for e in events:
        print("   ", e)
    return 1 if final[0] == "failed" else 0


def main() -> int:
    """Reproduce in a temporary folder (kept when the job failed)."""
    root = Path(tempfile.mkdtemp(prefix="comfyq-repro-"))
    code = asyncio.run(reproduce(root))
    print(
        "double-counted attempts: the job FAILED" if code else "the job completed: no double count"
    )
    if code:
        print(f"(kept {root})")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
