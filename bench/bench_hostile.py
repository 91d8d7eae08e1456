"""Hostile bodies: what the largest body of each kind the limits allow costs everyone else.

For each kind (the largest JSON body by bytes, by values, the largest workflow by nodes, and a body
just over a limit, which must be refused cheaply), a fresh ``comfyq serve`` (subprocess, with the
simulator in another) takes ``--bodies`` such bodies one after another while a second client polls
``/health`` every 10 ms and a third lists ``/queue-info``. Reported per kind: the server's own
event-loop lag (max, and the p99 from its ``comfyq_event_loop_lag_seconds`` histogram), the
``/health`` latency seen by the poller (p50/p99/max), the requests the other clients got answered
meanwhile, the time per body, and RSS: idle (after warm-up: /health and two ordinary jobs, before
the first body), after the burst (every accepted body's job finished: ``unfinished`` of
``/queue-info`` back to 0; the pollers run until then), and settled (after a further ``--settle``
seconds with no request at all, longer than the server's 2 s heap-trim delay). The jobs' outcomes
are reported (the simulator refuses the unknown node types of the node-count body at submission, as
a real ComfyUI would).

Targets (issue 19): max loop lag <= 50 ms; /health p99 <= 100 ms throughout; RSS back within 20% of
idle after the burst. Figures are printed, never judged.

    .venv/bin/python -m bench.bench_hostile [--bodies 10] [--kinds bytes,values,nodes,over]
        [--settle 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import add_json_arg, pct, rss_mb, server, simulator, write_json

MiB = 1024 * 1024
JSON_BYTES = 16 * MiB  # the defaults of max_json_bytes, max_json_items, max_workflow_nodes
JSON_ITEMS = 100_000
NODES = 5_000
PNG_HEAD = bytes.fromhex("89504e470d0a1a0a0000000d49484452000001000000010008060000005c72a866")


def _base() -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "h"}},
    }


def body_bytes(i: int) -> bytes:
    """Just under max_json_bytes: one input image as base64 (the JSON way to send a file); a PNG
    signature and header, then random bytes, so that it is typed as an image (an accepted input)
    and the job is admitted."""
    raw = PNG_HEAD + os.urandom(int((JSON_BYTES - 4096) * 3 / 4) - len(PNG_HEAD))
    doc = {
        "input": {
            "request_id": f"bytes-{i}-{time.time_ns()}",
            "workflow_json": _base(),
            "images": [{"name": "big.bin", "image": base64.b64encode(raw).decode()}],
        }
    }
    return json.dumps(doc).encode()


def body_values(i: int) -> bytes:
    """Just under max_json_items: a workflow of 1,000 nodes with many scalar inputs each."""
    per = (JSON_ITEMS - 5000) // 2000 - 3  # a key: value pair counts twice (":" and ",")
    nodes = _base()
    for n in range(3, 1003):
        nodes[str(n)] = {
            "class_type": "PrimitiveNode",
            "inputs": {f"v{k}": k for k in range(per)},
        }
    doc = {"input": {"request_id": f"values-{i}-{time.time_ns()}", "workflow_json": nodes}}
    return json.dumps(doc).encode()


def body_nodes(i: int) -> bytes:
    """max_workflow_nodes nodes, each linked to the one before (the longest chain allowed)."""
    nodes = {
        str(n): {"class_type": "BenchUnknownNode", "inputs": {"x": [str(n - 1), 0], "s": "a"}}
        for n in range(1, NODES + 1)
    }
    doc = {"input": {"request_id": f"nodes-{i}-{time.time_ns()}", "workflow_json": nodes}}
    return json.dumps(doc).encode()


def body_over(i: int) -> bytes:
    """Over the value limit (the shape of the 4M-key body that froze the server): refused."""
    mods = ",".join(f'"k{k}":{k}' for k in range(600_000))
    return ('{"input": {"modifier": "ImageEffects", "modifications": {' + mods + "}}}").encode()


KINDS: dict[str, Callable[[int], bytes]] = {
    "bytes": body_bytes,
    "values": body_values,
    "nodes": body_nodes,
    "over": body_over,
}


def _lag(metrics: str) -> dict[str, float]:
    buckets: list[tuple[float, float]] = []
    count = 0.0
    lag_max = float("nan")
    for line in metrics.splitlines():
        m = re.match(r'comfyq_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, float(m.group(2))))
        elif line.startswith("comfyq_event_loop_lag_seconds_count"):
            count = float(line.split()[-1])
        elif line.startswith("comfyq_event_loop_lag_recent_max_seconds"):
            lag_max = float(line.split()[-1])
    return {"max": lag_max, "count": count, **{f"le_{le}": c for le, c in buckets}}


def _burst_max(before: dict[str, float], after: dict[str, float]) -> tuple[float, bool]:
    """The largest loop lag (s) of the burst alone, and whether it is exact.

    The server's recent maximum covers its last ~1,000 samples, which may reach back before the
    burst (warm-up, start); the histogram's difference of two scrapes covers the burst only. When
    the recent maximum lies in the highest bucket the burst touched, it is the burst's; otherwise
    that bucket's upper bound is given (not exact)."""
    edges = sorted(float(k[3:]) for k in after if k.startswith("le_"))
    lo = 0.0
    top: tuple[float, float] | None = None
    for le in edges:
        key = f"le_{le}"
        below = f"le_{lo}" if lo else None
        n = after[key] - before.get(key, 0.0)
        n_below = (after[below] - before.get(below, 0.0)) if below else 0.0
        if n - n_below > 0:
            top = (lo, le)
        lo = le
    if top is None:
        return 0.0, True
    if top[0] < after["max"] <= top[1]:
        return after["max"], True
    return top[1], False


