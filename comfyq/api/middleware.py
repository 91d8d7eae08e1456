"""Cross-cutting HTTP behaviour: one error envelope, bearer-key auth, CORS, request metrics.

Order (outermost first): metrics (sees the final status of everything), CORS preflight, errors
(every failure becomes ``{"error": {...}}``), auth. CORS headers are added to every response,
streams included, by an ``on_response_prepare`` hook.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from comfyq.api.context import get_api, json_response
from comfyq.errors import ComfyqError, QueueFull, Unauthorized
from comfyq.schemas import ErrorBody, ErrorInfo

log = logging.getLogger("comfyq.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/health"})
PUBLIC_PREFIXES = ("/docs/assets/",)  # Swagger UI's own static files: nothing of ours in them
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Return-Outputs-As-Base64"
EXPOSE_HEADERS = "Location, Retry-After, Content-Disposition"
_HTTP_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def route_name(request: web.Request) -> str:
    """The route pattern (``/jobs/{id}``), never the raw path: bounded metric labels."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away first
        raise
    finally:
        get_api(request).metrics.http(route_name(request), request.method, status, time.perf_counter() - t0)


def error_body(exc: ComfyqError) -> web.Response:
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = "5"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="comfyq"'
    info = exc.to_dict()
    return json_response({"error": info}, exc.http_status, headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ComfyqError as exc:
        return error_body(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 405:
            message = f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
        info = ErrorInfo(_HTTP_TYPES.get(exc.status, f"http_{exc.status}"), message or exc.reason)
        return json_response(ErrorBody(info), exc.status, headers)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, route_name(request))
        info = ErrorInfo("internal_error", "internal server error; the details are in the server log")
        return json_response(ErrorBody(info), 500)


def _token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    # Browsers cannot add headers to EventSource, websockets, <img> or the docs page: GETs may
    # carry the key as ?access_token=.
    if request.method == "GET" and request.query.get("access_token"):
        return request.query["access_token"]
    return None


def key_ok(token: str | None, keys: list[str]) -> bool:
    """Constant-time check of ``token`` against every configured key."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = get_api(request).settings.api_keys
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES)
    if keys and not public and not key_ok(_token(request), keys):
        raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key>")
    return await handler(request)


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    allowed = get_api(request).settings.cors_origins
    if not origin or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        origin = _allowed_origin(request)
        if origin is not None:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    ALLOW_HEADERS),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
    return await handler(request)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers on every response to an allowed origin."""
    origin = _allowed_origin(request)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if origin != "*":
            response.headers.add("Vary", "Origin")


MIDDLEWARES = [metrics_middleware, cors_middleware, errors_middleware, auth_middleware]
