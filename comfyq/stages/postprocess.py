"""Postprocess: fetch every output over HTTP into the job's folder and record it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiofiles

from comfyq.comfy.backends import BackendPool
from comfyq.errors import ComfyUIUnreachable
from comfyq.outputs.local import describe, job_dir, list_outputs, safe_name
from comfyq.stages.runner import JobContext, StageDone
from comfyq.store import Job


class Postprocess:
    def __init__(self, pool: BackendPool, output_dir: Path) -> None:
        self.pool = pool
        self.output_dir = output_dir

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        result = dict(job.result or {})
        items = list_outputs(result.get("outputs") or {})
        folder = job_dir(self.output_dir, job.id)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        be = self.pool.get(job.comfy_backend or "")
        used: set[str] = set()
        for item in items:
            name = _unique(safe_name(item.filename, item.subfolder), used)
            dest = folder / name
            if item.text is not None:
                async with aiofiles.open(dest, "w") as f:
                    await f.write(item.text)
            else:
                if be is None:
                    raise ComfyUIUnreachable(f"backend {job.comfy_backend} is not configured any more")
                await be.client.download(item.filename, item.subfolder, item.comfy_type, dest)
            sha, size, mime = await describe(dest)
            row: dict[str, Any] = {
                "filename": name, "node_id": item.node_id, "output_type": item.output_type,
                "comfy_type": item.comfy_type, "subfolder": item.subfolder, "mimetype": mime,
                "size": size, "sha256": sha, "local_path": str(dest),
                "url": f"/outputs/{job.id}/{name}",
            }
            await ctx.store.put_output(job.id, row)
        return StageDone("Processing complete.")


def _unique(name: str, used: set[str]) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while candidate in used:
        candidate = f"{stem}_{n}{dot}{ext}"
        n += 1
    used.add(candidate)
    return candidate
