"""What the v2 routes share, kept on the app beside comfyq's own API helpers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from comfyq.api.auth import principal
from comfyq.api.context import API, Api
from comfyq.store.model import Job, Stage, State
from comfyq.v2 import mapping
from comfyq.v2.blobs import BlobDir
from comfyq.v2.progress import Tracker


class V2:
    """The asset store, blob folder, progress tracker and stream counts of the v2 surface."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.settings = api.settings
        self.assets = api.store.assets()
        self.blobs = BlobDir(Path(self.settings.assets_dir).absolute())
        # Partner-node keys (extra_data.api_key_comfy_org), in memory only: never stored or logged.
        self.extra_data: dict[str, dict[str, Any]] = api.services.generate.extra_data
        self.tracker = Tracker(api.bus, self.extra_data)
        self.streams: Counter[str] = Counter()  # open event streams per owner

    def close(self) -> None:
        self.tracker.close()

    async def queue_position(self, job: Job) -> int | None:
        """1-based place among the jobs waiting in the job's stage; None unless it waits."""
        if job.state != State.PENDING:
            return 0 if job.stage == Stage.PREPROCESS else None
        snap = await self.api.queue.snapshot()
        pos = snap.positions.get(job.id)
        return pos if pos is not None else snap.waiting[job.stage] + 1

    async def read_job(self, job_id: str, request: web.Request | None = None) -> Job | None:
        """The job as v2 needs it (no payload, no workflow), or None when gone, expired or (with
        ``request``) not the caller's."""
        job = await self.api.reads.summary(job_id)
        if job is None:
            return None
        if request is not None and not sees(request, job.owner):
            return None
        return None if self.expired(job) else job

    def expired(self, job: Job) -> bool:
        """Past its expires_at (pruning has not come round yet): gone, as the contract says."""
        retention = self.settings.retention_seconds
        if retention <= 0 or job.finished_at is None:
            return False
        now: str = self.api.store.now_iso()
        return mapping.expires_at(job, retention) < now

    async def body(
        self, request: web.Request, job: Job, outputs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The v2 Job object of ``job`` (its outputs read unless given)."""
        if outputs is None and not job.terminal:
            outputs = []  # outputs are recorded in the commit that ends the job: nothing to read
        elif outputs is None:
            outputs = (await self.assets.job_outputs([job.id])).get(job.id, [])
        st = mapping.status(job)
        return mapping.job(
            job,
            outputs,
            origin=origin(request),
            retention=self.settings.retention_seconds,
            live=self.tracker.live(job.id),
            queue_position=await self.queue_position(job) if st == "queued" else None,
        )


V2_KEY: web.AppKey[V2] = web.AppKey("v2", V2)


def attach(app: web.Application) -> V2:
    """Build the v2 state for ``app`` (before it starts) and close it with the app."""
    v2 = app[V2_KEY] = V2(app[API])

    async def close(_: web.Application) -> None:
        v2.close()

    app.on_cleanup.append(close)
    return v2


def get_v2(request: web.Request) -> V2:
    return request.app[V2_KEY]


def origin(request: web.Request) -> str:
    """scheme://host of the request: outputs' and assets' absolute content URLs start with it."""
    return f"{request.scheme}://{request.host}"


def owner_of(request: web.Request) -> str:
    """What the caller's jobs and assets record as their owner: its key's id ('' without
    authentication). Never the key itself (comfyq.api.auth)."""
    return principal(request).owner or ""


def scope_of(request: web.Request) -> str | None:
    """Whose assets the caller may use: its own, or None (anyone's) for an admin key."""
    who = principal(request)
    return None if who.is_admin else (who.owner or "")


def sees(request: web.Request, owner: str | None) -> bool:
    """Whether the caller may see a job or asset of ``owner`` (404 otherwise, as for none)."""
    return principal(request).can_see(owner or None)
