"""``POST /generate``, ``/generate/sync`` and ``/generate/stream``.

Every one answers only after the job is committed. Sync and stream subscribe to the job before it
is written, so they cannot miss its events, and wait on those events (no polling). A client that
disconnects loses nothing: the job is already durable and runs on.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from comfyq import admission
from comfyq.api import multipart
from comfyq.api.auth import principal
from comfyq.api.body import read_json_body
from comfyq.api.context import Api, get_api, json_response
from comfyq.api.sse import stream_job
from comfyq.errors import BadRequest, ComfyqError
from comfyq.events import GAP, Subscription
from comfyq.inputs import uploads
from comfyq.result import to_result
from comfyq.schemas import Result
from comfyq.store.model import Job, State


def _status_by_type() -> dict[str, int]:
    out: dict[str, int] = {}
    stack: list[type[ComfyqError]] = [ComfyqError]
    while stack:
        cls = stack.pop()
        out.setdefault(cls.type, cls.http_status)
        stack.extend(cls.__subclasses__())
    return out


_ERROR_STATUS = _status_by_type()


def final_status(job: Job) -> int:
    """HTTP status of a job's final state: 200, 499 (cancelled), 400 (rejected), 502 or 500."""
    if job.state == State.COMPLETED:
        return 200
    if job.state == State.CANCELLED:
        return 499
    status = _ERROR_STATUS.get(str((job.error or {}).get("type")), 500)
    # The client's own fault (workflow rejected, bad input) is a 400; ComfyUI trouble a 502.
    return status if status in (400, 502) else 500


def _location(job_id: str) -> dict[str, str]:
    return {"Location": f"/result/{job_id}"}


async def _admit(request: web.Request) -> tuple[Api, admission.Admitted]:
    api = get_api(request)
    # The raw header first: a body whose Content-Type does not even mention "multipart" (nearly
    # every one) skips aiohttp's parse of the header.
    ctype = request.headers.get("Content-Type")
    if ctype is None or "multipart" not in ctype.lower() or not multipart.is_multipart(request):
        body = await read_json_body(request, api.settings)
        adm = await admission.prepare(api.services, body, request.headers)
    else:  # a "request" JSON part and file parts, streamed to disk
        body, stored = await multipart.generate_body(request, api.services)
        try:
            adm = await admission.prepare(
                api.services, body, multipart.json_headers(request.headers)
            )
        except BaseException:
            await uploads.discard(stored)
            raise
    adm.new.owner = principal(request).owner
    return api, adm


async def generate(request: web.Request) -> web.Response:
    """POST /generate: 202 once the job is durable (200 with the existing job for a repeated id)."""
    api, adm = await _admit(request)
    job, created = await admission.commit(api.services, adm)
    if created:
        res = to_result(job, [])  # a brand-new job: nothing else to read
        return json_response(res, 202, _location(job.id))
    return json_response(await api.results.of(job), 200, _location(job.id))


def _timeout(request: web.Request) -> float | None:
    raw = request.query.get("timeout")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        msg = "must be a number of seconds >= 0"
        raise BadRequest(f"timeout {msg}", fields=[{"path": "$.query.timeout", "message": msg}])
    return value


async def wait_final(api: Api, sub: Subscription, job: Job, timeout: float | None) -> Job:
    """The job once it has ended, or as it is when ``timeout`` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while not job.terminal:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            break
        ev = await sub.get(remaining)
        if ev is None:
            break
        if ev.kind == "state" and ev.final:
            if ev.job is not None:  # the job as its end committed it: no read
                return ev.job  # type: ignore[no-any-return]
            break
        if ev.kind == GAP:  # another instance's end of the job may have been missed: look
            job = await api.reads.job(job.id) or job
    fresh = await api.reads.job(job.id)
    return fresh or job


async def generate_sync(request: web.Request) -> web.Response:
    """POST /generate/sync?timeout=S: the final Result, or 202 with the current one on timeout."""
    timeout = _timeout(request)
    api, adm = await _admit(request)
    with api.bus.subscribe(adm.new.id, maxsize=4, finals_only=True) as sub:
        job, _ = await admission.commit(api.services, adm)
        job = await wait_final(api, sub, job, timeout)
    res: Result = await api.results.of(job)
    status = final_status(job) if job.terminal else 202
    return json_response(res, status, _location(job.id))


async def generate_stream(request: web.Request) -> web.StreamResponse:
    """POST /generate/stream: SSE of the job from its acceptance to its final_result."""
    api, adm = await _admit(request)
    job, _ = await admission.commit(api.services, adm)
    return await stream_job(request, job.id, after=None, headers=_location(job.id))
