"""HTTP routes (the contract in ../shared/spec/CONTRACT.md).

``ROUTES`` is comfyq's own table; ``comfyq.app`` adds the Comfy API v2 table (``comfyq.v2``) and
the typed workflow routes, then hands the whole list to ``setup_routes``: each entry is registered
on the app and described in the OpenAPI document, so the two cannot drift apart (a test checks both
ways).
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from comfyq import ui
from comfyq.api import dashboard, docs, generate, jobs, sse, ws
from comfyq.api.health import health, ready
from comfyq.api.jobs import MAX_LIMIT, STATUS_SQL
from comfyq.api.middleware import cors_hook
from comfyq.api.openapi import Param, Reply, Route
from comfyq.metrics import CONTENT_TYPE
from comfyq.schemas import (
    ErrorBody,
    GenerateRequest,
    Health,
    JobList,
    QueueInfo,
    Ready,
    Result,
    StreamEvent,
)

OPENAPI: web.AppKey[bytes] = web.AppKey("openapi", bytes)
README: web.AppKey[str] = web.AppKey("readme", str)

_SSE = Reply(
    "text/event-stream: one `data:` JSON StreamEvent per state change or progress step, each"
    " with an `id:`; comment heartbeats; the last event has status final_result and the Result",
    media="text/event-stream",
    # Open API 3.1: the schema of a text/event-stream describes one event.
    schema={
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "event": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/StreamEvent"},
            },
        },
    },
    components=(StreamEvent,),
)
_LOC = {"Location": "/result/{id}"}
_QUEUE_FULL = Reply(
    "MAX_QUEUE_SIZE jobs are not finished yet", ErrorBody, headers={"Retry-After": "seconds"}
)
_CONFLICT = Reply("request_id already used with a different payload", ErrorBody)
_B64 = Param(
    "X-Return-Outputs-As-Base64",
    "header",
    {"type": "string", "enum": ["1", "true", "yes", "on"]},
    "inline output files as base64",
)
_ID = {"type": "string"}


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    from comfyq.api.auth import require_admin
    from comfyq.api.context import get_api

    require_admin(request)
    body = await get_api(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


ROUTES: list[Route] = [
    Route(
        "POST",
        "/generate",
        generate.generate,
        "Queue a job",
        "generate",
        body=GenerateRequest,
        params=[_B64],
        replies={
            202: Reply("accepted: the job is committed", Result, headers=_LOC),
            200: Reply(
                "this request_id already exists with the same payload: that job",
                Result,
                headers=_LOC,
            ),
            409: _CONFLICT,
            503: _QUEUE_FULL,
        },
    ),
    Route(
        "POST",
        "/generate/sync",
        generate.generate_sync,
        "Run a job and wait for its result",
        "generate",
        body=GenerateRequest,
        params=[
            Param(
                "timeout",
                "query",
                {"type": "number", "minimum": 0},
                "seconds to wait; then 202 with the current Result (the job goes on)",
            ),
            _B64,
        ],
        replies={
            200: Reply("completed", Result),
            202: Reply("timeout elapsed; the job goes on", Result),
            400: Reply(
                "invalid request (error envelope), or ComfyUI rejected the workflow (Result)",
                (ErrorBody, Result),
            ),
            409: _CONFLICT,
            499: Reply("cancelled", Result),
            500: Reply("the job failed (Result)", (ErrorBody, Result)),
            502: Reply("ComfyUI was unreachable", Result),
            503: _QUEUE_FULL,
        },
    ),
    Route(
        "POST",
        "/generate/stream",
        generate.generate_stream,
        "Run a job and stream its progress (SSE)",
        "generate",
        body=GenerateRequest,
        params=[_B64],
        replies={200: _SSE, 409: _CONFLICT, 503: _QUEUE_FULL},
    ),
    Route(
        "GET",
        "/result/{id}",
        jobs.result,
        "A job's Result, in every state",
        "jobs",
        replies={200: Reply("the Result", Result)},
    ),
    Route(
        "POST",
        "/cancel/{id}",
        jobs.cancel,
        "Cancel a job",
        "jobs",
        replies={
            200: Reply("the Result after cancelling (finished jobs are left as they are)", Result)
        },
    ),
    Route(
        "GET",
        "/queue-info",
        jobs.queue_info,
        "Queue sizes per stage",
        "queue",
        replies={200: Reply("waiting and in-flight jobs per stage", QueueInfo)},
    ),
    Route(
        "GET",
        "/health",
        health,
        "Health of the store, workers and ComfyUI backends",
        "ops",
        public=True,
        replies={
            200: Reply("healthy", Health),
            503: Reply("unhealthy: the body says which part", Health),
        },
    ),
    Route(
        "GET",
        "/ready",
        ready,
        "Readiness: listener bound, workers alive, a backend warm, queue not full",
        "ops",
        public=True,
        replies={
            200: Reply("ready for traffic", Ready),
            503: Reply("not ready (starting, warming up, or the queue is full)", Ready),
        },
    ),
    Route(
        "GET",
        "/jobs",
        jobs.list_jobs,
        "List jobs, newest first",
        "jobs",
        params=[
            Param(
                "status",
                "query",
                {"type": "string"},
                "comma separated: " + ", ".join(jobs.STATUS_SQL),
            ),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": jobs.MAX_LIMIT}),
            Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        ],
        replies={
            200: Reply("one page", JobList),
            400: Reply("bad filter, limit or cursor", ErrorBody),
        },
    ),
    Route(
        "GET",
        "/jobs/{id}",
        jobs.result,
        "A job's Result (same as /result/{id})",
        "jobs",
        replies={200: Reply("the Result", Result)},
    ),
    Route(
        "DELETE",
        "/jobs/{id}",
        jobs.cancel,
        "Cancel a job (same as POST /cancel/{id})",
        "jobs",
        replies={200: Reply("the Result after cancelling", Result)},
    ),
    Route(
        "GET",
        "/jobs/{id}/events",
        sse.job_events,
        "A job's events (SSE), resumable with Last-Event-ID",
        "jobs",
        params=[
            Param("Last-Event-ID", "header", _ID, "resume after this event"),
            Param("last_event_id", "query", _ID, "the same, for clients that cannot set it"),
        ],
        replies={200: _SSE, 204: Reply("the client already has the final event")},
    ),
    Route(
        "GET",
        "/outputs/{id}/{filename}",
        jobs.output_file,
        "Download an output file of a job",
        "jobs",
        head=True,
        params=[
            Param(
                "thumb",
                "query",
                {"type": "integer", "minimum": 16, "maximum": 1024},
                "a WebP thumbnail of an image output, longer side at most this many pixels",
            )
        ],
        replies={
            200: Reply(
                "the file, with its own media type (image/png, video/mp4, ...)",
                media="*/*",
                schema={"type": "string", "format": "binary"},
            )
        },
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        "ops",
        replies={
            200: Reply("text exposition format", media="text/plain", schema={"type": "string"}),
            403: Reply("a client key: metrics are for admin keys", ErrorBody),
        },
    ),
    Route(
        "GET",
        "/ws",
        ws.websocket,
        "Job events over a websocket",
        "jobs",
        description='Send {"subscribe": ["<id>", ...]} or {"subscribe": "*"}; receive StreamEvents'
        " as JSON"
        " text frames and preview images as binary frames (4-byte big-endian header length,"
        " JSON header with job_id, then the image).",
        replies={
            101: Reply("switching protocols"),
            400: Reply("not a websocket request", ErrorBody),
        },
    ),
    Route(
        "GET",
        "/docs",
        docs.docs_page,
        "Interactive API documentation",
        "docs",
        replies={200: Reply("HTML", media="text/html", schema={"type": "string"})},
    ),
    Route(
        "GET",
        "/openapi.json",
        docs.openapi_json,
        "This document",
        "docs",
        replies={200: Reply("OpenAPI 3.1", media="application/json", schema={"type": "object"})},
    ),
    Route(
        "GET",
        "/",
        docs.index,
        "The README",
        "docs",
        replies={200: Reply("HTML", media="text/html", schema={"type": "string"})},
    ),
    Route(
        "POST",
        "/jobs/{id}/retry",
        dashboard.retry,
        "Run a failed or cancelled job again from the start",
        "jobs",
        replies={
            200: Reply("the Result, waiting again", Result),
            409: Reply("the job is not failed or cancelled", ErrorBody),
        },
    ),
    Route(
        "POST",
        "/jobs/{id}/delete",
        dashboard.delete,
        "Delete a finished job: its row, events, outputs and files",
        "jobs",
        replies={
            200: Reply("deleted", media="application/json", schema={"type": "object"}),
            409: Reply("the job has not finished: cancel it first", ErrorBody),
        },
    ),
    Route(
        "GET",
        "/ui",
        ui.page,
        "The dashboard (asks for an API key itself)",
        "dashboard",
        public=True,
        replies={200: Reply("HTML", media="text/html", schema={"type": "string"})},
    ),
    Route(
        "GET",
        ui.STATIC_ROUTE,
        ui.asset,
        "The dashboard's files",
        "dashboard",
        public=True,
        in_schema=False,
    ),
    Route(
        "GET",
        "/ui/api/session",
        dashboard.session,
        "Whether a key is needed, and whether the one sent is good (and its role)",
        "dashboard",
        public=True,
        replies={200: Reply("the caller", dashboard.Session)},
    ),
    Route(
        "GET",
        "/ui/api/jobs",
        dashboard.list_rows,
        "The dashboard's jobs table: one page of rows, newest first",
        "dashboard",
        params=[
            Param(
                "status", "query", {"type": "string"}, "comma separated: " + ", ".join(STATUS_SQL)
            ),
            Param(
                "q",
                "query",
                {"type": "string", "maxLength": 128},
                "an id or request_id, or its start",
            ),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        ],
        replies={
            200: Reply("one page", dashboard.JobRows),
            400: Reply("bad filter, search, limit or cursor", ErrorBody),
        },
    ),
    Route(
        "GET",
        "/ui/api/counts",
        dashboard.counts,
        "Jobs per status (the caller's own, for a client key)",
        "dashboard",
        replies={200: Reply("counts", dashboard.Counts)},
    ),
    Route(
        "GET",
        "/ui/api/jobs/{id}",
        dashboard.job_detail,
        "Everything the job page shows: row, Result, events, input, workflow, error, timings",
        "dashboard",
        replies={200: Reply("the job", dashboard.JobDetail)},
    ),
    Route(
        "GET",
        "/ui/api/stats",
        dashboard.stats,
        "The last hour per minute: completed, failed, p50/p95 duration (admin keys)",
        "dashboard",
        replies={
            200: Reply("per-minute figures", dashboard.Stats),
            403: Reply("a client key", ErrorBody),
        },
    ),
    Route(
        "GET",
        "/ui/api/modifiers",
        dashboard.modifiers,
        "The modifiers with their parameters as JSON Schema (for the submit form)",
        "dashboard",
        replies={200: Reply("modifiers", media="application/json", schema={"type": "object"})},
    ),
    Route(
        "GET",
        docs.ASSETS_ROUTE,
        docs.docs_asset,
        "Swagger UI files",
        "docs",
        public=True,
        in_schema=False,
    ),
]


def setup_routes(app: web.Application, routes: list[Route], doc: dict[str, Any]) -> None:
    """Register ``routes`` on ``app``, with ``doc`` (their OpenAPI document) and the rendered
    README."""
    from comfyq.api.context import API

    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)
        if r.head:
            app.router.add_route("HEAD", r.path, r.handler)
    app[OPENAPI] = msgspec.json.encode(doc)
    app[README] = docs.render_readme(app[API].options.readme)
    hook = cors_hook(app[API].settings)
    if hook is not None:  # no CORS origin: no response gets CORS headers, no hook to run
        app.on_response_prepare.append(hook)
    dashboard.setup(app)
