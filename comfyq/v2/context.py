"""What the v2 routes share, kept on the app beside comfyq's own API helpers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.auth import principal
from comfyq.api.context import API, Api
from comfyq.clock import parse_iso
from comfyq.store.assets import AssetRecord, output_asset
from comfyq.store.model import Job, Stage, State
from comfyq.v2 import mapping
from comfyq.v2.blobs import BlobDir
from comfyq.v2.progress import Live, Tracker

CACHED = 1024  # jobs (and output assets) whose reads and answers are kept, oldest dropped first
# Larger answers (jobs with many outputs) are built per poll: the caches stay a few megabytes.
ANSWER_MAX = 16 * 1024
ROWS_MAX = 16
_encode = msgspec.json.Encoder().encode


def _keep(cache: dict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > CACHED:
        del cache[next(iter(cache))]


def _stamp(job: Job, live: Live | None, position: int | None) -> tuple[Any, ...]:
    """What a v2 Job object is made of besides its fixed fields: every write to a job's row
    moves updated_at (a cancel request, the error, timings and the prompt id included; state,
    stage, attempts and finished_at guard against two writes in one clock tick), the live
    progress its seq, the queue its position. Only columns of the stream head (Reads.head)."""
    return (
        job.updated_at,
        job.state,
        job.stage,
        job.attempts,
        job.finished_at,
        -1 if live is None else live.seq,
        position,
    )


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
        # A terminal job's output rows are written by the commit that ends it and stay as they are
        # while the job is kept (a retry moves updated_at): read once per job and end.
        self._outputs: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        # Output assets by id, with the updated_at of their job's end (content URLs: one read).
        self._output_assets: dict[str, tuple[str, AssetRecord]] = {}
        # The encoded answer of GET /api/v2/jobs/{id} per (job, origin), with what it was made of:
        # polls that find the job as it was reuse the bytes.
        self._answers: dict[
            tuple[str, str], tuple[tuple[Any, ...], bytes, str, tuple[int, int]]
        ] = {}

    def close(self) -> None:
        self.tracker.close()

    async def queue_position(self, job: Job) -> int | None:
        """1-based place among the jobs waiting in the job's stage; None unless it waits."""
        if job.state != State.PENDING:
            return 0 if job.stage == Stage.PREPROCESS else None
        snap = await self.api.queue.snapshot()
        pos = snap.positions.get(job.id)
        return pos if pos is not None else snap.waiting[job.stage] + 1

    async def read_job(
        self, job_id: str, request: web.Request | None = None, *, head: bool = False
    ) -> Job | None:
        """The job as v2 needs it (no payload, no workflow), or None when gone, expired or (with
        ``request``) not the caller's. ``head``: only the columns of comfyq's stream head (state,
        stage, times, owner; read without a thread hop), enough to say whether it is there."""
        reads = self.api.reads
        job = await (reads.head(job_id) if head else reads.summary(job_id))
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
        # mapping.expires_at(job) < now, in seconds (no text formatted per read).
        now: float = self.api.store.clock.now()
        ends: float = parse_iso(job.finished_at) + retention
        return ends < now

    async def outputs(self, job: Job) -> list[dict[str, Any]]:
        """A job's output rows: none before it ends (they are recorded in the commit that ends
        it), then read once for that end."""
        if not job.terminal:
            return []
        hit = self._outputs.get(job.id)
        if hit is not None and hit[0] == job.updated_at:
            return hit[1]
        rows: list[dict[str, Any]] = (await self.assets.job_outputs([job.id])).get(job.id, [])
        self.remember(job, rows)
        return rows

    def remember(self, job: Job, rows: list[dict[str, Any]]) -> None:
        """Keep the output rows of a terminal ``job`` (as read with it) and their assets."""
        if not job.terminal:
            return
        if len(rows) <= ROWS_MAX:
            _keep(self._outputs, job.id, (job.updated_at, rows))
        for row in rows:
            if row.get("asset_id"):
                _keep(self._output_assets, row["asset_id"], (job.updated_at, output_asset(row)))

    def output_asset(self, asset_id: str) -> tuple[str, AssetRecord] | None:
        """An output asset seen in a job's outputs, with the updated_at of that job's end (the
        caller checks the job is still that one)."""
        return self._output_assets.get(asset_id)

    async def body(
        self, request: web.Request, job: Job, outputs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The v2 Job object of ``job`` (its outputs read unless given)."""
        if outputs is None:
            outputs = await self.outputs(job)
        st = mapping.status(job)
        return mapping.job(
            job,
            outputs,
            origin=origin(request),
            retention=self.settings.retention_seconds,
            live=self.tracker.live(job.id),
            queue_position=await self.queue_position(job) if st == "queued" else None,
        )

    def answered(self, request: web.Request, job_id: str, seen: tuple[int, int]) -> bool:
        """Whether an answer of this job was built since the last change this process heard of
        (``seen``: ``tracker.version``); ``reuse`` may then find it still right."""
        hit = self._answers.get((job_id, origin(request)))
        return hit is not None and hit[3] == seen

    async def reuse(self, request: web.Request, head: Job) -> bytes | None:
        """The answer built before, when the job (read with ``read_job(head=True)``), its live
        progress and its queue position are still what it was built from; else None."""
        hit = self._answers.get((head.id, origin(request)))
        if hit is None:
            return None
        stamp, data, st, _ = hit
        position = await self.queue_position(head) if st == "queued" else None
        return data if _stamp(head, self.tracker.live(head.id), position) == stamp else None

    async def answer(
        self, request: web.Request, job: Job, seen: tuple[int, int] | None = None
    ) -> tuple[bytes, list[dict[str, Any]] | None]:
        """``body`` encoded, reused while the job, its live progress and its queue position
        are what they were when it was built; with the v2 outputs in it when it was built now
        (None when reused)."""
        live = self.tracker.live(job.id)
        st = mapping.status(job)
        position = await self.queue_position(job) if st == "queued" else None
        where = origin(request)
        key = (job.id, where)
        stamp = _stamp(job, live, position)
        hit = self._answers.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1], None
        rows = await self.outputs(job)
        body = mapping.job(
            job,
            rows,
            origin=where,
            retention=self.settings.retention_seconds,
            live=live,
            queue_position=position,
        )
        data = _encode(body)
        # What was heard of the job before it was read (``seen``), else now.
        heard = seen if seen is not None else self.tracker.version(job.id)
        if len(data) <= ANSWER_MAX:
            _keep(self._answers, key, (stamp, data, st, heard))
        return data, body["outputs"]


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
