"""The v2 job routes: submit, list, read, workflow, cancel, health.

A v2 job is a comfyq job (same table, stages, leases, retries, webhooks); these handlers only
admit it and present it through ``comfyq.v2.mapping``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

import msgspec
from aiohttp import web

from comfyq.admission import THREAD_ABOVE, canonical_hash, new_job_id
from comfyq.api.auth import principal
from comfyq.api.body import read_json_body
from comfyq.api.context import get_api, json_response
from comfyq.api.health import health as comfyq_health
from comfyq.limits import BodyLimits
from comfyq.store.model import Job, NewJob, State, loads
from comfyq.v2 import mapping
from comfyq.v2.context import get_v2, owner_of, scope_of
from comfyq.v2.errors import V2Error, invalid, not_found
from comfyq.v2.submit import MAX_METADATA, check_key, parse

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
SCAN_BATCH = 200
MAX_SCAN = 2000

# v2 status -> the store states that can show it (the mapping decides the rest).
_STATES = {
    "queued": (State.PENDING, State.RUNNING),
    "running": (State.PENDING, State.RUNNING),
    "canceling": (State.PENDING, State.RUNNING),
    "succeeded": (State.COMPLETED,),
    "failed": (State.FAILED,),
    "expired": (State.FAILED,),
    "canceled": (State.CANCELLED,),
}


async def submit(request: web.Request) -> web.Response:
    """POST /api/v2/jobs: 201 once the job (and its Idempotency-Key) is committed."""
    v2 = get_v2(request)
    settings = v2.settings
    key = check_key(request.headers.get("Idempotency-Key"))
    body = await read_json_body(request, settings)
    limits = BodyLimits.from_settings(settings)
    ctype = request.headers.get("Content-Type")
    if len(body) > THREAD_ABOVE:  # a big body is checked off the event loop
        sub = await asyncio.to_thread(parse, body, ctype, limits)
    else:
        sub = parse(body, ctype, limits)
    owner = owner_of(request)
    if sub.asset_ids:
        found = await v2.assets.assets(sub.asset_ids)
        now = v2.api.store.now_iso()
        scope = scope_of(request)
        gone = [
            a
            for a in sub.asset_ids
            if a not in found
            or (scope is not None and found[a].owner != scope)
            or (found[a].expires_at is not None and found[a].expires_at < now)
        ]
        if gone:
            raise V2Error(
                422,
                "missing_asset",
                f"unknown asset {gone[0]}"
                + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""),
                {"asset_ids": gone},
            )
    inp: dict[str, Any] = {"workflow_json": sub.workflow}
    if settings.webhook_url:
        # Webhooks configured on the server apply to v2 jobs too (the request field stays reserved).
        inp["webhook"] = {"url": settings.webhook_url}
    payload: dict[str, Any] = {"input": inp, "v2": {"assets": sub.asset_ids}}
    if sub.metadata:
        payload["v2"]["metadata"] = msgspec.json.encode(sub.metadata).decode()
    new = NewJob(
        id=new_job_id(),
        payload=payload,
        payload_hash=canonical_hash(payload),
        priority=sub.priority,
        max_attempts=settings.max_attempts,
        timeout=settings.job_timeout,
        kind="workflow",
        owner=principal(request).owner,
    )
    if sub.extra_data:
        v2.extra_data[new.id] = sub.extra_data  # before the commit: a worker may claim it at once
    try:
        job = await v2.assets.create_job_keyed(
            new, settings.max_queue_size, owner=owner, key=key, asset_ids=sub.asset_ids
        )
    except BaseException:
        v2.extra_data.pop(new.id, None)
        raise
    # The row the INSERT returned is the job: no read back (a new job has no outputs or progress).
    answer = await v2.body(request, job, [])
    if sub.metadata:
        answer["metadata"] = sub.metadata
    return json_response(answer, 201)


async def _job_or_404(request: web.Request) -> Job:
    job = await get_v2(request).read_job(request.match_info["id"], request)
    if job is None:
        raise not_found()
    return job


async def get_job(request: web.Request) -> web.Response:
    """GET /api/v2/jobs/{id}: the authoritative, pollable job."""
    v2 = get_v2(request)
    seen = v2.tracker.version(request.match_info["id"])
    if v2.answered(request, request.match_info["id"], seen):
        # Polled since the last change heard of: a read of the row's head (no thread hop) says
        # whether that answer still holds (a cancel request, another instance's change); only a
        # changed job is read whole and encoded again.
        head = await v2.read_job(request.match_info["id"], request, head=True)
        if head is None:
            raise not_found()
        data = await v2.reuse(request, head)
        if data is not None:
            return web.Response(body=data, content_type="application/json")
    job = await _job_or_404(request)
    data, _ = await v2.answer(request, job, seen)
    return web.Response(body=data, content_type="application/json")


async def workflow(request: web.Request) -> web.Response:
    """GET /api/v2/jobs/{id}/workflow: the API-format graph that ran (assets resolved), or the
    one submitted while it has not been prepared yet."""
    job = await _job_or_404(request)
    graph = await get_api(request).reads.workflow(job.id) or {}
    return json_response({"workflow": graph, "format": "api"})


async def cancel(request: web.Request) -> web.Response:
    """POST /api/v2/jobs/{id}/cancel: canceling (or the terminal state it already has)."""
    job = await _job_or_404(request)
    v2 = get_v2(request)
    if not job.terminal:
        await v2.api.pipeline.cancel(job.id)
        job = await v2.read_job(job.id) or job
    return json_response(await v2.body(request, job))


def _cursor(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    try:
        pair = msgspec.json.decode(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise invalid("$.query.cursor", "not a cursor this server issued") from None
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        raise invalid("$.query.cursor", "not a cursor this server issued")
    return pair[0], pair[1]


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_LIMIT:
        raise invalid("$.query.limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return n


def _labels(request: web.Request) -> dict[str, str]:
    """``metadata[key]=value`` filters (the SDK's list_jobs sends them in that form)."""
    out: dict[str, str] = {}
    for k, v in request.query.items():
        if k.startswith("metadata[") and k.endswith("]"):
            out[k[len("metadata[") : -1]] = v
    if len(out) > MAX_METADATA:
        raise invalid("$.query.metadata", f"at most {MAX_METADATA} label filters")
    return out


def _has_labels(job: Job, labels: dict[str, str]) -> bool:
    raw = getattr(job, "v2_metadata", None)
    meta = loads(raw) if isinstance(raw, str) and raw else raw
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in labels.items())


