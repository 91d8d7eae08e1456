"""The aiohttp application: wiring only. Routes live in ``comfyq.api``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from comfyq.api.context import API, Api, ApiOptions, close_api
from comfyq.api.middleware import MIDDLEWARES
from comfyq.services import Services

SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def create_app(services: Services, options: ApiOptions | None = None) -> web.Application:
    """An application whose start and stop also start and stop ``services``."""
    from comfyq.api import setup_routes

    app = web.Application(client_max_size=services.settings.max_body_bytes, middlewares=MIDDLEWARES)
    app[SERVICES] = services
    app[API] = Api(services, options or ApiOptions())

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if not services.started:
            await services.start()
        app[API].loop_lag.start()
        yield
        await app[API].loop_lag.stop()
        if services.started:
            await services.stop()

    app.cleanup_ctx.append(lifecycle)
    app.on_cleanup.append(close_api)
    setup_routes(app)
    return app
