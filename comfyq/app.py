"""The aiohttp application: wiring only. Routes live in ``comfyq.api`` (comfyq's own) and
``comfyq.v2`` (the Comfy API v2); this is the one place that puts both on one app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from comfyq import api
from comfyq.api import workflows
from comfyq.api.context import API, Api, ApiOptions, close_api
from comfyq.api.middleware import middlewares
from comfyq.api.openapi import Route, document
from comfyq.services import Services
from comfyq.v2 import routes as v2_routes

SERVICES: web.AppKey[Services] = web.AppKey("services", Services)

ROUTES: list[Route] = api.ROUTES + v2_routes.ROUTES  # the Comfy API v2 on the same port


def app_routes(registry: Any) -> list[Route]:
    """``ROUTES`` plus the typed workflow routes of ``registry``'s modifiers."""
    return ROUTES + workflows.routes(registry)


def build_document(registry: Any, *, api_keys: bool) -> dict[str, Any]:
    """The OpenAPI document an app with this modifier registry serves."""
    doc = document(app_routes(registry), api_keys=api_keys)
    workflows.annotate(doc, registry.typed())
    return doc


def create_app(services: Services, options: ApiOptions | None = None) -> web.Application:
    """An application whose start and stop also start and stop ``services``."""
    if options is None:
        options = ApiOptions(stream_coalesce=services.settings.sse_coalesce_ms / 1000)
    api_state = Api(services, options)
    app = web.Application(
        client_max_size=services.settings.max_body_bytes, middlewares=middlewares(api_state)
    )
    app[SERVICES] = services
    app[API] = api_state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if not services.started:
            await services.start()
        app[API].loop_lag.start()
        yield
        await app[API].loop_lag.stop()
        if services.started:
            await services.stop()

    async def stop_streams(app: web.Application) -> None:
        # Before aiohttp waits for the running handlers (up to its shutdown timeout): the event
        # streams, which would never end on their own, end now.
        services.bus.stop_streams()

    app.on_shutdown.append(stop_streams)
    app.cleanup_ctx.append(lifecycle)
    app.on_cleanup.append(close_api)
    v2_routes.setup(app)
    registry = services.registry
    doc = build_document(registry, api_keys=app[API].keys.enabled)
    api.setup_routes(app, app_routes(registry), doc)
    return app
