"""Cross-cutting HTTP behaviour: one error envelope, bearer-key auth, CORS, request metrics, logs.

Order (outermost first): the access log, metrics (sees the final status of everything), CORS
preflight, errors (every failure becomes ``{"error": {...}}``), auth. CORS headers are added to
every response, streams included, by an ``on_response_prepare`` hook.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from comfyq.api.auth import NOBODY, set_principal
from comfyq.api.context import get_api, json_response
from comfyq.errors import BadRequest, ComfyqError, QueueFull, Unauthorized
from comfyq.limits import CONTROL
from comfyq.logs import job_context
from comfyq.schemas import ErrorBody, ErrorInfo
from comfyq.store.base import StoreUnavailable

log = logging.getLogger("comfyq.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Guard = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# Another API surface on the same port answers its own failures, in its own envelope: path prefix
# -> that surface's guard, run in place of comfyq's (the Comfy API v2 adds "/api/v2/" at setup).
ERROR_GUARDS: web.AppKey[dict[str, Guard]] = web.AppKey("error_guards", dict)

# /ui and /ui/api/session: the dashboard page asks for a key itself.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/api/v2/health", "/ui", "/ui/api/session"})
# Swagger UI's own static files and the dashboard's: code, no data.
PUBLIC_PREFIXES = ("/docs/assets/", "/ui/static/")
ALLOW_HEADERS = (
    "Authorization, Content-Type, Last-Event-ID, X-Return-Outputs-As-Base64, Idempotency-Key, Range"
)
EXPOSE_HEADERS = "Location, Retry-After, Content-Disposition"
_HTTP_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def route_name(request: web.Request) -> str:
    """The route pattern (``/jobs/{id}``), never the raw path: bounded metric labels."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# Probes and scrapes would drown the requests that matter: they are logged at debug (a 503 from
# /health too: the backend's own line says what went wrong, once).
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
access_log = logging.getLogger("comfyq.access")
# Why a request was refused, filled by errors_middleware for the access line (one dict per request).
_error_note: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "comfyq_error", default=None
)


