"""Figures for the peers' features (issue 15): multipart uploads are streamed (server memory does
not grow with the file), output conversion cost with Pillow, and how long a supervised ComfyUI
(the simulator) takes from SIGKILL to taking jobs again. Prints figures; never fails on time.

    .venv/bin/python -m bench.bench_peers [--upload-mb 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from comfyq.app import create_app
from comfyq.config import Settings
from comfyq.outputs.convert import ConvertSpec, convert_file
from comfyq.services import Services
from comfyq.sim import Simulator

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _serve(settings: Settings) -> tuple[web.AppRunner, str, Services]:
    services = Services(settings)
    runner = web.AppRunner(create_app(services), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}", services


def _settings(root: Path, backend: str, **kw: Any) -> Settings:
    return Settings(
        database=str(root / "q.db"),
        output_dir=str(root / "out"),
        cache_dir=str(root / "cache"),
        comfyui_api_base=backend,
        backend_probe_interval=0.2,
        **kw,
    )


async def upload(root: Path, mb: int) -> dict[str, Any]:
    """One multipart upload of ``mb`` MB; the server's RSS is sampled while it streams to disk."""
    sim = Simulator(port=0, data_dir=root / "sim")
    await sim.start()
    runner, url, _ = await _serve(_settings(root / "up", sim.url, max_body_bytes=(mb + 1) << 20))
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(png, "PNG")
    head = png.getvalue()
    peak = before = _rss_mb()
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mb())
            await asyncio.sleep(0.01)

    async def body() -> AsyncIterator[bytes]:
        yield head
        chunk = b"\0" * (1 << 20)
        for _ in range(mb):
            yield chunk

    sampler = asyncio.create_task(sample())
    form = aiohttp.FormData()
    form.add_field(
        "request",
        json.dumps(
            {
                "input": {
                    "workflow_json": {"1": {"class_type": "LoadImage", "inputs": {"image": "big"}}}
                }
            }
        ),
    )
    form.add_field("big", body(), filename="big.png")
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s, s.post(url + "/generate", data=form) as r:
        status = r.status
    seconds = time.perf_counter() - t0
    done.set()
    await sampler
    await runner.cleanup()
    await sim.stop()
    return {
        "upload_mb": mb,
        "status": status,
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 1),
        "rss_growth_mb": round(peak - before, 1),
    }


def conversion(root: Path, reps: int = 5) -> dict[str, Any]:
    """Pillow conversion of a 1024x1024 PNG output (a noisy image, so the codecs work)."""
    src = root / "src.png"
    Image.effect_noise((1024, 1024), 64).convert("RGB").save(src, "PNG")
    out: dict[str, Any] = {"png_bytes": src.stat().st_size}
    for spec in (
        ConvertSpec("jpeg", 90),
        ConvertSpec("webp", 80),
        ConvertSpec("jpeg", 85, 512),
    ):
        times, size = [], 0
        for i in range(reps):
            copy = root / f"c{i}.png"
            copy.write_bytes(src.read_bytes())
            dest = root / f"c{i}.out"
            t0 = time.perf_counter()
            convert_file(copy, dest, spec)
            times.append(time.perf_counter() - t0)
            size = dest.stat().st_size
        key = f"{spec.format}_q{spec.quality}" + (f"_max{spec.max_side}" if spec.max_side else "")
        out[key] = {"ms_median": round(statistics.median(times) * 1000, 1), "bytes": size}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def restart(root: Path, rounds: int = 3) -> dict[str, Any]:
    """SIGKILL of the supervised simulator -> its backend healthy again, seconds."""
    port = _free_port()
    command = f"{shlex.quote(sys.executable)} -m comfyq.sim --port {{port}}"
    settings = _settings(
        root / "sup",
        f"http://127.0.0.1:{port}",
        comfyui_command=command,
        comfyui_workdir=str(ROOT),
        comfyui_restart_delay=0.1,
    )
    runner, _, services = await _serve(settings)
    be = services.pool.backends[0]
    sup = services.supervisors[0]
    took: list[float] = []
    while not be.healthy:
        await asyncio.sleep(0.01)
    for _ in range(rounds):
        assert sup.pid is not None
        os.kill(sup.pid, signal.SIGKILL)
        t0 = time.perf_counter()
        while be.healthy:
            await asyncio.sleep(0.005)
        while not be.healthy:
            await asyncio.sleep(0.005)
        took.append(time.perf_counter() - t0)
    await runner.cleanup()
    return {
        "restart_delay_s": 0.1,
        "kill_to_healthy_s": [round(t, 2) for t in took],
        "note": "includes the restart delay (0.1 s doubling per quick death) and the"
        " interpreter start of the simulator",
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upload-mb", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        figures = {
            "upload": await upload(root, args.upload_mb),
            "conversion": await asyncio.to_thread(conversion, root),
            "supervised_restart": await restart(root),
        }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
