"""The Comfy API v2 error envelope: ``{"error": {"code", "message", "details"}}`` on every v2 error.

comfyq's own errors keep their meaning (status, message, the fields they name); only the shape and
a few codes differ on the v2 surface: a full queue is 429 ``queue_full`` (not 503), validation is
422, and anything unexpected is ``upstream_error`` with a generic message (the details go to the
server log, never to the client).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.middleware import client_gone, raise_cut
from comfyq.errors import BadRequest, ComfyqError, QueueFull, Unauthorized
from comfyq.store.base import StoreUnavailable

log = logging.getLogger("comfyq.v2")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class V2Error(ComfyqError):
    """An error with a v2 code of its own."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.http_status = status
        self.type = code
        self.headers = headers or {}


def invalid(path: str, message: str, code: str = "invalid_request") -> V2Error:
    """A 422 naming one field."""
    return V2Error(
        422, code, f"{path}: {message}", {"fields": [{"path": path, "message": message}]}
    )


def not_found(what: str = "job") -> V2Error:
    # One answer for "never existed", "expired" and "not yours" (the contract's rule).
    return V2Error(404, "not_found", f"no such {what}")


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


_encode = msgspec.json.Encoder().encode


def envelope(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "details": details or None}}
    return web.Response(
        body=_encode(body), status=status, headers=headers, content_type="application/json"
    )


def from_comfyq(exc: ComfyqError) -> web.Response:
    """A comfyq error as a v2 envelope."""
    if isinstance(exc, V2Error):
        return envelope(exc.http_status, exc.type, exc.message, exc.details, exc.headers)
    details: dict[str, Any] = dict(exc.details or {})
    if exc.fields is not None:
        details["fields"] = exc.fields
    if isinstance(exc, QueueFull):
        return envelope(429, "queue_full", exc.message, details, {"Retry-After": "5"})
    if isinstance(exc, StoreUnavailable):
        log.warning("store unavailable: %s", exc.message)
        return envelope(
            503, exc.type, "the database is unavailable; retry shortly", None, {"Retry-After": "5"}
        )
    if isinstance(exc, Unauthorized):
        return envelope(
            401, "unauthorized", exc.message, None, {"WWW-Authenticate": 'Bearer realm="comfyq"'}
        )
    if isinstance(exc, BadRequest):
        return envelope(422, "invalid_request", exc.message, details)
    if exc.http_status >= 500:
        log.error("v2 request failed: %s: %s", exc.type, exc.message)
        return envelope(500, "upstream_error", "the server could not complete the request")
    return envelope(exc.http_status, exc.type, exc.message, details)


async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run a /api/v2 request (auth included) and answer every failure with the v2 envelope.

    A failure after the response's head was sent (an event stream that failed midway) is never
    answered: it is raised on and the connection closed (``raise_cut``), as comfyq's own
    errors do, so the client sees a cut stream and resumes instead of a second answer inside
    the first."""
    try:
        return await handler(request)
    except ComfyqError as exc:
        raise_cut(request, exc)
        return from_comfyq(exc)
    except web.HTTPException as exc:
        raise_cut(request, exc)
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        message = exc.reason
        if exc.status == 405:
            message = (
                f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
            )
        return envelope(exc.status, code, message, None, headers)
    except asyncio.CancelledError:
        raise
    except ConnectionError as exc:
        raise_cut(request, exc)
        if client_gone(request):
            raise  # the access log notes it; there is nobody to answer
        log.exception("%s %s failed", request.method, request.path)
        return envelope(500, "upstream_error", "the server could not complete the request")
    except Exception as exc:
        raise_cut(request, exc)
        log.exception("%s %s failed", request.method, request.path)
        return envelope(500, "upstream_error", "the server could not complete the request")
