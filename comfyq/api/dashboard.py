"""The dashboard's reads and actions (``/ui`` is the page; these are the calls it makes).

Everything here goes through the caller's Principal: a client key sees, counts and acts on its
own jobs only; the queue and backends panel (``/ui/api/stats``) is for admin keys. Every read is
bounded: one page of rows by an index in listing order, counts cached per caller for
``COUNTS_TTL`` seconds and only while nothing changed, the last hour's charts built from
per-minute buckets that are read once each (a closed minute never changes) with a cap on rows.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.auth import NOBODY, Principal, principal, require_admin, visible
from comfyq.api.context import Api, get_api, json_response
from comfyq.api.jobs import _bad, _limit, _statuses, decode_cursor, encode_cursor, not_found
from comfyq.clock import iso
from comfyq.errors import ComfyqError, Conflict
from comfyq.outputs.local import job_dir
from comfyq.result import progress_of
from comfyq.schemas import Progress, Result
from comfyq.store.model import TERMINAL, Job, Stage, State, status_of

ROW_COLUMNS = (
    "id, state, stage, kind, comfy_backend, attempts, max_attempts, priority, message,"
    " created_at, updated_at, finished_at"
)
COUNTS_TTL = 2.0  # seconds a caller's counts are reused while jobs change
STATS_TTL = 5.0  # seconds the last hour's figures are reused
MINUTE_CAP = 20_000  # rows read per minute bucket at most (a sample beyond that)
STATUSES = (
    "queued",
    "processing",
    "generating",
    "postprocessing",
    "completed",
    "failed",
    "cancelled",
)


class JobRow(msgspec.Struct, omit_defaults=True):
    """One line of the dashboard's jobs table."""

    id: str
    status: str
    state: str
    stage: str
    kind: str
    attempts: int
    max_attempts: int
    priority: int
    message: str
    created_at: str
    updated_at: str
    backend: str | None = None
    finished_at: str | None = None
    progress: Progress | None = None


class JobRows(msgspec.Struct):
    jobs: list[JobRow]
    next_cursor: str | None = None


class Counts(msgspec.Struct):
    """Jobs per Result status (only the caller's, for a client key)."""

    counts: dict[str, int]
    total: int


class JobEventRow(msgspec.Struct, omit_defaults=True):
    id: int
    at: str
    to_state: str
    stage: str
    attempt: int
    message: str
    status: str
    from_state: str | None = None
    data: Any = None


class JobDetail(msgspec.Struct, omit_defaults=True):
    """Everything the job page shows."""

    job: JobRow
    result: Result
    events: list[JobEventRow]
    input: dict[str, Any]
    workflow: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    prompt_id: str | None = None


class Minute(msgspec.Struct):
    minute: str
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


class Stats(msgspec.Struct):
    """The last hour, one bucket per minute (oldest first), and totals."""

    minutes: list[Minute]
    completed: int
    failed: int
    cancelled: int
    p50_ms: float | None
    p95_ms: float | None
    sampled: bool = False


class ModifierInfo(msgspec.Struct, omit_defaults=True):
    name: str
    schema: dict[str, Any]
    description: str = ""
    typed: bool = False


def _row(job: Job, bus_progress: dict[str, dict[str, Any]]) -> JobRow:
    prog = progress_of(bus_progress.get(job.id)) if job.state == "running" else None
    return JobRow(
        id=job.id,
        status=status_of(job.state, job.stage),
        state=job.state,
        stage=job.stage,
        kind=job.kind,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        priority=job.priority,
        message=job.message,
        created_at=job.created_at,
        updated_at=job.updated_at,
        backend=job.comfy_backend,
        finished_at=job.finished_at,
        progress=prog,
    )


def _search(request: web.Request) -> str:
    q = request.query.get("q", "").strip()
    if len(q) > 128:
        raise _bad("q", "at most 128 characters (an id or request_id, or its start)")
    return q


async def list_rows(request: web.Request) -> web.Response:
    """GET /ui/api/jobs?status=&q=&limit=&cursor=: one page of table rows, newest first."""
    api = get_api(request)
    statuses, limit, q = _statuses(request), _limit(request), _search(request)
    raw_cursor = request.query.get("cursor")
    cursor = decode_cursor(raw_cursor) if raw_cursor else None
    owners = principal(request).visible_owners()
    jobs = await api.reads.page(statuses, limit + 1, cursor, owners, id_prefix=q)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    progress = api.bus.progress
    return json_response(
        JobRows([_row(j, progress) for j in jobs], encode_cursor(jobs[-1]) if more else None)
    )


