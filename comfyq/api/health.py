"""``GET /health``: 200 when the store is writable, every stage has live workers and at least one
ComfyUI backend answers; 503 otherwise. The body names each part's state. No authentication, so
orchestrators can probe it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.context import get_api, json_response
from comfyq.schemas import BackendHealth, Health, InstanceHealth, StageHealth, StoreHealth


def _backend(raw: dict[str, Any]) -> BackendHealth:
    try:
        return msgspec.convert(raw, BackendHealth, strict=False)
    except msgspec.ValidationError:
        return BackendHealth(url=str(raw.get("url")), healthy=bool(raw.get("healthy")))


async def health(request: web.Request) -> web.Response:
    """GET /health"""
    api = get_api(request)
    svc = api.services
    where = svc.store.describe()
    store = StoreHealth(writable=True, path=where)
    try:
        await svc.store.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not writable", and says why
        store = StoreHealth(writable=False, path=where, error=f"{type(exc).__name__}: {exc}")
    stages = {name: StageHealth(**h) for name, h in svc.pipeline.health().items()}
    backends = [_backend(b) for b in svc.pool.snapshot()]
    stages_ok = all(s.alive >= 1 for s in stages.values())
    # Only an instance that generates needs a ComfyUI; an API or postprocess box does not.
    any_backend = "generate" not in svc.roles or any(b.healthy for b in backends)
    ok = store.writable and stages_ok and any_backend
    reasons = []
    if not store.writable:
        reasons.append("the store is not writable")
    if not stages_ok:
        reasons.append(
            "stage(s) without live workers: "
            + ", ".join(n for n, s in stages.items() if s.alive < 1)
        )
    if not any_backend:
        reasons.append("no ComfyUI backend answers; jobs wait until one does")
    queues = None
    if store.writable:
        try:
            queues = await api.queue.info()
        except Exception:  # noqa: BLE001 - the answer is about health; the sizes are extra
            queues = None
    body = Health(
        status="healthy" if ok else "unhealthy",
        store=store,
        stages=stages,
        backends_healthy=f"{sum(b.healthy for b in backends)}/{len(backends)}",
        backends=backends,
        queues=queues,
        reason="; ".join(reasons) or None,
        roles=sorted(svc.roles),
        instances=await _instances(svc),
    )
    return json_response(body, 200 if ok else 503)


async def _instances(svc: Any) -> list[InstanceHealth] | None:
    try:
        return [msgspec.convert(i, InstanceHealth) for i in await svc.cluster.instances()]
    except Exception:  # noqa: BLE001 - the registry is extra; the store's state says the rest
        return None
