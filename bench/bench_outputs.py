"""Outputs: S3 upload throughput and this process's memory while a large output goes up; webhook
deliveries per second to a fast receiver; and what a receiver that hangs does to the latency of
other jobs and of their webhooks (the target is: nothing).

The S3 server (moto) and the fast receiver run in processes of their own, so their memory and CPU
are not counted as comfyq's. Moto is a Python server: upload rates are bounded by it, not by S3.

    .venv/bin/python -m bench.bench_outputs [--size-mb 500] [--deliveries 2000] [--jobs 60]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import boto3  # type: ignore[import-untyped]
from aiohttp import web

from bench.bench_e2e import start_simulators, timed_job, workflow
from bench.common import add_json_arg, free_port, pct, summary_ms, write_json
from comfyq.clock import parse_iso
from comfyq.config import load_settings
from comfyq.netguard import AddressGuard
from comfyq.outputs.s3 import LocalFile, S3Settings, S3Uploader
from comfyq.services import Services
from comfyq.store import NewJob, open_store
from comfyq.webhooks import WebhookConfig, WebhookSender

MiB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples this process's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


# --- S3 ----------------------------------------------------------------------------------------


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    for _ in range(200):
        try:
            s3.create_bucket(Bucket="bench-outputs")
            return proc, url
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.05)
    raise RuntimeError("moto server did not start")


def make_file(path: Path, size: int) -> LocalFile:
    h = hashlib.sha256()
    block = os.urandom(8 * MiB)
    with path.open("wb") as f:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return LocalFile(path.name, path, "video/mp4", size, h.hexdigest())


async def bench_upload(size_mb: int, root: Path) -> dict[str, Any]:
    proc, url = start_moto()
    out: dict[str, Any] = {"streaming": []}
    try:
        f = make_file(root / "big.mp4", size_mb * MiB)
        up = S3Uploader(
            S3Settings(
                access_key_id="k",
                secret_access_key="s",
                bucket="bench-outputs",
                endpoint_url=url,
                region="us-east-1",
            )
        )
        target = up.target(None, None)
        assert target is not None
        print(
            "S3 upload to moto (separate process);"
            f" multipart {up.settings.part_size // MiB} MiB parts,"
            f" {up.settings.part_concurrency} in flight"
        )
        small = make_file(root / "warm.mp4", 20 * MiB)
        [res] = await up.upload_all(target, "warm-up", [small])  # loads botocore's models once
        assert res.error is None, res.error
        for label, lf in ((f"{small.size // MiB} MB", small), (f"{size_mb} MB", f)):
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                [res] = await up.upload_all(target, f"bench-{label}", [lf])
                elapsed = time.perf_counter() - t0
            assert res.error is None, res.error
            print(
                f"  streaming {label:>7s}: {lf.size / MiB / elapsed:7.1f} MB/s  ({elapsed:5.1f} s)"
                f"  RSS {mem.base / MiB:6.0f} MiB -> peak {mem.peak / MiB:6.0f} MiB"
                f"  (+{(mem.peak - mem.base) / MiB:.0f} MiB)"
            )
            out["streaming"].append(_upload_figures(lf.size, elapsed, mem))

        # The original wrapper's way, for comparison: read the whole file, one put_object.
        async with up._client(target) as client:  # the same client settings
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                body = await asyncio.to_thread(f.path.read_bytes)
                await client.put_object(Bucket="bench-outputs", Key="seed-style/big.mp4", Body=body)
                del body
                elapsed = time.perf_counter() - t0
        print(
            f"  whole-file {size_mb:>4d} MB: {size_mb / elapsed:7.1f} MB/s  ({elapsed:5.1f} s)"
            f"  RSS {mem.base / MiB:6.0f} MiB"
            f" -> peak {mem.peak / MiB:6.0f} MiB  (+{(mem.peak - mem.base) / MiB:.0f} MiB)"
            "  [seed wrapper style]"
        )
        out["whole_file"] = _upload_figures(f.size, elapsed, mem)
    finally:
        proc.kill()
        proc.wait()
    return out


def _upload_figures(size: int, elapsed: float, mem: PeakRSS) -> dict[str, float]:
    return {
        "mb": size / MiB,
        "seconds": elapsed,
        "mb_per_s": size / MiB / elapsed,
        "rss_base_mib": mem.base / MiB,
        "rss_peak_mib": mem.peak / MiB,
        "rss_growth_mib": (mem.peak - mem.base) / MiB,
    }


# --- webhooks ----------------------------------------------------------------------------------

RECEIVER = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post("/hook", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def start_receiver() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}/hook"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("receiver did not start")


async def bench_delivery_rate(n: int, root: Path) -> list[dict[str, float]]:
    proc, url = start_receiver()
    out = []
    try:
        print(
            "webhook deliveries to a fast receiver (separate process),"
            f" {n} deliveries queued, signed"
        )
        for per_host, concurrency in ((8, 16), (16, 16), (64, 64)):
            store = open_store(root / f"wh-{per_host}-{concurrency}.db")
            await store.open()
            for i in range(n):
                await store.create(
                    NewJob(
                        id=f"w{i}",
                        payload={"input": {"webhook": {"url": url}}},
                        payload_hash=str(i),
                        secrets={"webhook_secret": "bench-secret"},
                    ),
                    n + 1,
                )
            await asyncio.gather(*(store.request_cancel(f"w{i}") for i in range(n)))
            sender = WebhookSender(
                store,
                AddressGuard(["127.0.0.1"]),
                WebhookConfig(per_host=per_host, per_endpoint=per_host, concurrency=concurrency),
            )
            t0 = time.perf_counter()
            await sender.start()
            while sender.delivered < n:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - t0
            await sender.stop()
            await store.close()
            print(
                f"  {per_host:2d} in flight to the receiver, {concurrency:2d} in total:"
                f" {n / elapsed:7.1f} deliveries/s"
            )
            out.append({"per_host": per_host, "concurrency": concurrency, "rate": n / elapsed})
    finally:
        proc.kill()
        proc.wait()
    return out


class Clockwork:
    """An in-process receiver: fast (records arrival times) or hanging."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}

    async def fast(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.arrived[body["id"]] = time.time()
        return web.Response(status=204)

    async def hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(status=204)


async def bench_hanging_receiver(jobs: int, root: Path) -> list[dict[str, Any]]:
    procs, urls = start_simulators(1, root)
    out: list[dict[str, Any]] = []
    cw = Clockwork()
    sites = []
    for _ in range(2):  # two receivers: two hosts (host:port) as far as the sender is concerned
        app = web.Application()
        app.router.add_post("/fast", cw.fast)
        app.router.add_post("/hang", cw.hang)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        sites.append((runner, f"http://127.0.0.1:{port}"))
    fast_host, other_host = sites[0][1], sites[1][1]
    settings = load_settings(
        env={},
        overrides={
            "database": str(root / "q.db"),
            "output_dir": str(root / "out"),
            "cache_dir": str(root / "cache"),
            "max_queue_size": "100000",
            "url_allowlist": "127.0.0.1",
            "webhook_timeout": "60",
            "api_log_level": "warning",
        },
    )
    svc = Services(settings, backends=urls)
    await svc.start()
    sender = svc.webhooks  # Services builds and starts it: a second sender would compete with it
    try:
        await svc.pool.wait_ready(10)
        print(
            "a receiver that hangs vs. other jobs:"
            f" {jobs} sequential jobs with a fast webhook each;"
            f" posts in flight capped at {sender.cfg.per_endpoint}/endpoint,"
            f" {sender.cfg.per_host}/host,"
            f" {sender.cfg.concurrency} total"
        )
        scenarios = (
            ("no hanging receiver", None),
            ("32 hang, other host", f"{other_host}/hang"),
            ("32 hang, same host", f"{fast_host}/hang"),
        )
        for n, (label, hang_url) in enumerate(scenarios):
            if hang_url:
                for i in range(32):  # jobs whose webhooks hang for webhook_timeout (60 s)
                    await run_job(svc, f"h{n}-{i}", f"{hang_url}?job={i}", 500 * n + i)
            lat, hook = [], []
            for i in range(jobs):
                job_id = f"f{n}-{i}"
                lat.append(
                    await run_job(
                        svc, job_id, f"{fast_host}/fast?job={job_id}", 100_000 * (n + 1) + i
                    )
                )
                t0 = time.perf_counter()
                while job_id not in cw.arrived and time.perf_counter() - t0 < 30:
                    await asyncio.sleep(0.001)
                job = await svc.store.get(job_id)
                assert job is not None and job.finished_at is not None
                hook.append(cw.arrived.get(job_id, time.time()) - parse_iso(job.finished_at))
            print(
                f"  {label:20s}: job p50 {1000 * pct(lat, 0.5):6.1f} ms"
                f"  p95 {1000 * pct(lat, 0.95):6.1f} ms | "
                f"webhook after job end p50 {1000 * pct(hook, 0.5):6.1f} ms"
                f"  p95 {1000 * pct(hook, 0.95):6.1f} ms"
                f"  (posts hanging: {sender.in_flight})"
            )
            out.append(
                {
                    "label": label,
                    "job_ms": summary_ms(lat),
                    "webhook_after_end_ms": summary_ms(hook),
                    "hanging": sender.in_flight,
                }
            )
    finally:
        await sender.stop(grace=0)  # the hanging posts are cut now; the rest of svc stops as usual
        await svc.stop()
        for runner, _ in sites:
            await runner.cleanup()
        for p in procs:
            p.kill()
            p.wait()
    return out


async def run_job(svc: Services, job_id: str, hook: str, i: int) -> float:
    return await timed_job(svc, job_id, {"workflow_json": workflow(i), "webhook": {"url": hook}})


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--deliveries", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=60)
    add_json_arg(ap)
    args = ap.parse_args()
    out: dict[str, Any] = {
        "args": {"size_mb": args.size_mb, "deliveries": args.deliveries, "jobs": args.jobs}
    }
    print(f"outputs benchmark, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as d:
        out["upload"] = await bench_upload(args.size_mb, Path(d))
    with tempfile.TemporaryDirectory() as d:
        out["deliveries"] = await bench_delivery_rate(args.deliveries, Path(d))
    with tempfile.TemporaryDirectory() as d:
        out["hanging"] = await bench_hanging_receiver(args.jobs, Path(d))
    write_json(args.json, out)


if __name__ == "__main__":
    asyncio.run(main())
