"""``GET /health``: the store, the stage workers and the backends, each with its state."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    from comfyq.app import SERVICES

    svc = request.app[SERVICES]
    body: dict[str, Any] = {}
    store_ok = True
    try:
        await svc.store.write(lambda c: c.execute("SELECT 1").fetchone())
    except Exception as exc:
        store_ok = False
        body["store_error"] = str(exc)
    stages = svc.pipeline.health()
    stages_ok = all(s["alive"] >= 1 for s in stages.values())
    backends = svc.pool.snapshot()
    any_backend = any(b["healthy"] for b in backends)
    ok = store_ok and stages_ok and any_backend
    body.update({
        "status": "healthy" if ok else "unhealthy",
        "store": {"writable": store_ok, "path": str(svc.db_path)},
        "stages": stages,
        "backends_healthy": f"{sum(b['healthy'] for b in backends)}/{len(backends)}",
        "backends": backends,
    })
    if not any_backend:
        body["reason"] = "no ComfyUI backend answers; jobs wait until one does"
    return web.json_response(body, status=200 if ok else 503)


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
