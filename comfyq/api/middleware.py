"""Cross-cutting HTTP behaviour: one error envelope, bearer-key auth, CORS, request metrics, logs.

One middleware (:func:`http_middleware`, one coroutine frame per request) does, outermost first:
the access log and metrics (one measurement, the final status of everything), the CORS preflight,
the error envelope (every failure becomes ``{"error": {...}}``, or another surface's own envelope
through ``ERROR_GUARDS``), auth, and the path-parameter check. What depends on the route only
(its metric label, whether it is public, quiet in the log, or answered by another surface's guard)
is worked out once per route and kept. CORS headers are added to every response, streams
included, by an ``on_response_prepare`` hook (:func:`cors_hook`), registered only when CORS
origins are configured.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_urldispatcher import PlainResource, UrlMappingMatchInfo

from comfyq.api.auth import ANONYMOUS, NOBODY, Principal, set_principal
from comfyq.api.context import get_api, json_response
from comfyq.errors import BadRequest, ComfyqError, QueueFull, Unauthorized
from comfyq.limits import CONTROL
from comfyq.logs import emit, job_id_var
from comfyq.schemas import ErrorBody, ErrorInfo
from comfyq.store.base import StoreUnavailable

if TYPE_CHECKING:
    from comfyq.api.context import Api

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
# Why a request was refused, noted by the error handling for the access line (a dict per refused
# request, kept on the request).
_ERROR_NOTE: web.RequestKey[dict[str, str]] = web.RequestKey("comfyq_error", dict)
_UNAUTHORIZED = "missing or wrong API key: send Authorization: Bearer <key>"
_CHECK = object()  # a route-level answer that depends on the path: asked per request


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _path_guard(request: web.Request) -> Guard | None:
    for prefix, guard in request.app.get(ERROR_GUARDS, {}).items():
        if request.path.startswith(prefix):
            return guard
    return None


class _Route:
    """What the middleware needs to know of a route, worked out at its first request.

    ``public`` and ``guard`` are exact per route: a plain resource matches one path only, and
    every path a dynamic resource matches starts with the literal text before its first
    ``{``; when that literal decides nothing (it is a proper start of a public path or prefix,
    or of a guard's prefix), the answer is ``_CHECK`` and the request's path decides, as for
    requests that matched no route."""

    __slots__ = ("guard", "name", "public", "quiet")

    def __init__(self, app: web.Application, match_info: UrlMappingMatchInfo) -> None:
        resource = match_info.route.resource
        guards = app.get(ERROR_GUARDS, {})
        self.public: object
        self.guard: object
        if resource is None:  # no route matched (404, 405): the path decides
            self.name = "unmatched"
            self.public = self.guard = _CHECK
        else:
            self.name = resource.canonical
            if isinstance(resource, PlainResource):
                self.public = _is_public(self.name)
                self.guard = next((g for p, g in guards.items() if self.name.startswith(p)), None)
            else:
                literal = self.name.split("{", 1)[0]
                if literal.startswith(PUBLIC_PREFIXES):
                    self.public = True
                elif any(p.startswith(literal) for p in (*PUBLIC_PATHS, *PUBLIC_PREFIXES)):
                    self.public = _CHECK
                else:
                    self.public = False
                self.guard = None
                for prefix, guard in guards.items():
                    if literal.startswith(prefix):
                        self.guard = guard
                        break
                    if prefix.startswith(literal):
                        self.guard = _CHECK
        self.quiet = self.name in _QUIET_ROUTES or self.name.startswith(PUBLIC_PREFIXES)


def _job_of(request: web.Request, response: web.StreamResponse | None) -> str | None:
    """The job a request is about: the route's ``{id}``, or a new job's ``Location``."""
    job_id = request.match_info.get("id")
    if job_id is None and response is not None:
        location = response.headers.get("Location", "")
        if location.startswith("/result/"):
            job_id = location[len("/result/") :]
    return job_id


def _access_line(
    request: web.Request,
    response: web.StreamResponse | None,
    level: int,
    status: int,
    ms: float,
) -> None:
    """The access line: remote, method, path never with its query string, status, duration,
    and why a request was refused (the formatter escapes and neutralises client text)."""
    note = request.get(_ERROR_NOTE)
    remote = request.remote
    extra: dict[str, object] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(ms, 1),
        "remote": remote,
    }
    job_id = _job_of(request, response)
    if job_id is not None:
        extra["job_id"] = job_id
    why = ""
    if note:
        extra.update(note)  # why a request was refused, for the operator
        why = f" ({note['error_type']}: {note['error']})"
    emit(
        access_log,
        level,
        "%s %s %s %d %.1fms%s",
        (remote, request.method, request.path, status, ms, why),
        extra,
    )


def http_middleware(api: Api) -> Middleware:
    """The app's one middleware (see the module's docstring), for the services of ``api``."""
    routes: dict[object, _Route] = {}
    metrics = api.metrics
    keys = api.keys
    cors = bool(api.settings.cors_origins)
    perf_counter = time.perf_counter
    debug, info, warning = logging.DEBUG, logging.INFO, logging.WARNING

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = perf_counter()
        match_info = request.match_info
        route = match_info.route
        spec = routes.get(route)
        if spec is None:
            spec = _Route(request.app, match_info)
            if route.resource is not None:  # an unmatched request's route is made per request
                routes[route] = spec
        status = 500
        response: web.StreamResponse | None = None
        # Lines logged while a request about a job is handled carry its job id.
        token = job_id_var.set(match_info.get("id"))
        try:
            if (
                cors
                and request.method == "OPTIONS"
                and "Access-Control-Request-Method" in request.headers
            ):
                response = _preflight(request)
                if response is not None:
                    status = response.status
                    return response
            guard = spec.guard
            if guard is _CHECK:
                guard = _path_guard(request)
            if guard is not None:
                assert callable(guard)
                response = await guard(request, partial(_admitted, handler=handler, spec=spec))
            else:
                try:
                    # auth: who is asking; then no control character in a path parameter
                    current = keys.current
                    set_principal(
                        request,
                        _caller(request, spec, current.principal(_token(request)))
                        if current.enabled
                        else ANONYMOUS,
                    )
                    if match_info:
                        _check_params(match_info)
                    response = await handler(request)
                except ComfyqError as exc:
                    response = _comfyq_error(request, exc)
                except web.HTTPException as exc:
                    response = _http_error(request, exc)
                except asyncio.CancelledError:
                    raise
                except ConnectionError as exc:
                    raise_cut(request, exc)
                    if client_gone(request):
                        raise  # the access log notes it; there is nobody to answer
                    log.exception("%s %s failed", request.method, spec.name)
                    response = _internal_error(request)
                except Exception as exc:
                    raise_cut(request, exc)
                    log.exception("%s %s failed", request.method, spec.name)
                    response = _internal_error(request)
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
            note = request.setdefault(_ERROR_NOTE, {})
            note.setdefault("error_type", "client_disconnected")
            note.setdefault("error", "the client closed the connection before the answer")
            response = web.Response(status=499)
            return response
        finally:
            job_id_var.reset(token)
            ms = (perf_counter() - t0) * 1000
            method = request.method
            metrics.http(spec.name, method, status, ms / 1000)
            level = (
                debug if spec.quiet or method == "OPTIONS" else warning if status >= 500 else info
            )
            if access_log.isEnabledFor(level):
                _access_line(request, response, level, status, ms)

    return middleware


async def _admitted(request: web.Request, handler: Handler, spec: _Route) -> web.StreamResponse:
    """Auth and the path-parameter check, then ``handler``: what another surface's guard runs
    (its failures are answered in that surface's envelope)."""
    set_principal(request, _caller(request, spec, get_api(request).keys.principal(_token(request))))
    if request.match_info:
        _check_params(request.match_info)
    return await handler(request)


def _caller(request: web.Request, spec: _Route, who: Principal | None) -> Principal:
    """The caller a key named (``who``), or nobody on a public route; 401 otherwise."""
    if who is not None:
        return who
    public = spec.public
    if public is _CHECK:
        public = _is_public(request.path)
    if not public:
        raise Unauthorized(_UNAUTHORIZED)
    return NOBODY


def _check_params(match_info: UrlMappingMatchInfo) -> None:
    """400 naming the parameter when a path parameter holds a control character (%00, %0A...):
    such a value is no job id or file name, and must not reach a header, a path or a log field."""
    for name, value in match_info.items():
        if CONTROL.search(value):
            msg = "must not contain control characters"
            raise BadRequest(
                f"path parameter {name} {msg}", fields=[{"path": f"$.path.{name}", "message": msg}]
            )


def _comfyq_error(request: web.Request, exc: ComfyqError) -> web.Response:
    _note_error(request, exc.type, exc.message)
    raise_cut(request, exc)
    return error_body(exc)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    raise_cut(request, exc)
    if exc.status < 400:
        raise exc
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    if exc.status == 405:
        message = f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow', '')}"
    info = ErrorInfo(_HTTP_TYPES.get(exc.status, f"http_{exc.status}"), message or exc.reason)
    _note_error(request, info.type, info.message)
    return json_response(ErrorBody(info), exc.status, headers)


def _internal_error(request: web.Request) -> web.Response:
    info = ErrorInfo("internal_error", "internal server error; the details are in the server log")
    _note_error(request, info.type, info.message)
    return json_response(ErrorBody(info), 500)


def client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (or closing)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _note_error(request: web.Request, type_: str, message: str) -> None:
    note = request.get(_ERROR_NOTE)
    if note is None:
        note = request[_ERROR_NOTE] = {}
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


def _preflight(request: web.Request) -> web.Response | None:
    """The answer to a CORS preflight from an allowed origin; None for any other origin."""
    origin = _allowed_origin(request.headers.get("Origin"), get_api(request).settings.cors_origins)
    if origin is None:
        return None
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


def _allowed_origin(origin: str | None, allowed: Any) -> str | None:
    if not origin or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


ResponseHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def cors_hook(settings: Any) -> ResponseHook | None:
    """The on_response_prepare hook that puts CORS headers on every response to an allowed
    origin (streams included); None when no origin is allowed (nothing to add to any response)."""
    allowed = settings.cors_origins
    if not allowed:
        return None

    async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = _allowed_origin(request.headers.get("Origin"), allowed)
        if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            if origin != "*":
                response.headers.add("Vary", "Origin")

    return cors_headers


def middlewares(api: Api) -> list[Middleware]:
    """The app's middleware list."""
    return [http_middleware(api)]
