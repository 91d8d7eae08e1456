"""The dashboard (issue 14): DOM update latency, jobs-page time at 100k jobs, server CPU per
connected dashboard.

1. ``latency``: a headless Chromium shows /ui (the jobs table) while ``--jobs`` jobs run; the page
   stamps every state change it renders (``window.__comfyqStamps``: the change's commit time from
   the event, and ``Date.now()`` after the DOM update). Figures: commit -> DOM p50/p99.
2. ``pages``: a database holding ``--big`` jobs (bulk-inserted, 90% completed), then the jobs
   page reads over loopback: first page, a state filter, a deep keyset page, an id search, the
   counts. Round trips over loopback: an upper bound on the server time.
3. ``cpu``: ``--rate`` jobs/s for ``--seconds`` with no dashboard, then with ``--dashboards``
   connected ones; the server's CPU seconds (from /proc) per second of each run; the difference
   per dashboard as a share of one core.

Targets (issue 14): DOM update p99 <= 250 ms; first page <= 50 ms at 100k jobs; a dashboard costs
<= 5 % of a core at 50 jobs/s. Figures are printed, never judged.

    .venv/bin/python -m bench.bench_ui [--jobs 200] [--big 100000] [--rate 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import add_json_arg, cpu_seconds, pct, server, simulator, write_json
from comfyq.store.sqlite.writer import connect

CHROMIUM = os.environ.get("COMFYQ_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
_colors = itertools.count(1)


def body() -> dict[str, Any]:
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": next(_colors)},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "ui"}},
    }
    return {"input": {"workflow_json": wf}}


def _at(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


async def _feed(url: str, n: int, rate: float) -> list[str]:
    """POST ``n`` jobs at ``rate`` per second; their ids."""
    ids: list[str] = []
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        pending = []
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

            async def one() -> None:
                async with s.post(url + "/generate", json=body()) as r:
                    ids.append((await r.json())["id"])

            pending.append(asyncio.ensure_future(one()))
        await asyncio.gather(*pending)
    return ids


async def _until_done(url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            async with s.get(url + "/queue-info") as r:
                if (await r.json())["unfinished"] == 0:
                    return
            await asyncio.sleep(0.1)


async def latency(url: str, n: int, rate: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(url + "/ui")
        await page.wait_for_function("() => document.getElementById('conn').textContent === 'live'")
        await _feed(url, n, rate)
        await _until_done(url)
        await page.wait_for_timeout(500)  # the last renders
        stamps = await page.evaluate("window.__comfyqStamps || []")
        await browser.close()
    delays = [(s["dom"] / 1000 - _at(s["at"])) for s in stamps if s.get("at")]
    final = [
        (s["dom"] / 1000 - _at(s["at"]))
        for s in stamps
        if s.get("at") and s["status"] in ("completed", "failed", "cancelled")
    ]
    return {
        "jobs": n,
        "rate": rate,
        "stamps": len(delays),
        "p50_ms": pct(delays, 0.5) * 1000,
        "p99_ms": pct(delays, 0.99) * 1000,
        "max_ms": max(delays) * 1000 if delays else float("nan"),
        "final_n": len(final),
        "final_p50_ms": pct(final, 0.5) * 1000,
        "final_p99_ms": pct(final, 0.99) * 1000,
    }


def fill(db: Path, n: int) -> float:
    """Bulk-insert ``n`` jobs (90% completed, 5% failed, 4% cancelled, 1% waiting); seconds."""
    from comfyq.store.sqlite.store import open_migrated

    open_migrated(db)
    t0 = time.perf_counter()
    conn = connect(db)
    base = time.time() - n * 0.05
    payload = json.dumps(body()["input"])
    rows = []
    for i in range(n):
        r = i % 100
        state = (
            "completed" if r < 90 else "failed" if r < 95 else "cancelled" if r < 99 else "pending"
        )
        created = datetime.fromtimestamp(base + i * 0.05, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        done = None if state == "pending" else created
        rows.append(
            (
                f"{int((base + i * 0.05) * 1000):012x}{i:020x}",
                state,
                "postprocess" if state != "pending" else "preprocess",
                "workflow",
                json.dumps({"input": json.loads(payload)}),
                "h",
                created,
                created,
                created,
                created,
                created,
                done,
                "{}",
            )
        )
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, state, stage, kind, payload, payload_hash, run_after, deadline_at,"
        " created_at, updated_at, stage_entered_at, finished_at, timings)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - t0


async def pages(url: str, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/ui/api/jobs?limit=50") as r:
            first = await r.json()
        cursor = first["next_cursor"]
        for _ in range(200):  # page 200 of 50: 10,000 rows deep
            async with s.get(url + f"/ui/api/jobs?limit=50&cursor={cursor}") as r:
                cursor = (await r.json())["next_cursor"]
        some_id = first["jobs"][7]["id"]
        cases = {
            "first_page": "/ui/api/jobs?limit=50",
            "filter_failed": "/ui/api/jobs?limit=50&status=failed",
            "filter_queued": "/ui/api/jobs?limit=50&status=queued",
            "deep_page_200": f"/ui/api/jobs?limit=50&cursor={cursor}",
            "search_id_prefix": f"/ui/api/jobs?limit=50&q={some_id[:14]}",
            "counts_cold": "/ui/api/counts",
            "v1_jobs_first_page": "/jobs?limit=50",
        }
        for name, path in cases.items():
            times = []
            for _ in range(samples):
                t = time.perf_counter()
                async with s.get(url + path) as r:
                    await r.read()
                    assert r.status == 200, (path, r.status)
                times.append(time.perf_counter() - t)
                if name == "counts_cold":
                    break  # later reads hit the cache (nothing changes)
            out[name] = {"p50_ms": pct(times, 0.5) * 1000, "p99_ms": pct(times, 0.99) * 1000}
    return out


async def cpu(
    url: str, pid: int, rate: float, seconds: float, dashboards: int, rounds: int
) -> dict[str, Any]:
    """Alternate runs without and with the dashboards open (the machine is shared: interleaving
    spreads other load over both sides); mean server cores of each side."""
    from playwright.async_api import async_playwright

    n = int(rate * seconds)

    async def run() -> float:
        await _until_done(url)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        await _feed(url, n, rate)
        await _until_done(url)
        return (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)

    without: list[float] = []
    with_ui: list[float] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pages_ = [
            await browser.new_page(viewport={"width": 1280, "height": 900})
            for _ in range(dashboards)
        ]
        for _ in range(rounds):
            for page in pages_:
                await page.goto("about:blank")
            without.append(await run())
            for page in pages_:
                await page.goto(url + "/ui")
                await page.wait_for_function(
                    "() => document.getElementById('conn').textContent === 'live'"
                )
            with_ui.append(await run())
        await browser.close()
    base = sum(without) / len(without)
    ui = sum(with_ui) / len(with_ui)
    return {
        "rate": rate,
        "seconds": seconds,
        "rounds": rounds,
        "dashboards": dashboards,
        "server_cores_without": base,
        "server_cores_with": ui,
        "runs_without": without,
        "runs_with": with_ui,
        "per_dashboard_core_pct": (ui - base) / dashboards * 100,
    }


async def _emulated(url: str, stop: asyncio.Event) -> None:
    """What one open jobs page asks of the server: /ws subscribed to "*" (every frame read), the
    page of rows at most once a second and the counts every 1.5 s while jobs change."""
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/ws", protocols=("comfyq",)) as ws:
        await ws.send_json({"subscribe": "*"})

        async def poll() -> None:
            n = 0
            while not stop.is_set():
                async with s.get(url + "/ui/api/jobs?limit=50") as r:
                    await r.read()
                if n % 3 == 0:
                    async with s.get(url + "/ui/api/counts") as r:
                        await r.read()
                n += 2
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass

        poller = asyncio.ensure_future(poll())
        while not stop.is_set():
            try:
                await ws.receive(0.5)
            except TimeoutError:
                continue
        await poller


async def cpu_emulated(
    url: str, pid: int, rate: float, seconds: float, clients: int
) -> dict[str, Any]:
    """The server's cost of ``clients`` emulated dashboards (no browser competing for the CPU):
    the same job flow without and with them, interleaved twice."""
    n = int(rate * seconds)

    async def run(with_clients: bool) -> float:
        await _until_done(url)
        stop = asyncio.Event()
        tasks = [
            asyncio.ensure_future(_emulated(url, stop))
            for _ in range(clients if with_clients else 0)
        ]
        await asyncio.sleep(0.5)
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        await _feed(url, n, rate)
        await _until_done(url)
        used = (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
        stop.set()
        await asyncio.gather(*tasks)
        return used

    without, with_ = [], []
    for _ in range(2):
        without.append(await run(False))
        with_.append(await run(True))
    base, loaded = sum(without) / 2, sum(with_) / 2
    return {
        "clients": clients,
        "server_cores_without": base,
        "server_cores_with": loaded,
        "runs_without": without,
        "runs_with": with_,
        "per_dashboard_core_pct": (loaded - base) / clients * 100,
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-ui-", dir=os.environ.get("BENCH_TMP")))
    out: dict[str, Any] = {"args": vars(args) | {"json": None}}
    workers = "8"
    with (
        simulator(root / "a") as sim,
        server(root / "a", sim, COMFYQ_GENERATION_WORKERS=workers) as (url, _pid),
    ):
        print(f"latency: {args.jobs} jobs at {args.latency_rate}/s with /ui open", flush=True)
        out["latency"] = await latency(url, args.jobs, args.latency_rate)
        lat = out["latency"]
        print(
            f"  commit -> DOM: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
            f" over {lat['stamps']} state changes (final states: p99"
            f" {lat['final_p99_ms']:.1f} ms)",
            flush=True,
        )
    big = root / "big"
    big.mkdir()
    took = fill(big / "q.db", args.big)
    print(f"pages: {args.big} jobs inserted in {took:.1f} s", flush=True)
    with simulator(big) as sim, server(big, sim, COMFYQ_GENERATION_WORKERS=workers) as (url, _pid):
        out["pages"] = await pages(url, args.samples)
    out["pages"]["jobs_in_db"] = args.big
    for name, v in out["pages"].items():
        if isinstance(v, dict):
            print(f"  {name}: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms", flush=True)
    with (
        simulator(root / "c") as sim,
        server(root / "c", sim, COMFYQ_GENERATION_WORKERS=workers) as (url, pid),
    ):
        out["cpu"] = await cpu(url, pid, args.rate, args.seconds, args.dashboards, args.rounds)
        out["cpu_emulated"] = await cpu_emulated(url, pid, args.rate, args.seconds, args.emulated)
    e = out["cpu_emulated"]
    print(
        f"cpu: {args.emulated} emulated dashboards (ws '*' + the page's reads, no browser):"
        f" server {e['server_cores_without'] * 100:.1f}% -> {e['server_cores_with'] * 100:.1f}%"
        f" of a core: {e['per_dashboard_core_pct']:.2f}% per dashboard",
        flush=True,
    )
    c = out["cpu"]
    print(
        f"cpu: {args.rate} jobs/s: server {c['server_cores_without'] * 100:.1f}% of a core without"
        f" a dashboard, {c['server_cores_with'] * 100:.1f}% with {args.dashboards}:"
        f" {c['per_dashboard_core_pct']:.2f}% of a core per dashboard",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200, help="jobs whose state changes are timed")
    ap.add_argument("--latency-rate", type=float, default=20.0, help="their admission rate")
    ap.add_argument("--big", type=int, default=100_000, help="jobs in the database for pages")
    ap.add_argument("--samples", type=int, default=50, help="reads per page kind")
    ap.add_argument("--rate", type=float, default=50.0, help="jobs/s for the CPU measurement")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each CPU run")
    ap.add_argument("--dashboards", type=int, default=3, help="dashboards connected")
    ap.add_argument("--rounds", type=int, default=3, help="runs without and with, alternated")
    ap.add_argument("--emulated", type=int, default=20, help="emulated dashboards (no browser)")
    add_json_arg(ap)
    args = ap.parse_args(argv)
    out = asyncio.run(amain(args))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