def _job_of(request: web.Request, response: web.StreamResponse | None) -> str | None:
    """The job a request is about: the route's ``{id}``, or a new job's ``Location``."""
    job_id = request.match_info.get("id")
    if job_id is None and response is not None:
        location = response.headers.get("Location", "")
        if location.startswith("/result/"):
            job_id = location[len("/result/") :]
    return job_id


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request (method, path never with its query string, status, duration, remote)
    and its metrics sample, from one measurement.

    Lines logged while a request about a job is handled carry its job id."""
    t0 = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    note: dict[str, str] = {}
    token = _error_note.set(note)
    with job_context(request.match_info.get("id")):
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first
            raise
        except ConnectionError:
            if not client_gone(request):
                raise
            # The client hung up mid-request (often while its body was read): its doing, not
            # a server error. Nobody will read an answer; returning one keeps aiohttp quiet.
            status = 499
            note.setdefault("error_type", "client_disconnected")
            note.setdefault("error", "the client closed the connection before the answer")
            response = web.Response(status=499)
            return response
        finally:
            _error_note.reset(token)
            ms = (time.perf_counter() - t0) * 1000
            route = route_name(request)
            get_api(request).metrics.http(route, request.method, status, ms / 1000)
            quiet = (
                route in _QUIET_ROUTES
                or route.startswith(PUBLIC_PREFIXES)
                or request.method == "OPTIONS"
            )
            level = logging.DEBUG if quiet else logging.WARNING if status >= 500 else logging.INFO
            if access_log.isEnabledFor(level):
                extra: dict[str, object] = {
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "duration_ms": round(ms, 1),
                    "remote": request.remote,
                }
                job_id = _job_of(request, response)
                if job_id is not None:
                    extra["job_id"] = job_id
                extra.update(note)  # why a request was refused, for the operator
                why = f" ({note['error_type']}: {note['error']})" if note else ""
                access_log.log(
                    level,
                    "%s %s %s %d %.1fms%s",
                    request.remote,
                    request.method,
                    request.path,
                    status,
                    ms,
                    why,
                    extra=extra,
                )


def client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (or closing)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _note_error(request: web.Request, type_: str, message: str) -> None:
    note = _error_note.get()
    if note is not None:
        note["error_type"], note["error"] = type_, message[:300]


def error_body(exc: ComfyqError) -> web.Response:
    headers = {}
    if isinstance(exc, QueueFull | StoreUnavailable):
        headers["Retry-After"] = "5"
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="comfyq"'
    info = exc.to_dict()
    if isinstance(exc, StoreUnavailable):  # the details (hosts, driver words) go to the log only
        log.warning("store unavailable: %s", exc.message)
        info = {"type": exc.type, "message": "the database is unavailable; retry shortly"}
    return json_response({"error": info}, exc.http_status, headers)


def answered(request: web.Request) -> bool:
    """The response's head is already sent (a stream that failed midway): no error answer can
    follow it. The error is raised on, and aiohttp logs it and closes the connection, so the
    client sees a cut stream (and resumes) instead of a second answer inside the first."""
    sent = getattr(request.writer, "output_size", 0)
    return isinstance(sent, int) and sent > 0


class StreamCut(Exception):
    """An HTTP exception raised after the response's head was sent. aiohttp sends an
    ``HTTPException`` that reaches it as an answer of its own, which would land inside the
    first; raised on as this instead, it makes aiohttp close the connection."""


def raise_cut(request: web.Request, exc: BaseException) -> None:
    """If the response's head is already sent, raise ``exc`` on so that the connection is
    closed (an HTTP exception as :class:`StreamCut`); otherwise return, and ``exc`` may be
    answered. Every error handler (comfyq's, and each guard in ``ERROR_GUARDS``) calls this
    before it writes an error answer."""
    if not answered(request):
        return
    # For the access line: the status it shows is not what the client got (a cut stream).
    _note_error(request, "stream_cut", f"{type(exc).__name__} after the response's head: {exc}")
    if isinstance(exc, web.HTTPException):
        raise StreamCut(
            f"{request.method} {request.path}: {exc.status} {exc.reason} raised after the"
            " response's head was sent; the connection is closed"
        ) from exc
    raise exc


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    for prefix, guard in request.app.get(ERROR_GUARDS, {}).items():
        if request.path.startswith(prefix):
            return await guard(request, handler)
    try:
        return await handler(request)
    except ComfyqError as exc:
        _note_error(request, exc.type, exc.message)
        raise_cut(request, exc)
        return error_body(exc)
    except web.HTTPException as exc:
        raise_cut(request, exc)
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 405:
            message = (
                f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
            )
        info = ErrorInfo(_HTTP_TYPES.get(exc.status, f"http_{exc.status}"), message or exc.reason)
        _note_error(request, info.type, info.message)
        return json_response(ErrorBody(info), exc.status, headers)
    except asyncio.CancelledError:
        raise
    except ConnectionError as exc:
        raise_cut(request, exc)
        if client_gone(request):
            raise  # the access log notes it; there is nobody to answer
        log.exception("%s %s failed", request.method, route_name(request))
        info = ErrorInfo(
            "internal_error", "internal server error; the details are in the server log"
        )
        _note_error(request, info.type, info.message)
        return json_response(ErrorBody(info), 500)
    except Exception as exc:
        raise_cut(request, exc)
        log.exception("%s %s failed", request.method, route_name(request))
        info = ErrorInfo(
            "internal_error", "internal server error; the details are in the server log"
        )
        _note_error(request, info.type, info.message)
        return json_response(ErrorBody(info), 500)


def _token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    # A browser's WebSocket cannot set headers either, but it can offer subprotocols: the
    # dashboard offers "comfyq.bearer.<base64url key>" (kept out of URLs and access logs).
    ws_key = ws_protocol_key(request.headers.get("Sec-WebSocket-Protocol", ""))
    if ws_key is not None:
        return ws_key
    # Browsers cannot add headers to EventSource, websockets, <img> or the docs page: GETs may
    # carry the key as ?access_token=.
    if request.method == "GET" and request.query.get("access_token"):
        return request.query["access_token"]
    return None


WS_KEY_PREFIX = "comfyq.bearer."


def ws_protocol_key(header: str) -> str | None:
    """The key a browser offered as a ``comfyq.bearer.<base64url>`` websocket subprotocol."""
    for proto in header.split(","):
        proto = proto.strip()
        if proto.startswith(WS_KEY_PREFIX):
            raw = proto[len(WS_KEY_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
            except (ValueError, UnicodeDecodeError):
                return None
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    keys = get_api(request).keys
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES)
    who = keys.principal(_token(request))
    if who is None:
        if not public:
            raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key>")
        who = NOBODY
    set_principal(request, who)
    return await handler(request)


@web.middleware
async def params_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """400 naming the parameter when a path parameter holds a control character (%00, %0A...):
    such a value is no job id or file name, and must not reach a header, a path or a log field."""
    for name, value in request.match_info.items():
        if CONTROL.search(value):
            msg = "must not contain control characters"
            raise BadRequest(
                f"path parameter {name} {msg}", fields=[{"path": f"$.path.{name}", "message": msg}]
            )
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
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": request.headers.get(
                        "Access-Control-Request-Headers", ALLOW_HEADERS
                    ),
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
    return await handler(request)


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: CORS headers on every response to an allowed origin."""
    origin = _allowed_origin(request)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if origin != "*":
            response.headers.add("Vary", "Origin")


MIDDLEWARES = [
    access_log_middleware,
    cors_middleware,
    errors_middleware,
    auth_middleware,
    params_middleware,
]
