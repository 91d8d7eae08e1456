"""Webhooks: the outbox trigger, signing as a Standard Webhooks receiver checks it, retries against
a real receiver that fails, hangs or drops the connection, limits, the address guard, secrets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook
from support.webhooks import (
    Receiver,
    attempts,
    complete,
    deliveries,
    delivery_ended,
    hook_job,
    wait_until,
)

from comfyq.netguard import AddressGuard
from comfyq.store import JobStore, NewJob, open_store
from comfyq.webhooks import WebhookConfig, WebhookSender, history, sign

SECRET = "whsec_" + base64.b64encode(b"a 24-byte secret for hmac").decode()
FAST: dict[str, Any] = {"timeout": 5.0, "retry_base": 0.02, "retry_max": 0.1, "poll_interval": 0.2}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    s = open_store(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


Senders = list[WebhookSender]


@pytest.fixture
async def senders() -> AsyncIterator[Senders]:
    made: Senders = []
    yield made
    for s in made:
        await s.stop(grace=0)


async def start_sender(
    made: Senders, store: JobStore, guard: AddressGuard | None = None, **cfg: Any
) -> WebhookSender:
    sender = WebhookSender(
        store, guard or AddressGuard(["127.0.0.1"]), WebhookConfig(**{**FAST, **cfg})
    )
    await sender.start()
    made.append(sender)
    return sender


# --- the trigger -----------------------------------------------------------------------------


async def test_ending_a_job_queues_one_delivery_in_the_same_transaction(store: JobStore) -> None:
    await store.create(
        hook_job("a", "https://user:pw@Hooks.Example:8443/in?token=t", secret="s1"), 10
    )
    await store.create(NewJob(id="b", payload={"input": {}}, payload_hash="b"), 10)
    await store.create(
        NewJob(id="c", payload={"input": {"webhook": {"url": 3}}}, payload_hash="c"), 10
    )
    await store.create(
        NewJob(id="d", payload={"input": {"webhook": {"url": ""}}}, payload_hash="d"), 10
    )
    assert await deliveries(store) == []  # nothing before the job ends
    for job_id in "abcd":
        await store.request_cancel(job_id)
    rows = await deliveries(store)
    assert [r["job_id"] for r in rows] == ["a"]
    d = rows[0]
    job = await store.get("a")
    assert job is not None
    assert d["event"] == "cancelled" and d["state"] == "pending" and d["attempts"] == 0
    assert d["job_finished_at"] == job.finished_at == d["next_attempt_at"]
    assert d["host"] == "hooks.example:8443" and d["id"].startswith("msg_")
    # The secret moved from job_secrets (deleted by finish) to the delivery, and only there.
    assert d["secret"] == "s1" and await store.secrets("a") == {}


async def test_a_refused_transition_writes_no_delivery(store: JobStore) -> None:
    await store.create(hook_job("a", "https://h.example/x"), 10)
    await store.request_cancel("a")
    await store.request_cancel("a")  # already cancelled: no second end, no second delivery
    assert len(await deliveries(store)) == 1


# --- delivery and signing --------------------------------------------------------------------


async def test_delivered_once_and_verified_like_a_standard_webhooks_receiver(
    store: JobStore, receiver: Receiver, senders: Senders, tmp_path: Path
) -> None:
    out = tmp_path / "x.png"
    out.write_bytes(b"\x89PNG fake")
    await store.create(
        hook_job("j1", receiver.url + "?token=abc", secret=SECRET, extra={"user": 7}), 10
    )
    await complete(store, "j1", [("x.png", out)])
    await start_sender(senders, store)
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "delivered" and d["attempts"] == 1 and d["last_status"] == 204
    assert d["secret"] is None  # erased once the delivery ended
    [hit] = receiver.hits
    body = Webhook(SECRET).verify(
        hit.body, hit.headers
    )  # raises unless id, timestamp, signature match
    assert hit.headers["webhook-id"] == d["id"]
    assert body["id"] == "j1" and body["status"] == "completed" and body["extra"] == {"user": 7}
    assert body["message"] == "Processing complete." and body["error"] is None
    assert body["timings"]["total_ms"] >= 0
    [o] = body["output"]
    assert o["filename"] == "x.png" and o["url"] == "/outputs/j1/x.png" and "local_path" not in o
    assert "data" not in o  # base64 only when asked
    # The original wrapper's header still verifies for old receivers.
    legacy = "sha256=" + hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hit.headers["X-Webhook-Signature"] == legacy
    assert SECRET not in hit.body.decode()
    [a] = await attempts(store, "j1")
    assert (a["attempt"], a["status_code"], a["outcome"], a["error"]) == (1, 204, "delivered", None)


async def test_a_tampered_body_or_other_secret_fails_verification(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    await store.create(hook_job("j1", receiver.url, secret=SECRET), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store)
    await wait_until(lambda: delivery_ended(store, "j1"))
    hit = receiver.hits[0]
    from standardwebhooks.webhooks import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(hit.body.replace(b"cancelled", b"completed"), hit.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another secret").decode()).verify(
            hit.body, hit.headers
        )


async def test_plain_secret_default_secret_and_no_secret(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    await store.create(hook_job("own", receiver.url, secret="plain-secret"), 10)
    await store.create(hook_job("default", receiver.url), 10)
    for job_id in ("own", "default"):
        await store.request_cancel(job_id)
    await start_sender(senders, store, default_secret="operator-secret")
    await receiver.wait_hits(2)
    by_job = {json.loads(h.body)["id"]: h for h in receiver.hits}
    # A secret without the whsec_ prefix is used as its bytes, which a receiver passes as bytes.
    Webhook(b"plain-secret").verify(by_job["own"].body, by_job["own"].headers)
    Webhook(b"operator-secret").verify(by_job["default"].body, by_job["default"].headers)
    ts, mid = by_job["own"].headers["webhook-timestamp"], by_job["own"].headers["webhook-id"]
    assert by_job["own"].headers["webhook-signature"] == sign(
        "plain-secret", mid, int(ts), by_job["own"].body
    )

    await senders.pop().stop()
    unsigned = await Receiver().start()
    try:
        await store.create(hook_job("none", unsigned.url), 10)
        await store.request_cancel("none")
        await start_sender(senders, store)  # no default secret
        [hit] = await unsigned.wait_hits(1)
        assert "webhook-signature" not in {k.lower() for k in hit.headers}
        assert hit.headers["webhook-id"] and hit.headers["webhook-timestamp"]
    finally:
        await unsigned.stop()


async def test_retries_500_dropped_connection_and_hang_then_delivers_once(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    receiver.plan.extend(["500", "drop", "hang", "302", "ok"])
    await store.create(hook_job("j1", receiver.url, secret=SECRET), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store, timeout=0.3)
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "delivered" and d["attempts"] == 5 and d["secret"] is None
    rows = await attempts(store, "j1")
    assert [r["outcome"] for r in rows] == ["retry"] * 4 + ["delivered"]
    assert [r["status_code"] for r in rows] == [500, None, None, 302, 204]
    assert rows[0]["error"] == "HTTP 500"
    assert "Disconnected" in rows[1]["error"] or "Connection" in rows[1]["error"]
    assert rows[2]["error"] == "timed out after 0.3s"
    assert "redirects are not followed" in rows[3]["error"]
    assert [r["attempt"] for r in rows] == [1, 2, 3, 4, 5]
    # The same message every time: one webhook-id, and each attempt verifies on its own.
    assert {h.headers["webhook-id"] for h in receiver.hits} == {d["id"]}
    bodies = {h.body for h in receiver.hits}
    assert len(bodies) == 1
    for h in receiver.hits:
        Webhook(SECRET).verify(h.body, h.headers)
    assert len(receiver.ok_hits()) == 1


async def test_burst_mode_delivers_what_is_due_without_the_loop(
    store: JobStore, receiver: Receiver
) -> None:
    for i in range(3):
        await store.create(hook_job(f"j{i}", receiver.url), 10)
        await store.request_cancel(f"j{i}")
    sender = WebhookSender(store, AddressGuard(["127.0.0.1"]), WebhookConfig(**FAST))
    try:
        assert await sender.deliver_due() == 3
        assert len(receiver.ok_hits()) == 3 and await sender.deliver_due() == 0
    finally:
        await sender.stop()


async def test_gives_up_when_attempts_run_out(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    receiver.default = "500"
    await store.create(hook_job("j1", receiver.url, secret="s"), 10)
    await store.request_cancel("j1")
    sender = await start_sender(senders, store, max_attempts=3)
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "failed" and d["attempts"] == 3 and d["secret"] is None
    rows = await attempts(store, "j1")
    assert [r["outcome"] for r in rows] == ["retry", "retry", "gave_up"]
    assert "gave up after 3 attempt(s)" in rows[-1]["error"]
    assert len(receiver.hits) == 3 and sender.failed == 1
    # Backoff: each retry was scheduled later than the attempt that failed.
    assert all(b["at"] > a["at"] for a, b in itertools.pairwise(rows))


async def test_gives_up_when_too_old(store: JobStore, receiver: Receiver, senders: Senders) -> None:
    receiver.default = "500"
    await store.create(hook_job("j1", receiver.url), 10)
    await store.request_cancel("j1")
    await start_sender(
        senders, store, max_age=0.3, retry_base=0.05, retry_max=0.05, max_attempts=1000
    )
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "failed"
    last = (await attempts(store, "j1"))[-1]
    assert last["outcome"] == "gave_up" and "older than 0.3s" in last["error"]


async def test_410_gone_stops_at_once(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    receiver.default = "410"
    await store.create(hook_job("j1", receiver.url), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store)
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "failed" and d["attempts"] == 1 and d["last_status"] == 410


async def test_per_request_timeout_is_used(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    receiver.plan.append("hang")
    await store.create(hook_job("j1", receiver.url, timeout=0.2), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store, timeout=60)
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "delivered"
    assert (await attempts(store, "j1"))[0]["error"] == "timed out after 0.2s"


async def test_a_hanging_receiver_delays_no_other_receiver(
    store: JobStore, senders: Senders
) -> None:
    slow, fast = await Receiver("hang").start(), await Receiver("ok").start()
    try:
        for i in range(8):  # a path per job: the host cap, not the endpoint cap, must hold them
            await store.create(hook_job(f"slow{i}", f"{slow.url}/{i}?job=slow{i}"), 100)
            await store.request_cancel(f"slow{i}")
        for i in range(6):
            await store.create(hook_job(f"fast{i}", fast.url), 100)
            await store.request_cancel(f"fast{i}")
        await start_sender(senders, store, timeout=60, concurrency=4, per_host=2)
        await slow.wait_hits(2)
        await fast.wait_hits(6)
        await wait_until(lambda: _all_delivered(store, [f"fast{i}" for i in range(6)]))
        # Every fast delivery got through while the slow receiver still held its first posts, and
        # it never got more than per_host of them: a hanging host cannot take all the slots.
        assert slow.hanging == 2 and len(slow.hits) == 2
    finally:
        await senders.pop().stop(grace=0)  # interrupts the hanging posts; they stay due
        await slow.stop()
        await fast.stop()
    rows = [d for d in await deliveries(store) if d["job_id"].startswith("slow")]
    assert {d["state"] for d in rows} == {"pending"}
    interrupted = [a for i in range(8) for a in await attempts(store, f"slow{i}")]
    assert len(interrupted) == 2 and all("interrupted" in a["error"] for a in interrupted)


async def test_a_hanging_endpoint_delays_no_other_endpoint_of_its_host(
    store: JobStore, senders: Senders
) -> None:
    recv = await Receiver("ok").start()
    recv.by_path["stuck"] = "hang"
    try:
        for i in range(6):
            await store.create(hook_job(f"stuck{i}", f"{recv.url}/stuck?job={i}"), 100)
            await store.request_cancel(f"stuck{i}")
        for i in range(4):
            await store.create(hook_job(f"fine{i}", f"{recv.url}/fine?job={i}"), 100)
            await store.request_cancel(f"fine{i}")
        await start_sender(senders, store, timeout=60, concurrency=16, per_host=6, per_endpoint=2)
        await wait_until(lambda: _all_delivered(store, [f"fine{i}" for i in range(4)]))
        assert recv.hanging == 2  # the stuck endpoint holds only its own two slots
    finally:
        await senders.pop().stop(grace=0)
        await recv.stop()


async def _all_delivered(store: JobStore, ids: list[str]) -> bool:
    for job_id in ids:
        d = await delivery_ended(store, job_id)
        if d is None or d["state"] != "delivered":
            return False
    return True


async def test_webhook_urls_pass_the_address_guard(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    await store.create(hook_job("j1", receiver.url), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store, guard=AddressGuard())  # loopback not allowlisted
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "failed" and d["attempts"] == 1 and receiver.hits == []
    assert "address guard" in d["last_error"] and "loopback" in d["last_error"]


async def test_base64_outputs_inline_with_a_cap(
    store: JobStore, receiver: Receiver, senders: Senders, tmp_path: Path
) -> None:
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(b"abc" * 10)
    big.write_bytes(b"x" * 5000)
    await store.create(hook_job("j1", receiver.url, base64=True), 10)
    await complete(store, "j1", [("small.png", small), ("big.png", big)])
    await start_sender(senders, store, base64_max_bytes=1000)
    [hit] = await receiver.wait_hits(1)
    out = {o["filename"]: o for o in json.loads(hit.body)["output"]}
    assert base64.b64decode(out["small.png"]["data"]) == b"abc" * 10
    assert "data" not in out["big.png"] and "over the 1000-byte limit" in out["big.png"]["error"]
    assert all("local_path" not in o for o in out.values())
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "delivered"  # an oversized output is that output's error, nothing more


async def test_a_job_retried_before_delivery_supersedes_it(
    store: JobStore, receiver: Receiver, senders: Senders
) -> None:
    await store.create(hook_job("j1", receiver.url), 10)
    await store.request_cancel("j1")
    await store.retry_job("j1")  # back to pending before the sender ran
    await start_sender(senders, store)
    d = await wait_until(lambda: delivery_ended(store, "j1"))
    assert d["state"] == "failed" and "retried" in d["last_error"] and receiver.hits == []
    await store.request_cancel("j1")  # it ends again: a new delivery, sent
    await receiver.wait_hits(1)
    rows = await deliveries(store, "j1")
    assert len(rows) == 2 and rows[1]["id"] != rows[0]["id"]
    assert (await wait_until(lambda: delivery_ended(store, "j1")))["state"] == "delivered"


async def test_history_and_cli_show_every_attempt(
    store: JobStore, receiver: Receiver, senders: Senders, tmp_path: Path
) -> None:
    receiver.plan.extend(["500", "ok"])
    await store.create(hook_job("j1", receiver.url + "?token=SECRET-TOKEN", secret="shh"), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store)
    await wait_until(lambda: delivery_ended(store, "j1"))
    [h] = await history(store, "j1")
    assert h["state"] == "delivered" and "SECRET-TOKEN" not in h["url"] and "secret" not in h
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in h["attempt_log"]] == [
        (1, 500, "retry"),
        (2, 204, "delivered"),
    ]

    env = {
        "COMFYQ_DATABASE": store.describe(),
        "COMFYQ_CONFIG": str(tmp_path / "absent.toml"),
        "PATH": "/usr/bin:/bin",
    }
    show = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "comfyq", "jobs", "show", "j1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert show.returncode == 0, show.stderr
    out = show.stdout
    assert "webhook deliveries" in out and "delivered" in out and "webhook attempts" in out
    assert "HTTP 500" in out and "204" in out
    assert "shh" not in out and "SECRET-TOKEN" not in out


async def test_secrets_and_url_tokens_never_reach_the_log(
    store: JobStore, receiver: Receiver, senders: Senders, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.plan.extend(["drop", "500", "ok"])
    await store.create(hook_job("j1", receiver.url + "?token=TOKEN-123", secret="SEKRIT-1"), 10)
    await store.request_cancel("j1")
    await start_sender(senders, store, default_secret="SEKRIT-2")
    await wait_until(lambda: delivery_ended(store, "j1"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "webhook" in text  # attempts are logged...
    for needle in ("SEKRIT-1", "SEKRIT-2", "TOKEN-123"):  # ...without secrets or the URL's token
        assert needle not in text
    for a in await attempts(store, "j1"):
        assert "TOKEN-123" not in (a["error"] or "")
