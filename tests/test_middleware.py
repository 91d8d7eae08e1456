"""The HTTP middleware's per-route answers (worked out once per route) and its request metrics
(plain counts turned into the Prometheus families at scrape time), on a real server."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from support.servers import MakeServer

from comfyq.api.context import API
from comfyq.api.middleware import PUBLIC_PATHS, PUBLIC_PREFIXES
from comfyq.metrics import _HTTP_BUCKETS


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def test_every_route_is_public_exactly_when_its_path_is(make_server: MakeServer) -> None:
    """Without a key, each route of the app answers 401 exactly when the path rule (public paths
    and prefixes) says it is not public: the per-route answer is the per-path one."""
    srv = await make_server(api_keys=["route-key-0123456789"])
    app = srv.runner.app
    assert app is not None
    asked: list[tuple[str, str]] = []
    for resource in app.router.resources():
        path = re.sub(r"\{[^}]*\}", "x", resource.canonical)
        for route in resource:
            asked.append((route.method, path))
    # and requests no route matches (404, 405): the path decides
    asked += [("POST", "/health"), ("GET", "/nope"), ("GET", "/ui/static"), ("PUT", "/ui")]
    asked += [("GET", "/ui/static/nope.js"), ("GET", "/docs/assets/x/y"), ("DELETE", "/api/v2/x")]
    for method, path in asked:
        async with srv.session.request(method, srv.u(path)) as r:
            await r.read()
            assert (r.status == 401) == (not _is_public(path)), (method, path, r.status)


async def test_http_metrics_are_a_counter_and_a_histogram(make_server: MakeServer) -> None:
    """The request series are what a prometheus_client Counter and Histogram with the same
    names, labels and buckets show for the same requests (bucket edges included)."""
    srv = await make_server()
    app = srv.runner.app
    assert app is not None
    metrics = app[API].metrics
    reference = CollectorRegistry()
    requests = Counter(
        "comfyq_http_requests",
        "HTTP requests by route and status",
        ["route", "method", "status"],
        registry=reference,
    )
    durations = Histogram(
        "comfyq_http_request_duration_seconds",
        "HTTP request handling time",
        ["route", "method"],
        buckets=_HTTP_BUCKETS,
        registry=reference,
    )
    seen = [
        ("/jobs/{id}", "GET", 200, 0.001),  # on a bucket's edge: that bucket
        ("/jobs/{id}", "GET", 200, 0.0010001),
        ("/jobs/{id}", "GET", 404, 0.0),
        ("/generate", "POST", 202, 0.3),
        ("unmatched", "BREW", 405, 31.0),  # past the last edge: +Inf only; a method not known
        ("/jobs/{id}", "GET", 200, 30.0),
        ("/generate", "POST", 503, 2.5),
    ]
    for route, method, status, seconds in seen:
        metrics.http(route, method, status, seconds)
        label = method if method != "BREW" else "other"
        requests.labels(route, label, str(status)).inc()
        durations.labels(route, label).observe(seconds)

    def families(text: bytes) -> list[str]:
        return [ln for ln in text.decode().splitlines() if "comfyq_http_request" in ln]

    ours = families(await metrics.render())
    # HELP and TYPE twice; 5 counter series; 3 histograms of 14 buckets, +Inf, count and sum
    assert len(ours) == 4 + 5 + 3 * (len(_HTTP_BUCKETS) + 3)
    assert ours == families(generate_latest(reference))
