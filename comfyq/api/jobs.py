"""Jobs: results, listing, cancelling, queue sizes and output downloads."""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import stat
from pathlib import Path

import msgspec
from aiohttp import web

from comfyq.api.auth import principal, visible
from comfyq.api.context import Api, get_api, json_response
from comfyq.api.fileresponse import file_response
from comfyq.cluster.files import OutputRouter
from comfyq.errors import BadRequest, ComfyqError, NotFound
from comfyq.outputs.convert import ConversionError, thumbnail
from comfyq.outputs.local import job_dir
from comfyq.schemas import JobList
from comfyq.store.base import STATUS_FILTERS
from comfyq.store.model import Job, State

# Result statuses (and the raw states) a listing can filter on.
STATUS_SQL = STATUS_FILTERS
MAX_LIMIT = 500


def not_found(job_id: str) -> NotFound:
    return NotFound(f"job {job_id} not found", details={"job_id": job_id})


async def visible_head(api: Api, request: web.Request, job_id: str) -> Job:
    """The job's few stream columns, or 404 when it does not exist or is another client's."""
    job = await api.reads.head(job_id)
    if job is None or not visible(request, job.owner):
        raise not_found(job_id)
    return job


async def result(request: web.Request) -> web.Response:
    """GET /result/{id} and GET /jobs/{id}: the Result in every state."""
    api = get_api(request)
    job_id = request.match_info["id"]
    job = await api.reads.job(job_id)
    if job is None or not visible(request, job.owner):
        raise not_found(job_id)
    return json_response(await api.results.of(job))


async def cancel(request: web.Request) -> web.Response:
    """POST /cancel/{id} and DELETE /jobs/{id}: cancel; a running job gets a moment to stop."""
    api = get_api(request)
    job_id = request.match_info["id"]
    await visible_head(api, request, job_id)
    with api.bus.subscribe(job_id, maxsize=4, finals_only=True) as sub:
        job = await api.pipeline.cancel(job_id)  # NotFound -> 404
        if job.state == State.RUNNING:
            from comfyq.api.generate import wait_final

            job = await wait_final(api, sub, job, api.options.cancel_wait)
        else:
            job = await api.reads.job(job_id) or job
    return json_response(await api.results.of(job))


async def queue_info(request: web.Request) -> web.Response:
    """GET /queue-info"""
    return json_response(await get_api(request).queue.info())


def _bad(param: str, message: str) -> BadRequest:
    return BadRequest(
        f"{param}: {message}", fields=[{"path": f"$.query.{param}", "message": message}]
    )


def encode_cursor(job: Job) -> str:
    return (
        base64.urlsafe_b64encode(msgspec.json.encode([job.created_at, job.id])).decode().rstrip("=")
    )


def decode_cursor(text: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, job_id = msgspec.json.decode(raw, type=tuple[str, str])
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise _bad("cursor", "not a cursor this server handed out") from None
    return created_at, job_id


def _statuses(request: web.Request) -> list[str]:
    wanted = [
        s.strip() for v in request.query.getall("status", []) for s in v.split(",") if s.strip()
    ]
    unknown = [s for s in wanted if s not in STATUS_SQL]
    if unknown:
        raise _bad("status", f"unknown status {unknown[0]!r}; use any of {', '.join(STATUS_SQL)}")
    return wanted


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


async def list_jobs(request: web.Request) -> web.Response:
    """GET /jobs?status=&limit=&cursor=: newest first, one page."""
    api = get_api(request)
    statuses, limit = _statuses(request), _limit(request)
    raw_cursor = request.query.get("cursor")
    cursor = decode_cursor(raw_cursor) if raw_cursor else None
    jobs = await api.reads.page(statuses, limit + 1, cursor, principal(request).visible_owners())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return json_response(
        JobList(await api.results.many(jobs), encode_cursor(jobs[-1]) if more else None)
    )


async def output_file(request: web.Request) -> web.StreamResponse:
    """GET /outputs/{id}/{filename}: a file recorded as an output of that job, nothing else."""
    api = get_api(request)
    job_id, filename = request.match_info["id"], request.match_info["filename"]
    missing = NotFound(
        f"job {job_id} has no output {filename!r}", details={"job_id": job_id, "filename": filename}
    )
    # A finished job whose Result was built here (its final event, GET /result): no read.
    known = api.results.known_file(job_id, filename)
    if known is not None and known[1].local_path:
        owner, out = known
        local_path, mimetype = out.local_path, out.mimetype
    else:
        row = await api.reads.output_file(job_id, filename)
        if row is None:
            raise missing
        owner, local_path, mimetype = row["owner"], row["local_path"], row["mimetype"]
    if not visible(request, owner) or not local_path:
        raise missing
    try:
        folder = job_dir(api.services.output_dir, job_id)
    except ComfyqError:
        raise missing from None
    found = _in_folder(folder, local_path)
    if found is None:
        # Several instances: uploaded to S3, it is there; otherwise on the instance that
        # post-processed the job, which streams it through this one.
        rows = (await api.reads.outputs([job_id])).get(job_id, [])
        uploaded = next((str(o["url"]) for o in rows if o["filename"] == filename), "")
        if uploaded.startswith(("https://", "http://")):
            return web.Response(status=302, headers={"Location": uploaded})
        job = await api.reads.job(job_id)
        router: OutputRouter = api.services.outputs
        proxied = None if job is None else await router.proxy(request, job, filename)
        if proxied is None:
            raise missing
        return proxied
    path, st = found
    if "thumb" in request.query:
        return await _thumbnail(request.query["thumb"], path, folder, mimetype or "")
    # A small file from memory (no thread hop), a larger one by FileResponse's sendfile.
    return file_response(
        request,
        path,
        st,
        {
            "Content-Type": mimetype or "application/octet-stream",
            "Content-Disposition": f'inline; filename="{path.name}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


def _in_folder(folder: Path, local_path: str) -> tuple[Path, os.stat_result | None] | None:
    """The output file when it is a regular file of the job's folder, with its lstat when that
    was made, else None.

    Postprocessing writes each file directly into the folder: then one lstat (no link followed)
    proves it, instead of resolve()'s stat of every component on every download; any other
    path is resolved and must still lie inside the folder."""
    path = Path(local_path)
    if path.parent == folder and path.name not in ("", ".", ".."):
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            return path, st
    path = path.resolve()
    return (path, None) if folder in path.parents and path.is_file() else None


THUMB_SIDES = (16, 1024)


async def _thumbnail(raw: str, path: Path, folder: Path, mime: str) -> web.StreamResponse:
    """``?thumb=N``: a WebP of the image output whose longer side is at most N pixels (made
    once with Pillow, kept in the job's folder)."""
    lo, hi = THUMB_SIDES
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        msg = f"must be a whole number of pixels from {lo} to {hi}"
        raise BadRequest(f"thumb {msg}", fields=[{"path": "$.query.thumb", "message": msg}])
    if not mime.startswith("image/"):
        msg = f"only image outputs have thumbnails (this one is {mime})"
        raise BadRequest(msg, fields=[{"path": "$.query.thumb", "message": msg}])
    dest = folder / ".thumbs" / f"{path.name}.{int(raw)}.webp"
    try:
        await asyncio.to_thread(thumbnail, path, dest, int(raw))
    except ConversionError as exc:
        msg = f"no thumbnail: {exc}"
        raise BadRequest(msg, fields=[{"path": "$.query.thumb", "message": msg}]) from None
    return web.FileResponse(
        dest,
        headers={
            "Content-Type": "image/webp",
            "Cache-Control": "private, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        },
    )
