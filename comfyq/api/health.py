"""``GET /health``: 200 when the store is writable, every stage has live workers and at least one
ComfyUI backend answers; 503 otherwise. The body names each part's state. No authentication, so
orchestrators can probe it.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.context import get_api, json_response
from comfyq.schemas import (
    BackendHealth,
    Health,
    InstanceHealth,
    Ready,
    StageHealth,
    StoreHealth,
)


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
    # Alive, not ready: a backend that answers but is still warming up counts here (/ready waits).
    # Only an instance that generates needs a ComfyUI; an API or postprocess box does not.
    any_backend = "generate" not in svc.roles or any(b.healthy or b.reachable for b in backends)
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
    for b in backends:
        if b.process is not None and b.process.state != "running" and b.process.reason:
            reasons.append(f"ComfyUI {b.url} is {b.process.state}: {b.process.reason}")
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


async def ready(request: web.Request) -> web.Response:
    """GET /ready: 200 only when the listener is bound, every stage has workers, at least one
    backend is warm and the queue is under MAX_QUEUE_SIZE; 503 otherwise (load balancers drain)."""
    api = get_api(request)
    svc = api.services
    reasons = []
    if not svc.listening:
        reasons.append("the HTTP listener is not accepting connections yet")
    stages = svc.pipeline.health()
    idle = [n for n, h in stages.items() if h["alive"] < 1]
    if idle:
        reasons.append("stage(s) without live workers: " + ", ".join(idle))
    backends = svc.pool.snapshot()
    if "generate" in svc.roles and not any(b["healthy"] for b in backends):
        warming = [b["url"] for b in backends if b.get("reachable") and not b.get("warm")]
        reasons.append(
            "no backend is warm yet (warming up: " + ", ".join(warming) + ")"
            if warming
            else "no ComfyUI backend answers"
        )
    queues = await api.queue.info()
    if queues.unfinished >= queues.max_queue_size:
        reasons.append(
            f"the queue is full ({queues.unfinished} unfinished jobs, MAX_QUEUE_SIZE"
            f" {queues.max_queue_size})"
        )
    body = Ready(
        ready=not reasons,
        reason="; ".join(reasons) or None,
        backends_warm=f"{sum(bool(b['healthy']) for b in backends)}/{len(backends)}",
        queues=queues,
    )
    return json_response(body, 503 if reasons else 200)
