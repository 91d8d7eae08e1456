"""API keys with roles and job ownership: two client keys and one admin key over every route.

A client key sees, streams, cancels and downloads only the jobs it created; another client's job
answers 404 exactly like a job that does not exist. An admin key sees everything and reaches the
operator surfaces. Keys come from COMFYQ_API_KEYS and COMFYQ_API_KEYS_FILE (re-read on SIGHUP).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.servers import MakeServer, Server, wait_healthy
from support.workflows import workflow

from comfyq.api.auth import ANONYMOUS, KeyFileError, Keys, Principal, key_id, parse_key
from comfyq.app import app_routes
from modifiers.registry import ModifierRegistry

ADMIN, CA, CB = "admin-key-1", "client-key-a", "client-key-b"
KEYS = [ADMIN, f"client:{CA}", f"client:{CB}"]
_colors = itertools.count(31000)


def h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(**extra: Any) -> dict[str, Any]:
    return {"input": {"workflow_json": workflow(next(_colors)), **extra}}


# --- the key syntax and the key set ----------------------------------------------------------


def test_key_syntax_and_default_role() -> None:
    assert parse_key("plain", "x") == ("plain", "admin")  # existing deployments keep full access
    assert parse_key(" client:abc ", "x") == ("abc", "client")
    assert parse_key("ADMIN:abc", "x") == ("abc", "admin")
    assert parse_key("other:abc", "x") == ("other:abc", "admin")  # only the two roles are prefixes
    assert parse_key("# comment", "x") is None and parse_key("  ", "x") is None
    with pytest.raises(KeyFileError, match="without a key"):
        parse_key("client:", "keys.txt:3")


def test_key_id_is_stable_and_not_the_key() -> None:
    kid = key_id("s3cret-value")
    assert kid == key_id("s3cret-value") and kid != key_id("s3cret-valuf")
    assert kid.startswith("k_") and len(kid) == 18 and "s3cret" not in kid


def test_keys_from_env_and_file_reload(tmp_path: Path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text("# operators\nadmin:op1\n\nclient:c1\n")
    keys = Keys(["envkey"], str(f))
    assert keys.principal("envkey") == Principal(key_id("envkey"), "admin")
    assert keys.principal("op1") == Principal(key_id("op1"), "admin")
    assert keys.principal("c1") == Principal(key_id("c1"), "client")
    assert keys.principal("nope") is None and keys.principal(None) is None
    f.write_text("client:c2\n")
    assert keys.reload()
    assert keys.principal("c1") is None and keys.principal("c2") is not None
    assert keys.principal("envkey") is not None  # the environment's keys stay
    f.write_text("client:\n")  # a broken file keeps the keys in force
    assert not keys.reload() and keys.principal("c2") is not None
    f.unlink()
    assert not keys.reload() and keys.principal("c2") is not None
    assert Keys([], "").principal(None) is ANONYMOUS  # no keys: authentication is off


def test_principal_visibility() -> None:
    a, b = Principal("k_a", "client"), Principal("k_b", "client")
    assert a.can_see("k_a") and not a.can_see("k_b") and not a.can_see(None)
    assert ANONYMOUS.can_see("k_a") and ANONYMOUS.can_see(None)
    assert a.visible_owners() == ["k_a"] and ANONYMOUS.visible_owners() is None
    assert b.visible_owners() == ["k_b"] and Principal(None, "client").visible_owners() == []


# --- every route with two clients and an admin -----------------------------------------------


async def _job(srv: Server, key: str, rid: str) -> dict[str, Any]:
    async with srv.session.post(
        srv.u("/generate/sync"), json=body(request_id=rid), headers=h(key)
    ) as r:
        assert r.status == 200, await r.text()
        res: dict[str, Any] = await r.json()
        return res


async def _status(srv: Server, method: str, path: str, key: str, **kw: Any) -> int:
    async with srv.session.request(method, srv.u(path), headers=h(key), **kw) as r:
        await r.read()
        return r.status


# Which route each check below covers; a new route must be added here (and decided).
COVERED = {
    ("POST", "/generate"),
    ("POST", "/generate/sync"),
    ("POST", "/generate/stream"),
    ("GET", "/result/{id}"),
    ("POST", "/cancel/{id}"),
    ("GET", "/queue-info"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{id}"),
    ("DELETE", "/jobs/{id}"),
    ("GET", "/jobs/{id}/events"),
    ("GET", "/outputs/{id}/{filename}"),
    ("GET", "/metrics"),
    ("GET", "/ws"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
    ("GET", "/docs/assets/{name}"),
    ("POST", "/jobs/{id}/retry"),
    ("POST", "/jobs/{id}/delete"),
    ("GET", "/ui"),
    ("GET", "/ui/static/{name}"),
    ("GET", "/ui/api/jobs"),
    ("GET", "/ui/api/counts"),
    ("GET", "/ui/api/jobs/{id}"),
    ("GET", "/ui/api/stats"),
    ("GET", "/ui/api/modifiers"),
    ("GET", "/ui/api/session"),
}
# Routes whose checks live in other test files: /ready is public like /health (test_api_http's
# PUBLIC walk, test_peers_ready); the v2 routes: a client key sees only its own jobs and assets,
# an admin all (test_v2_api::test_client_keys_see_only_their_own_jobs_and_assets).
EXTRA_COVERED: set[tuple[str, str]] = {
    ("GET", "/ready"),
    ("GET", "/api/v2/health"),
    ("POST", "/api/v2/jobs"),
    ("GET", "/api/v2/jobs"),
    ("GET", "/api/v2/jobs/{id}"),
    ("GET", "/api/v2/jobs/{id}/workflow"),
    ("POST", "/api/v2/jobs/{id}/cancel"),
    ("GET", "/api/v2/jobs/{id}/events"),
    ("POST", "/api/v2/assets"),
    ("POST", "/api/v2/assets/from-hash"),
    ("HEAD", "/api/v2/assets/by-hash/{hash}"),
    ("GET", "/api/v2/assets/{id}"),
    ("GET", "/api/v2/assets/{id}/content"),
    ("DELETE", "/api/v2/assets/{id}"),
}


def test_every_route_is_covered() -> None:
    routes = {(r.method, r.path) for r in app_routes(ModifierRegistry())}
    # /workflows/{name}[/sync]: one pair per typed modifier, checked below with ImageEffects.
    routes = {(m, p) for m, p in routes if not p.startswith("/workflows/")}
    assert routes - COVERED - EXTRA_COVERED == set(), "decide who may call the new route(s)"


async def test_two_clients_and_an_admin_over_every_route(make_server: MakeServer) -> None:
    srv = await make_server(api_keys=KEYS)
    await wait_healthy(srv)
    ja = await _job(srv, CA, "own-a")
    await _job(srv, CB, "own-b")
    await _job(srv, ADMIN, "own-admin")
    fa = ja["output"][0]["filename"]
    owners = {j.id: j.owner for j in await srv.services.store.list_jobs(limit=100)}
    assert owners == {"own-a": key_id(CA), "own-b": key_id(CB), "own-admin": key_id(ADMIN)}
    raw = Path(srv.services.db_path).read_bytes()
    assert CA.encode() not in raw and ADMIN.encode() not in raw

    # Reads of one job: the owner and the admin, never the other client (404, like a missing job).
    for path in ("/result/own-a", "/jobs/own-a", f"/outputs/own-a/{fa}", "/jobs/own-a/events"):
        assert await _status(srv, "GET", path, CA) == 200, path
        assert await _status(srv, "GET", path, ADMIN) == 200, path
        async with srv.session.get(srv.u(path), headers=h(CB)) as r:
            assert r.status == 404, path
            err = (await r.json())["error"]
            assert err["type"] == "not_found"
        missing = path.replace("own-a", "no-such-job")
        assert await _status(srv, "GET", missing, CB) == 404
    # Listing: each client its own jobs; the admin all of them.
    for key, ids in ((CA, {"own-a"}), (CB, {"own-b"}), (ADMIN, {"own-a", "own-b", "own-admin"})):
        async with srv.session.get(srv.u("/jobs"), headers=h(key)) as r:
            assert {j["id"] for j in (await r.json())["jobs"]} == ids
    async with srv.session.get(srv.u("/jobs?status=completed&limit=1"), headers=h(CA)) as r:
        page = await r.json()
        assert [j["id"] for j in page["jobs"]] == ["own-a"] and page["next_cursor"] is None
    # Cancelling another client's job: 404, and the job is untouched.
    for method, prefix in (("POST", "/cancel/"), ("DELETE", "/jobs/")):
        assert await _status(srv, method, prefix + "own-b", CA) == 404
        assert await _status(srv, method, prefix + "own-admin", CB) == 404
        assert await _status(srv, method, prefix + "own-b", CB) == 200
        assert await _status(srv, method, prefix + "own-b", ADMIN) == 200
    # A request_id another key used is a conflict, never that key's job.
    async with srv.session.post(
        srv.u("/generate"), json=body(request_id="own-b"), headers=h(CA)
    ) as r:
        assert r.status == 409 and "own-b" not in json.dumps((await r.json()).get("result", {}))
    # A repeated request of one's own is still answered with its job (idempotency).
    async with srv.session.post(
        srv.u("/generate"), json={"input": {"workflow_json": {}}}, headers=h(CA)
    ) as r:
        assert r.status == 400
    # Streams: the owner's stream works; generate/stream and generate record the owner.
    async with srv.session.post(
        srv.u("/generate/stream"), json=body(request_id="own-a-stream"), headers=h(CA)
    ) as r:
        assert r.status == 200 and b"final_result" in await r.read()
    assert await _status(srv, "POST", "/generate", CA, json=body(request_id="own-a-2")) == 202
    assert await _status(srv, "GET", "/jobs/own-a-stream", CB) == 404
    assert await _status(srv, "GET", "/jobs/own-a-2", CB) == 404
    assert await _status(srv, "GET", "/jobs/own-a-2", CA) == 200
    # Operator surfaces: metrics for admins only; queue sizes, docs, health for every key.
    assert await _status(srv, "GET", "/metrics", ADMIN) == 200
    async with srv.session.get(srv.u("/metrics"), headers=h(CA)) as r:
        assert r.status == 403 and (await r.json())["error"]["type"] == "forbidden"
    # The typed workflow routes record the owner like /generate.
    wf = "/workflows/ImageEffects/sync?request_id=own-a-wf"
    assert await _status(srv, "POST", wf, CA, json={"width": 16, "height": 16}) == 200
    assert await _status(srv, "GET", "/jobs/own-a-wf", CB) == 404
    assert await _status(srv, "GET", "/jobs/own-a-wf", CA) == 200
    async with srv.session.post(
        srv.u("/workflows/ImageEffects?request_id=own-a-wf"), json={"width": 16}, headers=h(CB)
    ) as r:
        assert r.status == 409
    for path in ("/queue-info", "/docs", "/openapi.json", "/", "/health", "/ready"):
        for key in (ADMIN, CA, CB):
            assert await _status(srv, "GET", path, key) == 200, (path, key)
    assert await _status(srv, "GET", "/docs/assets/swagger-ui.css", CA) == 200
    for key in ("wrong", ""):
        assert await _status(srv, "GET", "/jobs", key) == 401

    # The dashboard's reads and actions follow the same rule.
    for key, ids in ((CA, {"own-a", "own-a-stream", "own-a-2", "own-a-wf"}), (CB, {"own-b"})):
        async with srv.session.get(srv.u("/ui/api/jobs"), headers=h(key)) as r:
            assert {j["id"] for j in (await r.json())["jobs"]} == ids
        async with srv.session.get(srv.u("/ui/api/counts"), headers=h(key)) as r:
            assert (await r.json())["total"] == len(ids)
    async with srv.session.get(srv.u("/ui/api/jobs?q=own-"), headers=h(ADMIN)) as r:
        assert len((await r.json())["jobs"]) == 6
    async with srv.session.get(srv.u("/ui/api/counts"), headers=h(ADMIN)) as r:
        assert (await r.json())["total"] == 6
    assert await _status(srv, "GET", "/ui/api/jobs/own-a", CA) == 200
    assert await _status(srv, "GET", "/ui/api/jobs/own-a", ADMIN) == 200
    assert await _status(srv, "GET", "/ui/api/jobs/own-a", CB) == 404
    assert await _status(srv, "POST", "/jobs/own-b/retry", CA) == 404
    assert await _status(srv, "POST", "/jobs/own-b/delete", CA) == 404
    assert await _status(srv, "POST", "/jobs/own-b/retry", CB) == 409  # completed: no retry
    bad = {"input": {"request_id": "own-b-bad", "workflow_json": {"1": {"class_type": "Nope"}}}}
    assert await _status(srv, "POST", "/generate/sync", CB, json=bad) == 400  # failed
    assert await _status(srv, "POST", "/jobs/own-b-bad/retry", CA) == 404
    assert await _status(srv, "POST", "/jobs/own-b-bad/retry", CB) == 200
    assert await _status(srv, "POST", "/jobs/own-a/retry", CA) == 409  # completed: no retry
    assert await _status(srv, "POST", "/jobs/own-a/delete", CB) == 404
    assert await _status(srv, "POST", "/jobs/own-a/delete", CA) == 200
    assert await _status(srv, "GET", "/jobs/own-a", ADMIN) == 404
    assert await _status(srv, "GET", "/ui/api/stats", ADMIN) == 200
    assert await _status(srv, "GET", "/ui/api/stats", CA) == 403
    for path in ("/ui/api/modifiers", "/ui", "/ui/static/app.js"):
        for key in (ADMIN, CA):
            assert await _status(srv, "GET", path, key) == 200, path
    assert await _status(srv, "GET", "/ui", "wrong") == 200  # the page asks for a key itself
    for key, who in (
        ("wrong", {"keys_required": True, "authenticated": False, "role": None, "key_id": None}),
        (
            CA,
            {"keys_required": True, "authenticated": True, "role": "client", "key_id": key_id(CA)},
        ),
        (
            ADMIN,
            {
                "keys_required": True,
                "authenticated": True,
                "role": "admin",
                "key_id": key_id(ADMIN),
            },
        ),
    ):
        async with srv.session.get(srv.u("/ui/api/session"), headers=h(key)) as r:
            assert r.status == 200 and await r.json() == who
    assert await _status(srv, "GET", "/ui/api/jobs", "wrong") == 401


async def _ws(srv: Server, key: str, *, protocol: bool = False) -> aiohttp.ClientWebSocketResponse:
    if protocol:  # the dashboard's way: the key as a subprotocol, never in the URL
        enc = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        return await srv.session.ws_connect(
            srv.u("/ws"), protocols=("comfyq", f"comfyq.bearer.{enc}")
        )
    return await srv.session.ws_connect(srv.u("/ws"), headers=h(key))


async def _until_final(ws: aiohttp.ClientWebSocketResponse, rid: str) -> list[dict[str, Any]]:
    seen = []
    while True:
        msg = await ws.receive(15)
        if msg.type == aiohttp.WSMsgType.BINARY:
            seen.append({"binary": msg.data})
            continue
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        ev = json.loads(msg.data)
        seen.append(ev)
        if ev.get("status") == "final_result" and ev["request_id"] == rid:
            return seen


async def test_ws_star_shows_a_client_only_its_own_jobs(make_server: MakeServer) -> None:
    srv = await make_server(api_keys=KEYS)
    await wait_healthy(srv)
    await _job(srv, CA, "ws-a0")
    async with await _ws(srv, CA, protocol=True) as wa, await _ws(srv, ADMIN) as wadm:
        assert wa.protocol == "comfyq"
        for ws in (wa, wadm):
            # "*" then one known job: its answer proves "*" is in place (messages run in order).
            await ws.send_json({"subscribe": "*"})
            await ws.send_json({"subscribe": ["ws-a0"]})
            first = json.loads((await ws.receive(10)).data)
            assert first["request_id"] == "ws-a0" and first["status"] == "final_result"
        await wa.send_json({"subscribe": ["own-b-x"]})
        await _job(srv, CB, "ws-b")
        await _job(srv, CA, "ws-a")
        # Previews too: only the owner's (and the admin's) connections get them.
        png = b"\x89PNG\r\n\x1a\nfake"
        srv.services.bus.live("ws-b", "preview", {"node": "4", "mime": "image/png"}, png)
        srv.services.bus.live("ws-a", "preview", {"node": "4", "mime": "image/png"}, png)
        await _job(srv, CA, "ws-a-end")
        got_a = await _until_final(wa, "ws-a-end")
        ids_a = {e.get("request_id") for e in got_a if "request_id" in e}
        assert ids_a == {"ws-a", "ws-a-end"}, ids_a
        err = [e for e in got_a if "error" in e]
        assert err and err[0]["error"]["details"]["job_id"] == "own-b-x"
        binaries = [e["binary"] for e in got_a if "binary" in e]
        assert len(binaries) == 1 and b'"ws-a"' in binaries[0]
        got_adm = await _until_final(wadm, "ws-a-end")
        ids_adm = {e.get("request_id") for e in got_adm if "request_id" in e}
        assert ids_adm == {"ws-b", "ws-a", "ws-a-end"}
        assert len([e for e in got_adm if "binary" in e]) == 2
        # Subscribing by id to another client's job: not found, and none of its events follow.
        await wa.send_json({"subscribe": ["ws-b"]})
        nf = json.loads((await wa.receive(10)).data)
        assert nf["error"]["type"] == "not_found" and nf["error"]["details"]["job_id"] == "ws-b"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # "wrong" as a subprotocol
        await srv.session.ws_connect(srv.u("/ws"), protocols=("comfyq", "comfyq.bearer.d3Jvbmc"))
    assert refused.value.status == 401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, key: str) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers=h(key))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_keys_file_is_reloaded_on_sighup(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("client:first-key\n")
    port = _free_port()
    env = {
        **os.environ,
        "COMFYQ_API_KEYS": "env-admin",
        "COMFYQ_API_KEYS_FILE": str(keys),
        "COMFYQ_DATABASE": str(tmp_path / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(tmp_path / "out"),
        "COMFYQ_CACHE_DIR": str(tmp_path / "cache"),
        "API_PORT": str(port),
        "COMFYQ_CONFIG": str(tmp_path / "none.toml"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfyq", "serve", "--simulate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "comfyq listening on" in line:
                break
        else:
            pytest.fail("server did not start")
        url = f"http://127.0.0.1:{port}/queue-info"
        assert _get(url, "first-key") == 200 and _get(url, "second-key") == 401
        keys.write_text("client:second-key\n")
        proc.send_signal(signal.SIGHUP)
        for line in proc.stdout:
            if "API keys reloaded" in line:
                break
        assert _get(url, "second-key") == 200 and _get(url, "first-key") == 401
        assert _get(url, "env-admin") == 200
    finally:
        proc.terminate()
        proc.wait(30)