class _CountsCache:
    """Counts per caller, reused while no job changed or for COUNTS_TTL seconds at most."""

    def __init__(self) -> None:
        self.entries: dict[str | None, tuple[int, float, Counts]] = {}

    async def get(self, api: Api, who: Principal) -> Counts:
        version = api.queue.version
        now = time.monotonic()
        hit = self.entries.get(who.key_id)
        if hit is not None and (hit[0] == version or now - hit[1] < COUNTS_TTL):
            return hit[2]
        counts = await _count(api, who)
        if len(self.entries) > 1000:
            self.entries.clear()
        self.entries[who.key_id] = (version, now, counts)
        return counts


async def _count(api: Api, who: Principal) -> Counts:
    out = dict.fromkeys(STATUSES, 0)
    for (state, stage), n in (await api.reads.status_counts(who.visible_owners())).items():
        status = status_of(State(state), Stage(stage)) if stage else state
        if status in out:
            out[status] += n
    return Counts(out, sum(out.values()))


_COUNTS: web.AppKey[_CountsCache] = web.AppKey("dashboard_counts", _CountsCache)


async def counts(request: web.Request) -> web.Response:
    """GET /ui/api/counts: jobs per status (the filter chips)."""
    cache = request.app[_COUNTS]
    return json_response(await cache.get(get_api(request), principal(request)))


class Session(msgspec.Struct):
    """What the page needs to know about its key before it reads anything."""

    keys_required: bool
    authenticated: bool
    role: str | None = None
    key_id: str | None = None


async def session(request: web.Request) -> web.Response:
    """GET /ui/api/session (public): whether this server needs a key and whether the one sent is
    good, with its role. Lets the page ask for a key without provoking a 401 first."""
    api = get_api(request)
    who = principal(request)
    ok = who is not NOBODY
    return json_response(
        Session(
            keys_required=api.keys.enabled,
            authenticated=ok,
            role=who.role if ok else None,
            key_id=who.key_id if ok else None,
        )
    )


def setup(app: web.Application) -> None:
    """The dashboard's caches, one per application."""
    app[_COUNTS] = _CountsCache()
    app[_STATS] = _StatsCache()


async def job_detail(request: web.Request) -> web.Response:
    """GET /ui/api/jobs/{id}: the job page's facts in one answer."""
    api = get_api(request)
    job_id = request.match_info["id"]
    job = await api.reads.job(job_id)
    if job is None or not visible(request, job.owner):
        raise not_found(job_id)
    result = await api.results.of(job)
    events = [
        JobEventRow(
            id=e["id"],
            at=e["at"],
            to_state=e["to_state"],
            stage=e["stage"],
            attempt=e["attempt"],
            message=e["message"],
            status=status_of(e["to_state"], e["stage"]),
            from_state=e["from_state"],
            data=e["data"],
        )
        for e in await api.reads.events(job_id)
    ]
    payload_input = (job.payload or {}).get("input") or {}
    prepared = job.prepared or {}
    workflow = prepared.get("workflow") or payload_input.get("workflow_json") or None
    return json_response(
        JobDetail(
            job=_row(job, api.bus.progress),
            result=result,
            events=events,
            input=payload_input,
            workflow=workflow,
            error=job.error,
            timings=job.timings,
            prompt_id=job.comfy_prompt_id,
        )
    )


async def retry(request: web.Request) -> web.Response:
    """POST /jobs/{id}/retry: run a failed or cancelled job again from the start."""
    api = get_api(request)
    job_id = request.match_info["id"]
    job = await api.reads.head(job_id)
    if job is None or not visible(request, job.owner):
        raise not_found(job_id)
    if job.state not in ("failed", "cancelled"):
        raise Conflict(
            f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried",
            details={"job_id": job_id, "status": job.status},
        )
    try:
        await api.store.retry_job(job_id)
    except ComfyqError as exc:
        if exc.http_status == 404:
            raise not_found(job_id) from None
        raise Conflict(exc.message, details={"job_id": job_id}) from None
    fresh = await api.reads.job(job_id)
    if fresh is None:
        raise not_found(job_id)
    return json_response(await api.results.of(fresh))


