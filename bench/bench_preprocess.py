"""Preprocess benchmark: prepare_job throughput, and memory while downloading a huge input.

    .venv/bin/python -m bench.bench_preprocess [--jobs 2000] [--concurrency 32] [--big-mib 1024]
        [--json PATH]

The file server runs in a child process (this same file with --serve) on 127.0.0.1, so the
measured process holds only comfyq's side. Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

MiB = 1024 * 1024


def make_png(seed: int, side: int = 16) -> bytes:
    """A valid PNG whose pixels depend on ``seed`` (distinct seeds, distinct bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(
        b"\x00" + bytes((seed * 31 + x * 7 + y) % 256 for x in range(side * 3)) for y in range(side)
    ) + seed.to_bytes(8, "big")
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --- the file server (child process) ------------------------------------------------------


async def serve() -> None:
    """Serve /img/{n}.png and /big?mib=N on 127.0.0.1 until stdin closes."""

    async def img(request: web.Request) -> web.Response:
        return web.Response(body=make_png(int(request.match_info["n"])), content_type="image/png")

    async def big(request: web.Request) -> web.StreamResponse:
        mib = int(request.query.get("mib", "1024"))
        head = make_png(0)
        block = bytes(MiB)
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = len(head) + mib * MiB
        await resp.prepare(request)
        await resp.write(head)
        for _ in range(mib):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/img/{n}.png", img)
    app.router.add_get("/big", big)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


# --- measurements -------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def rate(n: int, concurrency: int, job: Callable[[int], Awaitable[Any]]) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await job(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    from bench.common import write_json
    from comfyq.inputs import Downloader
    from comfyq.inputs.prepare import prepare_job
    from comfyq.netguard import AddressGuard
    from modifiers import ModifierRegistry

    server = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdin is not None
    port = int((await server.stdout.readline()).decode())
    base = f"http://127.0.0.1:{port}"
    registry = ModifierRegistry()
    tmp = Path(tempfile.mkdtemp(prefix="comfyq-bench-"))
    downloader = Downloader(
        tmp / "cache", AddressGuard(["127.0.0.1"]), max_bytes=(args.big_mib + 16) * MiB
    )
    n, c = args.jobs, args.concurrency
    print(f"prepare_job throughput ({n} jobs per scenario, {c} concurrent, server in a child)")
    try:
        raw = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
            },
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": "b___RANDOM_INT__"},
            },
        }

        async def run(job_input: dict[str, Any], i: int) -> None:
            await prepare_job(job_input, f"job-{i}", registry=registry, downloader=downloader)

        figures: dict[str, float] = {}
        figures["raw workflow, no inputs"] = await rate(
            n, c, lambda i: run({"workflow_json": raw}, i)
        )
        figures["modifier ImageEffects, no inputs"] = await rate(
            n, c, lambda i: run({"modifier": "ImageEffects", "modifications": {"width": 64}}, i)
        )
        cached_url = f"{base}/img/0.png"
        await downloader.fetch(cached_url)
        figures["modifier + cached URL input"] = await rate(
            n,
            c,
            lambda i: run(
                {"modifier": "ImageEffects", "modifications": {"input_image": cached_url}}, i
            ),
        )
        before = downloader.stats.downloads
        figures["modifier + uncached URL input"] = await rate(
            n,
            c,
            lambda i: run(
                {
                    "modifier": "ImageEffects",
                    "modifications": {"input_image": f"{base}/img/{i + 1}.png"},
                },
                i,
            ),
        )
        assert downloader.stats.downloads - before == n, "every uncached job must download"
        b64 = base64.b64encode(make_png(10**6, side=64)).decode()
        figures["raw workflow + base64 input.images"] = await rate(
            n,
            c,
            lambda i: run(
                {
                    "workflow_json": {
                        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}
                    },
                    "images": [{"name": "in.png", "image": b64}],
                },
                i,
            ),
        )
        await registry.check("Text2Image", {})  # warm: first use resolves the workflow file
        t0 = time.perf_counter()
        await asyncio.gather(
            *(registry.check("Text2Image", {"prompt": "x", "steps": 20}) for _ in range(n))
        )
        figures["admission check (Text2Image dry run)"] = n / (time.perf_counter() - t0)
        width = max(len(k) for k in figures)
        for k, v in figures.items():
            print(f"  {k:<{width}}  {v:9.0f} /s")
        cached, uncached = (
            figures["modifier + cached URL input"],
            figures["modifier + uncached URL input"],
        )
        print(f"  cached / uncached URL ratio: {cached / uncached:.1f}x")
        out: dict[str, Any] = {
            "args": {"jobs": n, "concurrency": c, "big_mib": args.big_mib},
            "rates": figures,
            "cached_over_uncached": cached / uncached,
        }

        if args.big_mib:
            print(f"\npeak RSS while downloading a {args.big_mib} MiB body from 127.0.0.1")
            samples: list[int] = []
            stop = asyncio.Event()

            async def sample() -> None:
                while not stop.is_set():
                    samples.append(rss_bytes())
                    await asyncio.sleep(0.02)

            baseline = rss_bytes()
            sampler = asyncio.create_task(sample())
            t0 = time.perf_counter()
            asset = await downloader.fetch(f"{base}/big?mib={args.big_mib}")
            elapsed = time.perf_counter() - t0
            stop.set()
            await sampler
            peak = max(samples + [rss_bytes()])
            print(
                f"  size {asset.size / MiB:.0f} MiB in {elapsed:.1f} s "
                f"({asset.size / MiB / elapsed:.0f} MiB/s), type {asset.mime}"
            )
            print(
                f"  RSS before {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
                f"growth {(peak - baseline) / MiB:.1f} MiB ({len(samples)} samples)"
            )
            asset.path.unlink()
            out["download"] = {
                "mib": asset.size / MiB,
                "seconds": elapsed,
                "mib_per_s": asset.size / MiB / elapsed,
                "rss_before_mib": baseline / MiB,
                "rss_peak_mib": peak / MiB,
                "rss_growth_mib": (peak - baseline) / MiB,
                "samples": len(samples),
            }
        write_json(args.json, out)
    finally:
        await downloader.close()
        server.stdin.close()
        await server.wait()
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        tmp.rmdir()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--big-mib", type=int, default=1024, help="0 skips the RSS part")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, too
    from bench.common import add_json_arg

    add_json_arg(parser)
    ns = parser.parse_args()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    asyncio.run(serve() if ns.serve else main(ns))
