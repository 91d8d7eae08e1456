"""Admission: request validation (field paths), request_id rules, secrets, idempotency, queue limit.

The first half calls the admission functions directly; the second half goes through a real server.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import msgspec
import pytest
from support.servers import MakeServer, Server, pause
from support.workflows import INVERT_WORKFLOW

from comfyq import admission
from comfyq.errors import BadRequest, UnsupportedMediaType
from comfyq.store.model import Stage

JSON = {"Content-Type": "application/json"}


def parse(body: Any, headers: dict[str, str] | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return admission.parse(raw, headers or JSON)


def fields_of(body: Any, headers: dict[str, str] | None = None) -> list[dict[str, str]]:
    with pytest.raises(BadRequest) as e:
        parse(body, headers)
    assert e.value.fields, e.value.message
    return e.value.fields


def paths_of(body: Any) -> list[str]:
    return [f["path"] for f in fields_of(body)]


def wf_input(**extra: Any) -> dict[str, Any]:
    return {"input": {"workflow_json": json.loads(json.dumps(INVERT_WORKFLOW)), **extra}}


# --- validation ---------------------------------------------------------------------------------


def test_valid_bodies_parse() -> None:
    inp, _ = parse(wf_input(request_id="job-1.a_b", priority=5, timeout=30))
    assert inp.request_id == "job-1.a_b" and inp.priority == 5 and inp.timeout == 30.0
    inp, _ = parse({"input": {"modifier": "ImageEffects", "modifications": {"width": 8}}})
    assert inp.modifier == "ImageEffects" and inp.modifications == {"width": 8}


def test_old_wrapper_fields_are_accepted() -> None:
    body = wf_input(
        request_id="r1",
        return_outputs_as_base64=True,
        s3={
            "access_key_id": "AK",
            "secret_access_key": "SK",
            "endpoint_url": "https://s3.example.com",
            "bucket_name": "b",
            "region": "us-east-1",
            "connect_timeout": 10,
            "connect_attempts": 2,
        },
        webhook={
            "url": "https://hooks.example.com/x",
            "extra_params": {"a": 1},
            "timeout": 5,
            "secret": "whs",
        },
        images=[{"name": "in.png", "image": "aGVsbG8="}],
    )
    inp, _ = parse(body)
    assert inp.s3 is not None and inp.s3.connect_attempts == 2
    assert inp.webhook is not None and inp.webhook.extra_params == {"a": 1}
    # The original wrapper let clients send both keys with the unused one empty.
    inp, _ = parse(
        {"input": {"modifier": "", "workflow_json": INVERT_WORKFLOW, "modifications": {}}}
    )
    assert inp.workflow_json and not inp.modifier


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (wf_input(webhook={"url": 3}), "$.input.webhook.url"),
        (wf_input(webhook={"url": "ftp://x/y"}), "$.input.webhook.url"),
        (wf_input(webhook={"url": "not a url"}), "$.input.webhook.url"),
        (wf_input(webhook={"urll": "https://x"}), "$.input.webhook.urll"),
        (wf_input(s3={"bucket": "b"}), "$.input.s3.bucket"),
        (wf_input(s3={"endpoint_url": "gopher://x"}), "$.input.s3.endpoint_url"),
        (wf_input(priority=10**6), "$.input.priority"),
        (wf_input(priority="high"), "$.input.priority"),
        (wf_input(timeout=0), "$.input.timeout"),
        (wf_input(return_outputs_as_base64="yes"), "$.input.return_outputs_as_base64"),
        (wf_input(images=[{"name": "a.png"}]), "$.input.images[0].image"),
        (
            wf_input(images=[{"name": "a", "image": "x"}, {"name": "a", "image": "y"}]),
            "$.input.images[1].name",
        ),
        (
            {"input": {"workflow_json": {"3": {"inputs": {}}}}},
            "$.input.workflow_json['3'].class_type",
        ),
        ({"input": {"workflow_json": {"3": []}}}, "$.input.workflow_json['3']"),
        (
            {"input": {"workflow_json": {"3": {"class_type": "X", "inputs": 5}}}},
            "$.input.workflow_json['3'].inputs",
        ),
        (
            {"input": {"workflow_json": INVERT_WORKFLOW, "modifications": {"a": 1}}},
            "$.input.modifications",
        ),
        ({"input": {}}, "$.input"),
        ({"input": {"workflow_json": INVERT_WORKFLOW, "modifier": "ImageEffects"}}, "$.input"),
        ({}, "$.input"),
        ({"input": []}, "$.input"),
        ([1, 2], "$"),
    ],
)
def test_bad_fields_are_named_by_path(body: Any, path: str) -> None:
    assert path in paths_of(body)


def test_every_unknown_field_is_named_at_once() -> None:
    fields = fields_of(wf_input(promt="a cat", stepz=20))
    assert {f["path"] for f in fields} == {"$.input.promt", "$.input.stepz"}
    assert all(f["message"] == "unknown field" for f in fields)


@pytest.mark.parametrize("rid", ["a", "A-b_c.9", "x" * 128, "_under", "-dash", "1.2.3"])
def test_good_request_ids(rid: str) -> None:
    inp, _ = parse(wf_input(request_id=rid))
    assert inp.request_id == rid


@pytest.mark.parametrize(
    "rid", [".", "..", ".hidden", "x" * 129, "a/b", "../x", "a b", "é", "a\\b", "/etc", "a\x00"]
)
def test_bad_request_ids(rid: str) -> None:
    assert paths_of(wf_input(request_id=rid)) == ["$.input.request_id"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"not json",
        b'{"input": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"input": {"workflow_json": {"1": {"class_type": "X", "inputs": {"v": 1e999}}}}}',
    ],
)
def test_broken_json_is_a_400_at_the_root(raw: bytes) -> None:
    assert [f["path"] for f in fields_of(raw)] == ["$"]


def test_deep_nesting_is_refused() -> None:
    deep: Any = 1
    for _ in range(admission.MAX_DEPTH + 5):
        deep = {"k": deep}
    assert paths_of(wf_input(webhook={"url": "https://x.example", "extra_params": deep})) == ["$"]


@pytest.mark.parametrize(
    "ctype",
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/json",
        "application/vnd.api+json",
        None,
    ],
)
def test_json_media_types_are_accepted(ctype: str | None) -> None:
    admission.check_media_type(ctype)


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"]
)
def test_other_media_types_are_415(ctype: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        admission.check_media_type(ctype)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("no", False),
        ("", False),
    ],
)
def test_base64_header(value: str, expected: bool) -> None:
    inp, _ = parse(wf_input(), {**JSON, "X-Return-Outputs-As-Base64": value})
    assert inp.return_outputs_as_base64 is expected


def test_build_strips_secrets_and_hashes_everything() -> None:
    body = wf_input(
        request_id="r1",
        s3={"access_key_id": "AK", "secret_access_key": "SK", "bucket_name": "b"},
        webhook={"url": "https://h.example/x", "secret": "whs"},
    )
    body["input"]["workflow_json"]["1"]["_meta"] = {"title": "kept verbatim"}
    inp, raw = parse(body)
    adm = admission.build(inp, raw, max_attempts=4, default_timeout=99.0)
    new = adm.new
    assert (
        new.id == "r1" and new.kind == "workflow" and new.max_attempts == 4 and new.timeout == 99.0
    )
    assert new.secrets == {
        "s3": {"access_key_id": "AK", "secret_access_key": "SK"},
        "webhook_secret": "whs",
    }
    stored = msgspec.json.encode(new.payload).decode()
    assert "AK" not in stored and "SK" not in stored and "whs" not in stored
    assert new.payload["input"]["s3"] == {"bucket_name": "b"}
    workflow = msgspec.json.decode(new.payload["input"]["workflow_json"])
    assert workflow["1"]["_meta"] == {"title": "kept verbatim"}
    # Same request again: same hash. Another secret: another hash (a different request).
    inp2, raw2 = parse(json.loads(json.dumps(body)))
    assert (
        admission.build(inp2, raw2, max_attempts=4, default_timeout=99.0).new.payload_hash
        == new.payload_hash
    )
    body["input"]["webhook"]["secret"] = "other"
    inp3, raw3 = parse(body)
    assert (
        admission.build(inp3, raw3, max_attempts=4, default_timeout=99.0).new.payload_hash
        != new.payload_hash
    )


def test_build_mints_ids_and_names_kind_after_the_modifier() -> None:
    inp, raw = parse({"input": {"modifier": "ImageEffects", "priority": 3, "timeout": 12}})
    a = admission.build(inp, raw, max_attempts=3, default_timeout=3600).new
    b = admission.build(inp, raw, max_attempts=3, default_timeout=3600).new
    assert (
        a.id != b.id
        and len(a.id) == 32
        and a.kind == "ImageEffects"
        and a.priority == 3
        and a.timeout == 12
    )


# --- over HTTP ----------------------------------------------------------------------------------


async def post(srv: Server, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    headers = kw.pop("headers", JSON)
    async with srv.session.post(srv.u(path), data=data, headers=headers, **kw) as r:
        return r.status, await r.json(), r.headers


async def test_generate_answers_202_after_commit(server: Server) -> None:
    status, body, headers = await post(server, "/generate", wf_input(request_id="commit-1"))
    assert status == 202 and body["id"] == "commit-1" and body["status"] == "queued"
    assert headers["Location"] == "/result/commit-1"
    # Committed: a separate read connection sees the row at once.
    import sqlite3

    conn = sqlite3.connect(server.services.settings.database)
    try:
        assert conn.execute("SELECT count(*) FROM jobs WHERE id = 'commit-1'").fetchone() == (1,)
    finally:
        conn.close()


async def test_400_envelope_names_fields(server: Server) -> None:
    status, body, _ = await post(server, "/generate", wf_input(webhook={"url": "ftp://x"}, bogus=1))
    assert status == 400
    err = body["error"]
    assert err["type"] == "invalid_request" and isinstance(err["message"], str)
    assert {f["path"] for f in err["fields"]} == {
        "$.input.bogus"
    }  # unknown fields are reported first


async def test_415_for_non_json_and_413_over_the_limit(make_server: MakeServer) -> None:
    srv = await make_server(max_body_bytes=4096)
    status, body, _ = await post(
        srv, "/generate", "input=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415 and body["error"]["type"] == "unsupported_media_type"
    big = wf_input(webhook={"url": "https://x.example", "extra_params": {"pad": "x" * 10_000}})
    for path in ("/generate", "/generate/sync", "/generate/stream"):
        status, body, _ = await post(srv, path, big)
        assert status == 413 and body["error"]["type"] == "payload_too_large", path


async def test_unknown_modifier_and_bad_modifications_are_400(server: Server) -> None:
    status, body, _ = await post(server, "/generate", {"input": {"modifier": "NoSuchThing"}})
    assert status == 400 and body["error"]["fields"][0]["path"] == "$.input.modifier"
    assert "ImageEffects" in body["error"]["message"]
    status, body, _ = await post(
        server, "/generate", {"input": {"modifier": "ImageEffects", "modifications": {"widht": 5}}}
    )
    assert status == 400 and body["error"]["fields"][0]["path"] == "$.input.modifications.widht"


async def test_private_input_urls_are_refused_at_admission(server: Server) -> None:
    wf = json.loads(json.dumps(INVERT_WORKFLOW))
    wf["1"]["inputs"]["color"] = "http://169.254.169.254/latest/meta-data"
    status, body, _ = await post(server, "/generate", {"input": {"workflow_json": wf}})
    assert status == 400
    assert body["error"]["fields"][0]["path"].startswith("$.input.workflow_json")
    status, body, _ = await post(
        server, "/generate", wf_input(webhook={"url": "http://10.1.2.3/hook"})
    )
    assert status == 400 and body["error"]["fields"][0]["path"] == "$.input.webhook.url"


async def test_idempotent_request_id(server: Server) -> None:
    body = wf_input(request_id="same-1", webhook={"url": "https://h.example/x", "secret": "s1"})
    s1, r1, _ = await post(server, "/generate", body)
    s2, r2, h2 = await post(server, "/generate", body)
    assert (
        (s1, s2) == (202, 200)
        and r2["id"] == r1["id"] == "same-1"
        and h2["Location"] == "/result/same-1"
    )
    async with server.session.get(server.u("/jobs?limit=500")) as r:
        assert [j["id"] for j in (await r.json())["jobs"]].count("same-1") == 1
    changed = wf_input(request_id="same-1", webhook={"url": "https://h.example/x", "secret": "s2"})
    for path in ("/generate", "/generate/sync", "/generate/stream"):
        status, err, _ = await post(server, path, changed)
        assert status == 409 and err["error"]["type"] == "conflict", path
        assert err["error"]["fields"][0]["path"] == "$.input.request_id"


async def test_secrets_never_stored_with_the_job(server: Server) -> None:
    body = wf_input(
        request_id="sec-1",
        s3={"access_key_id": "AKIAXXX", "secret_access_key": "VERYSECRET", "bucket_name": "b"},
        webhook={"url": "https://h.example/x", "secret": "WHSECRET"},
    )
    status, res, _ = await post(server, "/generate", body)
    assert status == 202
    job = await server.services.store.get("sec-1")
    assert job is not None
    dumped = json.dumps(job.payload)
    for secret in ("AKIAXXX", "VERYSECRET", "WHSECRET"):
        assert secret not in dumped and secret not in json.dumps(res)
    secrets = await server.services.store.secrets("sec-1")
    # Until the job ends (then the store deletes them).
    assert secrets in (
        {},
        {
            "s3": {"access_key_id": "AKIAXXX", "secret_access_key": "VERYSECRET"},
            "webhook_secret": "WHSECRET",
        },
    )
    async with server.session.get(server.u("/jobs/sec-1")) as r:
        text = await r.text()
    assert "VERYSECRET" not in text and "WHSECRET" not in text


async def test_queue_full_is_503_with_retry_after(make_server: MakeServer) -> None:
    srv = await make_server(max_queue_size=2)
    pause(srv, Stage.PREPROCESS)  # nothing drains: the queue stays full
    for i in range(2):
        status, _, _ = await post(srv, "/generate", wf_input(request_id=f"q{i}"))
        assert status == 202
    for path in ("/generate", "/generate/sync", "/generate/stream"):
        status, body, headers = await post(srv, path, wf_input())
        assert status == 503 and body["error"]["type"] == "queue_full", path
        assert int(headers["Retry-After"]) > 0
    # A repeat of an admitted request is not a new job: it is answered even when full.
    status, body, _ = await post(srv, "/generate", wf_input(request_id="q0"))
    assert status == 200 and body["id"] == "q0"


def test_minted_job_ids_are_32_hex_digits_in_time_order() -> None:
    first = admission.new_job_id()
    time.sleep(0.002)
    second = admission.new_job_id()
    assert re.fullmatch(r"[0-9a-f]{32}", first) and re.fullmatch(r"[0-9a-f]{32}", second)
    assert first < second  # appended at the end of the primary-key index
    assert abs(int(first[:12], 16) - time.time() * 1000) < 60_000
    assert len({admission.new_job_id() for _ in range(1000)}) == 1000


def _depth(value: Any) -> int:
    children = (
        list(value.values())
        if isinstance(value, dict)
        else value
        if isinstance(value, list)
        else None
    )
    return 1 + max((_depth(c) for c in children), default=0) if children else 1


@pytest.mark.parametrize(
    "n",
    [
        admission.MAX_DEPTH - 2,
        admission.MAX_DEPTH - 1,
        admission.MAX_DEPTH,
        admission.MAX_DEPTH + 1,
    ],
)
@pytest.mark.parametrize("leaf", [1, {}, [], "x", [None]])
def test_depth_limit_counts_every_value(n: int, leaf: Any) -> None:
    value: Any = leaf
    for i in range(n):
        value = {"k": value, "w": [1, 2]} if i % 2 else [0, value]
    assert admission._depth_ok(value) is (_depth(value) <= admission.MAX_DEPTH)


def test_payload_keeps_field_order_and_the_workflow_verbatim() -> None:
    body = wf_input(
        request_id="r2",
        priority=5,
        webhook={"url": "https://h.example/x", "extra_params": {"b": 1, "a": 2}},
    )
    body["input"]["workflow_json"]["1"]["_meta"] = {"title": "t"}
    inp, raw = parse(body)
    new = admission.build(inp, raw, max_attempts=3, default_timeout=60.0).new
    assert list(new.payload["input"]) == ["request_id", "workflow_json", "webhook", "priority"]
    # The workflow is kept as sent (as JSON text: its decoded nodes are let go).
    assert msgspec.json.decode(new.payload["input"]["workflow_json"]) == raw["workflow_json"]
    # The hash is that of the canonical form of the whole normalised input, workflow included.
    full = {**msgspec.to_builtins(inp), "workflow_json": raw["workflow_json"]}
    assert new.payload_hash == admission.canonical_hash(full)


def test_unknown_fields_are_all_named_before_any_type_error() -> None:
    body = wf_input(priority="high", colour=1, zeta=2)
    body["input"]["workflow_json"]["9"] = {"inputs": {}}
    assert paths_of(body) == [
        "$.input.colour",
        "$.input.zeta",
        "$.input.workflow_json['9'].class_type",
    ]