async def delete(request: web.Request) -> web.Response:
    """POST /jobs/{id}/delete: forget a finished job: its row, events, outputs and files."""
    api = get_api(request)
    job_id = request.match_info["id"]
    job = await api.reads.head(job_id)
    if job is None or not visible(request, job.owner):
        raise not_found(job_id)
    if job.state not in TERMINAL:
        raise Conflict(
            f"job {job_id} is {job.status}; cancel it first, then delete it",
            details={"job_id": job_id, "status": job.status},
        )
    if not await api.store.delete_finished(job_id):
        raise Conflict(f"job {job_id} changed meanwhile; look again", details={"job_id": job_id})
    try:
        folder = job_dir(api.services.output_dir, job_id)
    except ComfyqError:
        folder = None
    if folder is not None:
        await asyncio.to_thread(shutil.rmtree, folder, True)
    return json_response({"deleted": job_id})


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return round(values[k], 1)


class _StatsCache:
    """Per-minute buckets: closed minutes are read once, the current one on each refresh."""

    def __init__(self) -> None:
        self.closed: dict[int, tuple[Minute, list[float], bool]] = {}
        self.made = 0.0
        self.last: Stats | None = None

    async def get(self, api: Api) -> Stats:
        now = time.time()
        if self.last is not None and now - self.made < STATS_TTL:
            return self.last
        this_minute = int(now // 60)
        first = this_minute - 59
        for m in list(self.closed):
            if m < first:
                del self.closed[m]
        minutes: list[Minute] = []
        durations: list[float] = []
        sampled = False
        for m in range(first, this_minute + 1):
            hit = self.closed.get(m)
            if hit is None:
                hit = await _minute(api, m)
                if m < this_minute:
                    self.closed[m] = hit
            minute, ds, capped = hit
            minutes.append(minute)
            durations.extend(ds)
            sampled |= capped
        stats = Stats(
            minutes=minutes,
            completed=sum(m.completed for m in minutes),
            failed=sum(m.failed for m in minutes),
            cancelled=sum(m.cancelled for m in minutes),
            p50_ms=_percentile(durations, 0.5),
            p95_ms=_percentile(durations, 0.95),
            sampled=sampled,
        )
        self.last, self.made = stats, now
        return stats


async def _minute(api: Api, minute: int) -> tuple[Minute, list[float], bool]:
    rows = await api.reads.finished_between(minute * 60.0, minute * 60.0 + 60.0, MINUTE_CAP + 1)
    capped = len(rows) > MINUTE_CAP
    out = Minute(minute=iso(minute * 60.0))
    durations: list[float] = []
    for state, seconds in rows[:MINUTE_CAP]:
        if state == "completed":
            out.completed += 1
            durations.append(seconds * 1000)
        elif state == "failed":
            out.failed += 1
        elif state == "cancelled":
            out.cancelled += 1
    out.p50_ms = _percentile(durations, 0.5)
    out.p95_ms = _percentile(durations, 0.95)
    return out, durations, capped


_STATS: web.AppKey[_StatsCache] = web.AppKey("dashboard_stats", _StatsCache)


async def stats(request: web.Request) -> web.Response:
    """GET /ui/api/stats: the last hour per minute (admin keys)."""
    require_admin(request)
    cache = request.app[_STATS]
    return json_response(await cache.get(get_api(request)))


def _schema_of(cls: type[Any]) -> tuple[dict[str, Any], bool]:
    """The modifier's parameters as JSON Schema: its typed ``Params`` when it has them, else the
    names it reads in a dry run (untyped)."""
    params = getattr(cls, "Params", None)
    if params is not None:
        try:
            (schema,), defs = msgspec.json.schema_components([params])
        except (TypeError, ValueError):
            schema, defs = {}, {}
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            schema = dict(defs.get(ref.split("/")[-1], {}))
        if defs:
            schema["$defs"] = defs
        return schema, True
    accepts = getattr(cls, "ACCEPTS", None)
    names = sorted(accepts) if accepts else []
    return {"type": "object", "properties": {n: {} for n in names}}, False


async def _dry_run_names(api: Api, name: str) -> list[str]:
    try:
        modifier = api.services.registry.create(name, {})
        await modifier.get_modified_workflow()
    except Exception:  # noqa: BLE001 - a modifier that needs values reveals fewer names
        return []
    accessed: set[str] = getattr(modifier.modifications, "accessed", set())
    return sorted(accessed)


async def modifiers(request: web.Request) -> web.Response:
    """GET /ui/api/modifiers: each modifier with its parameters as JSON Schema (for the form)."""
    api = get_api(request)
    registry = api.services.registry
    out = []
    for name in registry.names():
        cls = registry.get(name)
        schema, typed = _schema_of(cls)
        if not typed and not schema["properties"]:
            schema["properties"] = {n: {} for n in await _dry_run_names(api, name)}
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        out.append(ModifierInfo(name=name, schema=schema, description=doc, typed=typed))
    return json_response({"modifiers": out})