async def list_jobs(request: web.Request) -> web.Response:
    """GET /api/v2/jobs?status=&limit=&cursor=: newest first, ``{"jobs", "truncated"}``."""
    v2 = get_v2(request)
    limit = _limit(request.query.get("limit"))
    wanted: set[str] | None = None
    if request.query.get("status"):
        wanted = {s.strip() for s in request.query["status"].split(",") if s.strip()}
        bad = sorted(wanted - set(mapping.STATUSES))
        if bad:
            raise invalid("$.query.status", f"unknown status {bad[0]!r}")
    states = sorted({st for s in wanted for st in _STATES[s]}) if wanted else None
    cursor = _cursor(request.query.get("cursor"))
    labels = _labels(request)
    owners = principal(request).visible_owners()
    picked: list[Job] = []
    scanned = 0
    more = False
    while len(picked) < limit and scanned < MAX_SCAN:
        rows = await v2.api.reads.summaries(states, owners, cursor, SCAN_BATCH)
        for job in rows:
            scanned += 1
            cursor = (job.created_at, job.id)
            if v2.expired(job) or (wanted and mapping.status(job) not in wanted):
                continue
            if labels and not _has_labels(job, labels):
                continue
            picked.append(job)
            if len(picked) >= limit:
                break
        if len(rows) < SCAN_BATCH:
            break
    else:
        more = True
    more = more or len(picked) >= limit
    outputs = await v2.assets.job_outputs([j.id for j in picked if j.terminal])
    items = []
    for j in picked:
        rows = outputs.get(j.id, [])
        v2.remember(j, rows)
        item = await v2.body(request, j, rows)
        # The list item fields the SDK's JobSummary reads besides id and status.
        item["create_time"], item["update_time"] = j.created_at, j.updated_at
        items.append(item)
    body: dict[str, Any] = {
        "jobs": items,
        "truncated": scanned >= MAX_SCAN and len(picked) < limit,
    }
    if more and cursor is not None:
        body["next_cursor"] = (
            base64.urlsafe_b64encode(msgspec.json.encode(list(cursor))).decode().rstrip("=")
        )
    return json_response(body)


async def health(request: web.Request) -> web.StreamResponse:
    """GET /api/v2/health: comfyq's health (open, like /health)."""
    return await comfyq_health(request)