def _p99_bucket(before: dict[str, float], after: dict[str, float]) -> float:
    """The upper bound (s) of the histogram bucket holding the burst's 99th percentile lag."""
    n = after["count"] - before["count"]
    if n <= 0:
        return float("nan")
    for key in sorted((k for k in after if k.startswith("le_")), key=lambda k: float(k[3:])):
        if (after[key] - before.get(key, 0.0)) >= 0.99 * n:
            return float(key[3:])
    return float("inf")


async def _wait_finished(
    s: aiohttp.ClientSession, url: str, ids: list[str], timeout: float = 120.0
) -> tuple[float, dict[str, int]]:
    """Wait until the server has no unfinished job; returns the wait (s) and the accepted jobs'
    final statuses (counted)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        async with s.get(url + "/queue-info") as r:
            if (await r.json()).get("unfinished") == 0:
                break
        await asyncio.sleep(0.1)
    waited = time.perf_counter() - t0
    outcomes: dict[str, int] = {}
    for job_id in ids:
        async with s.get(f"{url}/jobs/{job_id}") as r:
            status = str((await r.json()).get("status")) if r.status == 200 else f"http {r.status}"
        outcomes[status] = outcomes.get(status, 0) + 1
    return waited, outcomes


async def warm_up(s: aiohttp.ClientSession, url: str, jobs: int = 2) -> None:
    """Idle is read after a server has run ordinary jobs, as any server in use has: the first
    job creates what lives as long as the process (the default thread pool, the connection to
    ComfyUI, statement caches, metric labels, lazily imported modules), which is not what a
    large body leaves behind."""
    for i in range(jobs):
        doc = {"input": {"request_id": f"warm-{i}-{time.time_ns()}", "workflow_json": _base()}}
        async with s.post(url + "/generate/sync", json=doc) as r:
            if r.status != 200:
                raise RuntimeError(f"warm-up job answered {r.status}: {await r.text()}")
            await r.read()


async def run_kind(
    kind: str, bodies: int, backend: str, root: Path, settle: float = 5.0
) -> dict[str, Any]:
    make = KINDS[kind]
    payloads = [make(i) for i in range(bodies)]
    (root / kind).mkdir(parents=True, exist_ok=True)
    with server(root / kind, backend, API_LOG_LEVEL="warning") as (url, pid):
        async with aiohttp.ClientSession() as s:
            for _ in range(20):  # warm the routes (first-request imports)
                async with s.get(url + "/health") as r:
                    await r.read()
            await warm_up(s, url)
            await asyncio.sleep(1.0)
            idle = rss_mb(pid)
            async with s.get(url + "/metrics") as r:
                lag0 = _lag(await r.text())
            health: list[float] = []
            others = 0
            stop = asyncio.Event()

            async def poll_health() -> None:
                async with aiohttp.ClientSession() as ps:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        async with ps.get(url + "/health") as r:
                            await r.read()
                        health.append(time.perf_counter() - t0)
                        await asyncio.sleep(0.01)

            async def other_client() -> None:
                nonlocal others
                async with aiohttp.ClientSession() as ps:
                    while not stop.is_set():
                        async with ps.get(url + "/queue-info") as r:
                            await r.read()
                        others += 1
                        await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(poll_health()), asyncio.create_task(other_client())]
            statuses: list[int] = []
            ids: list[str] = []
            per_body: list[float] = []
            t_start = time.perf_counter()
            for p in payloads:
                t0 = time.perf_counter()
                async with s.post(
                    url + "/generate", data=p, headers={"Content-Type": "application/json"}
                ) as r:
                    answer = await r.read()
                    statuses.append(r.status)
                    if r.status in (200, 201, 202):
                        ids.append(json.loads(answer)["id"])
                per_body.append(time.perf_counter() - t0)
            burst_s = time.perf_counter() - t_start
            # The jobs' stages decode the body again: the burst ends when every job has ended.
            jobs_s, outcomes = await _wait_finished(s, url, ids)
            stop.set()
            await asyncio.gather(*tasks)
            after_burst = rss_mb(pid)
            async with s.get(url + "/metrics") as r:
                lag1 = _lag(await r.text())
            await asyncio.sleep(settle)  # quiet: no request at all
            settled = rss_mb(pid)
    burst_max, exact = _burst_max(lag0, lag1)
    figures = {
        "body_mb": sum(len(p) for p in payloads) / len(payloads) / MiB,
        "statuses": sorted(set(statuses)),
        "job_outcomes": outcomes,
        "jobs_finished_s": jobs_s,
        "settle_s": settle,
        "per_body_ms_p50": pct(per_body, 0.5) * 1000,
        "per_body_ms_max": max(per_body) * 1000,
        "loop_lag_max_ms": burst_max * 1000,
        "loop_lag_max_exact": exact,
        "loop_lag_p99_bucket_ms": _p99_bucket(lag0, lag1) * 1000,
        "loop_lag_samples": lag1["count"] - lag0["count"],
        "health_n": len(health),
        "health_p50_ms": pct(health, 0.5) * 1000,
        "health_p99_ms": pct(health, 0.99) * 1000,
        "health_max_ms": max(health) * 1000 if health else float("nan"),
        "other_requests": others,
        "other_requests_per_s": others / burst_s if burst_s else float("nan"),
        "rss_idle_mb": idle,
        "rss_after_burst_mb": after_burst,
        "rss_settled_mb": settled,
        "rss_settled_vs_idle": settled / idle if idle else float("nan"),
    }
    print(
        f"{kind:>6}: {figures['body_mb']:.1f} MB x {bodies} -> {figures['statuses']},"
        f" jobs {outcomes or '-'} after {jobs_s:.1f} s;"
        f" loop lag max {'' if exact else '<= '}{figures['loop_lag_max_ms']:.1f} ms,"
        f" p99 <= {figures['loop_lag_p99_bucket_ms']:.0f} ms;"
        f" /health p50 {figures['health_p50_ms']:.1f} / p99 {figures['health_p99_ms']:.1f}"
        f" / max {figures['health_max_ms']:.1f} ms over {len(health)} polls;"
        f" {others} other requests ({figures['other_requests_per_s']:.0f}/s);"
        f" per body p50 {figures['per_body_ms_p50']:.0f} ms;"
        f" RSS idle {idle:.0f} -> {after_burst:.0f} -> {settled:.0f} MB ({settle:g} s quiet)"
        f" ({figures['rss_settled_vs_idle']:.2f}x)",
        flush=True,
    )
    return figures


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-hostile-", dir=os.environ.get("BENCH_TMP")))
    out: dict[str, Any] = {"bodies": args.bodies, "kinds": {}}
    with simulator(root) as backend:
        for kind in args.kinds:
            out["kinds"][kind] = await run_kind(kind, args.bodies, backend, root, args.settle)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bodies", type=int, default=10, help="bodies of each kind, one at a time")
    ap.add_argument(
        "--kinds",
        type=lambda v: [k for k in v.split(",") if k],
        default=list(KINDS),
        help="comma separated: " + ", ".join(KINDS),
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="quiet seconds after the last job ended before the settled RSS (default 5)",
    )
    add_json_arg(ap)
    args = ap.parse_args()
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s) {unknown}")
    figures = asyncio.run(main_async(args))
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
