"""The Comfy API v2 route table, registered on the normal port beside comfyq's own routes and
described in the same OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from comfyq.api.middleware import ERROR_GUARDS
from comfyq.api.openapi import Param, Reply, Route
from comfyq.v2 import assets, events, jobs
from comfyq.v2.context import attach
from comfyq.v2.errors import guard

_SPEC = " (schema: the Comfy API v2 contract, version 2.0.0)"
_JOB = Reply("the Job" + _SPEC, schema={"type": "object"})
_ASSET = Reply("the Asset" + _SPEC, schema={"type": "object"})
ENVELOPE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": ["object", "null"]},
            },
        }
    },
}
_ERR = Reply('`{"error": {"code", "message", "details"}}`', schema=ENVELOPE)
_KEY = Param("Idempotency-Key", "header", {"type": "string"}, "single use; reuse is 422")
_BIN = {"type": "string", "format": "binary"}

ROUTES: list[Route] = [
    Route(
        "POST",
        "/api/v2/jobs",
        jobs.submit,
        "Submit a workflow (Comfy API v2)",
        "v2",
        params=[_KEY],
        replies={
            201: Reply("the job is committed and queued", schema={"type": "object"}),
            422: Reply(
                "invalid_workflow, workflow_format_ui, missing_asset, idempotency_key_reuse",
                schema=ENVELOPE,
            ),
            429: Reply("queue_full", schema=ENVELOPE, headers={"Retry-After": "seconds"}),
        },
    ),
    Route(
        "GET",
        "/api/v2/jobs",
        jobs.list_jobs,
        "List jobs, newest first (Comfy API v2 extension)",
        "v2",
        params=[
            Param("status", "query", {"type": "string"}, "comma separated v2 statuses"),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": jobs.MAX_LIMIT}),
            Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
        ],
        replies={
            200: Reply(
                '`{"jobs": [Job], "truncated": bool, "next_cursor"?}`', schema={"type": "object"}
            ),
            422: _ERR,
        },
    ),
    Route(
        "GET", "/api/v2/jobs/{id}", jobs.get_job, "A job (Comfy API v2)", "v2", replies={200: _JOB}
    ),
    Route(
        "GET",
        "/api/v2/jobs/{id}/workflow",
        jobs.workflow,
        "The API-format workflow behind a job (Comfy API v2)",
        "v2",
        replies={200: Reply('`{"workflow": {...}, "format": "api"}`', schema={"type": "object"})},
    ),
    Route(
        "POST",
        "/api/v2/jobs/{id}/cancel",
        jobs.cancel,
        "Request cancellation (Comfy API v2)",
        "v2",
        replies={200: _JOB},
    ),
    Route(
        "GET",
        "/api/v2/jobs/{id}/events",
        events.events,
        "Live events of a job (SSE, Comfy API v2)",
        "v2",
        replies={
            200: Reply(
                "`event: status|progress|preview|output` frames; ends after the terminal status",
                media="text/event-stream",
                # Open API 3.1: the schema of a text/event-stream describes one event.
                schema={
                    "type": "object",
                    "properties": {
                        "event": {"type": "string"},
                        "id": {"type": "string"},
                        "data": {"type": "string"},
                    },
                },
            ),
            429: Reply("too_many_streams", schema=ENVELOPE, headers={"Retry-After": "seconds"}),
        },
    ),
    Route(
        "POST",
        "/api/v2/assets",
        assets.upload,
        "Upload an asset (multipart, Comfy API v2)",
        "v2",
        params=[_KEY],
        replies={
            201: Reply("new bytes stored, asset minted" + _SPEC, schema={"type": "object"}),
            200: Reply("bytes already held, asset minted over them", schema={"type": "object"}),
            409: Reply("hash_mismatch", schema=ENVELOPE),
            413: Reply("over ASSET_MAX_BYTES", schema=ENVELOPE),
            422: _ERR,
        },
    ),
    Route(
        "POST",
        "/api/v2/assets/from-hash",
        assets.from_hash,
        "Mint an asset over bytes already held (Comfy API v2)",
        "v2",
        replies={201: _ASSET, 404: Reply("blob_not_found", schema=ENVELOPE)},
    ),
    Route(
        "HEAD",
        "/api/v2/assets/by-hash/{hash}",
        assets.by_hash,
        "Whether bytes with this blake3 hash are held for the caller (Comfy API v2)",
        "v2",
        replies={200: Reply("held"), 404: Reply("not held")},
    ),
    Route(
        "GET",
        "/api/v2/assets/{id}",
        assets.get_asset,
        "An asset (Comfy API v2)",
        "v2",
        replies={200: _ASSET},
    ),
    Route(
        "GET",
        "/api/v2/assets/{id}/content",
        assets.content,
        "An asset's bytes, Range-aware (Comfy API v2)",
        "v2",
        head=True,
        params=[Param("Range", "header", {"type": "string"}, "bytes=first-last")],
        replies={
            200: Reply("the bytes", media="application/octet-stream", schema=_BIN),
            206: Reply("the range", media="application/octet-stream", schema=_BIN),
            302: Reply("an output kept in S3: its URL", headers={"Location": "the URL"}),
            416: Reply("range not satisfiable"),
        },
    ),
    Route(
        "DELETE",
        "/api/v2/assets/{id}",
        assets.delete,
        "Delete an asset record (Comfy API v2)",
        "v2",
        replies={204: Reply("deleted"), 409: Reply("asset_in_use", schema=ENVELOPE)},
    ),
    Route(
        "GET",
        "/api/v2/health",
        jobs.health,
        "Health (Comfy API v2 extension; same body as /health)",
        "v2",
        public=True,
        replies={
            200: Reply("healthy", schema={"type": "object"}),
            503: Reply("unhealthy", schema={"type": "object"}),
        },
    ),
]


def _with_envelopes(route: Route) -> Route:
    """Every v2 route documents the v2 error envelope (not comfyq's) for what it may answer."""
    errors = {
        401: Reply("unauthorized", schema=ENVELOPE),
        500: Reply("upstream_error", schema=ENVELOPE),
    }
    if "{" in route.path and route.method != "HEAD":
        errors[404] = Reply("not_found (or not yours)", schema=ENVELOPE)
    if route.method == "POST":
        errors[413] = Reply("payload_too_large", schema=ENVELOPE)
        errors[415] = Reply("unsupported_media_type", schema=ENVELOPE)
        errors[422] = _ERR
    if route.public:
        errors.pop(401)
    route.replies = {**errors, **route.replies}
    return route


ROUTES = [_with_envelopes(r) for r in ROUTES]


_V2_ERROR = Reply(
    'the v2 error envelope `{"error": {"code", "message", "details"}}`', schema=ENVELOPE
)
for _route in ROUTES:
    # Also every other client error status a v2 route can answer (400/408/422 on any route, 404 on
    # a path parameter), in the v2 envelope: comfyq's generic ones would name comfyq's shape.
    _route.error_reply = _V2_ERROR


def setup(app: web.Application) -> None:
    """Build the v2 state on ``app`` and answer every /api/v2 failure in the v2 envelope; the
    routes are registered with comfyq's own table (comfyq.app)."""
    attach(app)
    app.setdefault(ERROR_GUARDS, {})["/api/v2/"] = guard
