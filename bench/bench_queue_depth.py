"""How comfyq answers with a deep queue, to choose ``MAX_QUEUE_SIZE`` from measurement (#13).

``comfyq serve`` (default settings but the queue limit lifted, SQLite) in front of a ComfyUI
address where nothing listens, so every admitted job stays queued (pending in generate) and the
queue only grows. At each depth (jobs waiting) it measures, as a client sees them: POST /generate
(durable admission), GET /result/{id} of the newest job (its queue position and ETA), GET
/queue-info, GET /jobs (first page), and the server's RSS and database size.

    .venv/bin/python -m bench.bench_queue_depth [--depths 0,1000,10000,50000] [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.bench_api import workflow
from bench.common import add_json_arg, free_port, rss_mb, server, summary_ms, write_json


async def fill(session: aiohttp.ClientSession, url: str, n: int, concurrency: int = 32) -> str:
    """Admit ``n`` jobs; the id of the last one admitted."""
    left = iter(range(n))
    last = ""

    async def worker() -> None:
        nonlocal last
        for i in left:
            body = {"input": {"workflow_json": workflow(i % 0xFFFFFF, False)}}
            async with session.post(url + "/generate", json=body) as r:
                if r.status != 202:
                    raise RuntimeError(f"POST /generate answered {r.status}: {await r.text()}")
                last = (await r.json())["id"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return last


async def timed(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> float:
    t0 = time.perf_counter()
    async with session.request(method, url, **kw) as r:
        await r.read()
        if r.status >= 400:
            raise RuntimeError(f"{method} {url} answered {r.status}")
    return time.perf_counter() - t0


async def run(depths: list[int], samples: int, root: Path) -> list[dict[str, Any]]:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: jobs wait for a backend
    rows = []
    with server(root, dead, MAX_QUEUE_SIZE="100000000") as (url, pid):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            depth = 0
            for target in depths:
                if target > depth:
                    await fill(s, url, target - depth)
                    depth = target
                admit, result, info, page = [], [], [], []
                last = await fill(s, url, 1, 1)
                depth += 1
                for i in range(samples):
                    body = {"input": {"workflow_json": workflow(i, False)}}
                    admit.append(await timed(s, "POST", url + "/generate", json=body))
                    depth += 1
                    result.append(await timed(s, "GET", f"{url}/result/{last}"))
                    info.append(await timed(s, "GET", url + "/queue-info"))
                    if i % 4 == 0:
                        page.append(await timed(s, "GET", url + "/jobs?limit=50"))
                db = sum(p.stat().st_size for p in root.glob("q.db*"))
                rows.append(
                    {
                        "depth": target,
                        "admit": summary_ms(admit),
                        "result_with_position": summary_ms(result),
                        "queue_info": summary_ms(info),
                        "jobs_page": summary_ms(page),
                        "rss_mb": round(rss_mb(pid), 1),
                        "db_mb": round(db / 1e6, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="0,1000,10000,50000")
    ap.add_argument("--samples", type=int, default=200)
    add_json_arg(ap)
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="comfyq-depth-") as tmp:
        rows = asyncio.run(run([int(d) for d in args.depths.split(",")], args.samples, Path(tmp)))
    write_json(args.json, {"depths": rows})


if __name__ == "__main__":
    main()
