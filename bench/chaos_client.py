"""The chaos run's client side: the jobs it submits, the state of the run, and what it reads from
outside (the database, read-only; the API at the end).

Submissions retry on connection errors and 5xx with the same ``request_id`` (comfyq's idempotency
key: a repeated request gets the job it already made, 200 instead of 202), so a job whose first
POST was committed but whose answer was lost to a kill is accepted exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.chaos_procs import Child
from bench.chaos_report import TERMINAL
from comfyq.sim.png import encode_png

BUCKET = "bench-outputs"  # made by bench_outputs.start_moto


def workflow(job_id: str, n: int, bad: bool = False, image: str | None = None) -> dict[str, Any]:
    """The job's workflow: from an input ``image`` or an empty one; a ``bad`` one links to a node
    that does not exist (ComfyUI answers 400)."""
    # The SaveImage prefix names the job, so the simulator's prompt log maps each prompt to its job;
    # a colour per job keeps ComfyUI's cache from skipping the work.
    first = (
        {"class_type": "LoadImage", "inputs": {"image": image}}
        if image
        else {
            "class_type": "EmptyImage",
            "inputs": {
                "width": 32,
                "height": 32,
                "batch_size": 1,
                "color": (n * 40503) % 16_777_216,
            },
        }
    )
    return {
        "1": first,
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["9" if bad else "1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": job_id}},
    }


def input_png(n: int) -> str:
    """A small PNG of the job's own colour, base64."""
    c = (n * 40503) % 16_777_216
    return base64.b64encode(encode_png(16, 16, (c >> 16, (c >> 8) & 255, c & 255))).decode()


@dataclass
class World:
    """The running parts and what the client has seen."""

    root: Path
    args: argparse.Namespace
    api: str
    comfyq: Child
    sim: Child
    receiver: Child
    hook_url: str
    s3_url: str
    secret: str
    t0: float = field(default_factory=time.monotonic)
    accepted: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(
        default_factory=lambda: {"posts": 0, "connection_errors": 0, "http_5xx": 0, "queue_full": 0}
    )
    timeline: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    outstanding: int = 0  # jobs not yet accepted (or given up on)
    plan: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # job id -> {"bad", "cancel_after"}
    cancels: dict[str, str] = field(
        default_factory=dict
    )  # job id -> status its cancel request answered

    @property
    def db(self) -> Path:
        return self.root / "q.db"

    def now(self) -> float:
        return time.monotonic() - self.t0


# --- the database, read from outside ------------------------------------------------------------


def _counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT CASE WHEN state IN ('pending', 'running') THEN state || ':' || stage"
            " ELSE state END, count(*) FROM jobs GROUP BY 1"
        ).fetchall()
        hooks = conn.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE state IN ('pending', 'sending')"
        ).fetchone()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    out = {str(k): int(v) for k, v in rows}
    out["webhooks_due"] = int(hooks[0])
    return out


async def counts(w: World) -> dict[str, int]:
    """Jobs per state (and stage while unfinished), and webhook deliveries not yet ended."""
    return await asyncio.to_thread(_counts, w.db)


def finished(c: dict[str, int]) -> int:
    return sum(c.get(s, 0) for s in TERMINAL)


# --- submissions --------------------------------------------------------------------------------


async def submit(w: World, http: aiohttp.ClientSession, n: int, at: float) -> None:
    """Submit job ``n`` at ``at`` seconds into the run; retry with one request_id until a 2xx."""
    await asyncio.sleep(max(0.0, at - w.now()))
    job_id = f"chaos-{w.args.seed}-{n:04d}"
    plan = w.plan[job_id]
    image = "chaos-input.png" if plan["input"] else None
    body: dict[str, Any] = {
        "input": {
            "request_id": job_id,
            "workflow_json": workflow(job_id, n, plan["bad"], image),
            "s3": {
                "bucket_name": BUCKET,
                "endpoint_url": w.s3_url,
                "region": "us-east-1",
                "access_key_id": "chaos",
                "secret_access_key": "chaos-secret",
            },
            "webhook": {"url": w.hook_url, "secret": w.secret, "extra_params": {"n": n}},
        }
    }
    if image:
        body["input"]["images"] = [{"name": image, "image": input_png(n)}]
    try:
        await _submit(w, http, n, job_id, body)
    finally:
        w.outstanding -= 1
    if plan["cancel_after"] is not None and job_id in w.accepted:
        await asyncio.sleep(plan["cancel_after"])
        await cancel(w, http, job_id)


async def cancel(w: World, http: aiohttp.ClientSession, job_id: str) -> None:
    """DELETE /jobs/{id} until it is answered (connection errors and 5xx are retried)."""
    for _ in range(200):
        try:
            async with http.delete(
                f"{w.api}/jobs/{job_id}", timeout=aiohttp.ClientTimeout(total=30)
            ) as r:
                if r.status < 500:
                    w.cancels[job_id] = f"{r.status} {(await r.json()).get('status')}"
                    return
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass
        await asyncio.sleep(0.3)
    w.cancels[job_id] = "never answered"


async def _submit(
    w: World, http: aiohttp.ClientSession, n: int, job_id: str, body: dict[str, Any]
) -> None:
    rng = random.Random(n)
    end = time.monotonic() + w.args.final_timeout
    while time.monotonic() < end:
        w.stats["posts"] += 1
        try:
            async with http.post(
                f"{w.api}/generate", json=body, timeout=aiohttp.ClientTimeout(total=30)
            ) as r:
                status, text = r.status, await r.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            w.stats["connection_errors"] += 1
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            continue
        if status in (200, 202):
            w.accepted[job_id] = status
            return
        if status >= 500:
            w.stats["http_5xx"] += 1
            w.stats["queue_full"] += int(status == 503 and "queue_full" in text)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            continue
        w.rejected[job_id] = f"HTTP {status}: {text[:300]}"
        return
    w.rejected[job_id] = "gave up: no 2xx before --final-timeout"


async def wait_all_done(w: World) -> dict[str, int]:
    """Until every accepted job has ended and no webhook delivery is due, or --final-timeout."""
    end = time.monotonic() + w.args.final_timeout
    c: dict[str, int] = {}
    while time.monotonic() < end:
        c = await counts(w)
        if finished(c) >= len(w.accepted) and not c.get("webhooks_due"):
            break
        await asyncio.sleep(0.5)
    return c


async def api_final(w: World, http: aiohttp.ClientSession) -> dict[str, str]:
    """What GET /jobs/{id} says about every accepted job."""
    out: dict[str, str] = {}
    for job_id in w.accepted:
        try:
            async with http.get(
                f"{w.api}/jobs/{job_id}", timeout=aiohttp.ClientTimeout(total=30)
            ) as r:
                out[job_id] = (
                    str((await r.json()).get("status")) if r.status == 200 else f"HTTP {r.status}"
                )
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            out[job_id] = f"error: {type(exc).__name__}"
    return out
