"""The HTTP surface as a whole: one error envelope on every route, auth, CORS, docs, OpenAPI,
metrics and health."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.servers import MakeServer, Server, wait_healthy
from support.workflows import workflow

from comfyq.api.context import ApiOptions
from comfyq.api.openapi import document
from comfyq.app import ROUTES, build_document
from comfyq.schemas import GenerateRequest
from comfyq.sim import Simulator

_colors = itertools.count(9000)
PUBLIC = {
    "/health",
    "/ready",
    "/docs/assets/{name}",
    "/api/v2/health",
    "/ui",
    "/ui/static/{name}",
    "/ui/api/session",
}


def body(**extra: Any) -> dict[str, Any]:
    return {"input": {"workflow_json": workflow(next(_colors)), **extra}}


def assert_envelope(status: int, ctype: str, data: bytes, expect: int) -> dict[str, Any]:
    assert status == expect, (status, data[:300])
    assert ctype == "application/json"
    err = json.loads(data)["error"]
    if "code" in err:  # the Comfy API v2 envelope (/api/v2): {"code", "message", "details"}
        err["type"] = err["code"]
    assert set(err) >= {"type", "message"} and isinstance(err["type"], str) and err["message"]
    assert set(json.loads(data)) == {"error"}
    return err  # type: ignore[no-any-return]


def failing_request(route: Any) -> tuple[str, str, dict[str, Any], int]:
    """A request that makes ``route`` answer with an error, and the status it must be."""
    path = (
        route.path.replace("{id}", "no-such-job")
        .replace("{filename}", "x.png")
        .replace("{name}", "nope.js")
    )
    if route.body is not None:
        return (
            route.method,
            path,
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
        )
    if "{" in route.path:
        return route.method, path, {}, 404
    if route.path == "/jobs":
        return "GET", "/jobs?limit=0", {}, 400
    if route.path == "/ws":
        return "GET", "/ws", {}, 400  # not a websocket upgrade
    return route.method, path, {}, 401  # the rest needs a key (the server below has one)


async def test_every_route_answers_errors_in_one_envelope(make_server: MakeServer) -> None:
    srv = await make_server(api_keys=["k1"])
    key = {"Authorization": "Bearer k1"}
    for route in ROUTES:
        method, path, kw, expect = failing_request(route)
        headers = {**kw.pop("headers", {}), **({} if expect == 401 else key)}
        if route.path in PUBLIC and expect == 401:
            continue  # nothing to fail on: checked below with unmatched paths and methods
        async with srv.session.request(method, srv.u(path), headers=headers, **kw) as r:
            if method == "HEAD":  # no body, by definition
                assert r.status == expect
                continue
            assert_envelope(r.status, r.content_type, await r.read(), expect)
    for method, path, expect in (
        ("GET", "/nope", 404),
        ("PUT", "/generate", 405),
        ("GET", "/generate", 405),
        ("PATCH", "/jobs/x", 405),
    ):
        async with srv.session.request(method, srv.u(path), headers=key) as r:
            err = assert_envelope(r.status, r.content_type, await r.read(), expect)
        if expect == 405:
            assert err["type"] == "method_not_allowed" and "Allow" in r.headers


async def test_api_keys_guard_every_route_but_health(make_server: MakeServer) -> None:
    srv = await make_server(api_keys=["k1", "k2"])
    for route in ROUTES:
        path = (
            route.path.replace("{id}", "x")
            .replace("{filename}", "f.png")
            .replace("{name}", "swagger-ui.css")
        )
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k1"}):
            async with srv.session.request(route.method, srv.u(path), headers=headers) as r:
                if route.path in PUBLIC:
                    assert r.status != 401, route.path
                elif route.method == "HEAD":
                    assert r.status == 401
                else:
                    err = assert_envelope(r.status, r.content_type, await r.read(), 401)
                    assert err["type"] == "unauthorized" and r.headers[
                        "WWW-Authenticate"
                    ].startswith("Bearer")
    async with srv.session.get(srv.u("/queue-info"), headers={"Authorization": "Bearer k2"}) as r:
        assert r.status == 200
    async with srv.session.get(srv.u("/queue-info?access_token=k1")) as r:
        assert r.status == 200  # browsers' EventSource and <img> cannot send headers
    async with srv.session.post(srv.u("/generate?access_token=k1"), json=body()) as r:
        assert r.status == 401  # only GETs may carry the key in the URL
    async with srv.session.post(
        srv.u("/generate"), json=body(), headers={"Authorization": "Bearer k1"}
    ) as r:
        assert r.status == 202
    async with srv.session.get(srv.u("/docs?access_token=k1")) as r:
        assert r.status == 200 and '"k1"' in await r.text()  # the docs page can try calls with it
    async with srv.session.get(srv.u("/docs?access_token=bad")) as r:
        assert r.status == 401
    doc = await (
        await srv.session.get(srv.u("/openapi.json"), headers={"Authorization": "Bearer k1"})
    ).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/health"]["get"]["security"] == []


async def test_cors_for_browser_clients(make_server: MakeServer, simulator: Simulator) -> None:
    srv = await make_server(cors_origins=["https://app.example"], api_keys=["k"])
    origin = {"Origin": "https://app.example"}
    pre = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with srv.session.options(srv.u("/generate"), headers=pre) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert r.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    async with srv.session.get(srv.u("/health"), headers=origin) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Location" in r.headers["Access-Control-Expose-Headers"]
    async with srv.session.get(srv.u("/queue-info"), headers=origin) as r:
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    async with srv.session.get(srv.u("/health"), headers={"Origin": "https://evil.example"}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    async with srv.session.options(
        srv.u("/generate"), headers={**pre, "Origin": "https://evil.example"}
    ) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    auth = {**origin, "Authorization": "Bearer k"}
    async with srv.session.post(srv.u("/generate"), json=body(request_id="c1"), headers=auth) as r:
        assert r.status == 202
    async with srv.session.get(srv.u("/jobs/c1/events"), headers=auth) as r:
        assert r.content_type == "text/event-stream"
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"  # streams too
    anyone = await make_server(cors_origins=["*"])
    async with anyone.session.get(
        anyone.u("/health"), headers={"Origin": "https://x.example"}
    ) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    closed = await make_server()
    async with closed.session.get(closed.u("/health"), headers=origin) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_openapi_is_generated_from_the_types_and_matches_the_routes(server: Server) -> None:
    async with server.session.get(server.u("/openapi.json")) as r:
        assert r.status == 200
        doc = await r.json()
    built = build_document(server.services.registry, api_keys=False)
    assert doc == json.loads(msgspec.json.encode(built))
    assert json.loads(msgspec.json.encode(document(ROUTES, api_keys=False)))["paths"].items() <= (
        doc["paths"].items()
    )
    assert doc["openapi"] == "3.1.0"
    registered = {
        (r.method, r.resource.canonical)
        for r in server.runner.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    heads = {(m, p) for m, p in documented if m == "HEAD"}  # a route of its own (v2 by-hash)
    assert heads <= {
        (r.method, r.resource.canonical)
        for r in server.runner.app.router.routes()
        if r.resource is not None
    }
    assert documented - heads == registered - {
        ("GET", "/docs/assets/{name}"),
        ("GET", "/ui/static/{name}"),
    }
    (ref,), components = msgspec.json.schema_components(
        [GenerateRequest], ref_template="#/components/schemas/{name}"
    )
    for name, schema in components.items():
        served = dict(doc["components"]["schemas"][name])
        if name == "Input":  # plus the typed modifiers' tagged union (test_peers_typed checks it)
            assert served.pop("anyOf")[0] == {"$ref": "#/components/schemas/ModifierCall"}
            # and the one rule msgspec cannot state: exactly one of workflow_json and modifier
            assert [alt["required"] for alt in served.pop("oneOf")] == [
                ["workflow_json"],
                ["modifier"],
            ]
        assert served == json.loads(json.dumps(schema))
    body_ref = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body_ref == ref
    inp = doc["components"]["schemas"]["Input"]
    assert inp["additionalProperties"] is False and "request_id" in inp["properties"]
    assert set(doc["paths"]["/generate/sync"]["post"]["responses"]) >= {
        "200",
        "202",
        "400",
        "409",
        "499",
        "500",
        "502",
        "503",
    }


async def test_docs_work_offline_and_root_renders_the_readme(server: Server) -> None:
    async with server.session.get(server.u("/docs")) as r:
        assert r.status == 200 and r.content_type == "text/html"
        page = await r.text()
    assert (
        "http://" not in page and "https://" not in page and "//cdn" not in page
    )  # no outside assets
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs/assets/{asset}" in page
        async with server.session.get(server.u(f"/docs/assets/{asset}")) as r:
            assert r.status == 200 and len(await r.read()) > 10_000
    for bad in ("nope.js", "..%2F..%2Fsetup.cfg", "swagger-ui-bundle.js.map"):
        async with server.session.get(server.u(f"/docs/assets/{bad}")) as r:
            assert r.status == 404
    async with server.session.get(server.u("/")) as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
    assert "<h1>comfyq</h1>" in html and "<code>" in html and 'href="/docs"' in html
    assert "settings-table" not in html and "&lt;!--" not in html  # editor markers stay hidden


async def test_metrics_in_prometheus_format(server: Server) -> None:
    await wait_healthy(server)
    async with server.session.post(server.u("/generate/sync"), json=body()) as r:
        assert r.status == 200
    async with server.session.get(server.u("/result/none")) as r:
        assert r.status == 404
    async with server.session.get(server.u("/metrics")) as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("comfyq_jobs", state="completed") == 1
    assert value("comfyq_jobs_finished_total", state="completed") == 1
    assert value("comfyq_queue_depth", stage="generate", state="waiting") == 0
    assert value("comfyq_stage_duration_seconds_count", stage="generate", outcome="ok") == 1
    assert value("comfyq_stage_wait_seconds_count", stage="preprocess") == 1
    assert value("comfyq_job_duration_seconds_count", state="completed") == 1
    assert (
        value("comfyq_http_requests_total", route="/generate/sync", method="POST", status="200")
        == 1
    )
    assert (
        value("comfyq_http_requests_total", route="/result/{id}", method="GET", status="404") == 1
    )
    assert value("comfyq_stage_workers_alive", stage="postprocess") == 2
    backend = server.services.pool.snapshot()[0]["url"]
    assert value("comfyq_backend_up", backend=backend) == 1
    assert value("comfyq_webhook_deliveries", state="delivered") == 0
    assert value("comfyq_webhook_attempts", outcome="retry") == 0


async def test_health_names_each_part_and_fails_for_each(
    server: Server, simulator: Simulator
) -> None:
    await wait_healthy(server)
    async with server.session.get(server.u("/health")) as r:
        h = await r.json()
    assert r.status == 200 and h["status"] == "healthy" and h["store"]["writable"] is True
    assert (
        h["backends_healthy"] == "1/1"
        and h["backends"][0]["http_ok"]
        and h["backends"][0]["websocket_ok"]
    )
    assert {s: v["alive"] for s, v in h["stages"].items()} == {
        "preprocess": 2,
        "generate": 1,
        "postprocess": 2,
    }
    await simulator.stop()
    for _ in range(200):
        async with server.session.get(server.u("/health")) as r:
            if r.status == 503:
                h = await r.json()
                break
        await asyncio.sleep(0.05)
    assert r.status == 503 and h["status"] == "unhealthy" and "ComfyUI" in h["reason"]
    assert h["backends"][0]["healthy"] is False
    await simulator.start()
    await wait_healthy(server)
    # A stage without live workers is unhealthy too.
    workers = [t for t in asyncio.all_tasks() if t.get_name().startswith("worker-postprocess")]
    assert workers
    for t in workers:
        t.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    async with server.session.get(server.u("/health")) as r:
        h = await r.json()
    assert (
        r.status == 503
        and h["stages"]["postprocess"]["alive"] == 0
        and "postprocess" in h["reason"]
    )


@pytest.mark.parametrize("path", ["/health", "/queue-info", "/jobs", "/metrics"])
async def test_nothing_leaks_secrets(make_server: MakeServer, path: str) -> None:
    srv = await make_server(api_keys=["operator-key"], s3_secret_access_key="OPSECRET")
    auth = {"Authorization": "Bearer operator-key"}
    payload = body(
        s3={"access_key_id": "AK1", "secret_access_key": "REQSECRET", "bucket_name": "b"}
    )
    async with srv.session.post(srv.u("/generate"), json=payload, headers=auth) as r:
        assert r.status == 202
    async with srv.session.get(srv.u(path), headers=auth) as r:
        text = await r.text()
    for secret in ("operator-key", "OPSECRET", "REQSECRET", "AK1"):
        assert secret not in text


async def test_server_with_no_backend_answer_still_serves_the_api(tmp_path: Any) -> None:
    from support.servers import settings_for, start_server

    srv = await start_server(settings_for(tmp_path, "http://127.0.0.1:9"), ApiOptions())
    try:
        async with srv.session.post(srv.u("/generate"), json=body(request_id="later")) as r:
            assert r.status == 202  # accepted and durable; it runs when a backend answers
        async with srv.session.get(srv.u("/health")) as r:
            assert r.status == 503
        async with srv.session.post(srv.u("/generate/sync?timeout=0.3"), json=body()) as r:
            assert r.status == 202
    finally:
        await srv.close()
