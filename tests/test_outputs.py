"""Outputs end to end: a real comfyq (simulator as ComfyUI) uploading to a real S3-protocol server
and posting to a real webhook receiver; upload failures, the fail-or-warn setting, and secrets that
never show up anywhere once the job is done."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.s3 import FaultyProxy, make_bucket
from support.servers import MakeServer, Server, wait_healthy
from support.webhooks import Receiver, deliveries, delivery_ended, wait_until
from support.workflows import workflow

from comfyq.errors import OutputError
from comfyq.outputs.local import hashes_and_type, job_dir, safe_name
from comfyq.outputs.s3 import S3Uploader
from comfyq.stages.postprocess import Postprocess
from comfyq.store.model import Stage
from comfyq.store.sqlite.writer import connect
from comfyq.webhooks import WebhookSender

_colors = itertools.count(5000)
KEYS = {"access_key_id": "REQ-AKID-123", "secret_access_key": "REQ-SECRET-456"}
HOOK_SECRET = "HOOK-SECRET-789"


def wire(srv: Server) -> WebhookSender:
    """Plug the S3 uploader into the server unless services do; quick retries for webhooks."""
    svc = srv.services
    st = svc.pipeline.stages[Stage.POSTPROCESS]
    if getattr(st.handler, "uploader", None) is None:
        st.handler = Postprocess(
            svc.pool,
            svc.output_dir,
            uploader=S3Uploader.from_settings(svc.settings, svc.guard),
            fail_on_upload_error=svc.settings.s3_fail_job_on_upload_error,
        )
    sender: WebhookSender = svc.webhooks
    sender.cfg = dataclasses.replace(sender.cfg, retry_base=0.02, retry_max=0.1, poll_interval=0.2)
    return sender


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def proxy(moto_url: str) -> AsyncIterator[FaultyProxy]:
    p = await FaultyProxy(moto_url).start()
    yield p
    await p.stop()


async def started(make_server: MakeServer, **settings: Any) -> tuple[Server, WebhookSender]:
    srv = await make_server(url_allowlist=["127.0.0.1"], **settings)
    sender = wire(srv)
    if not sender.running:
        await sender.start()
    await wait_healthy(srv)
    return srv, sender


async def stop(sender: WebhookSender) -> None:
    await sender.stop(grace=0)


async def generate(srv: Server, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"input": {"workflow_json": workflow(next(_colors)), **extra}}
    async with srv.session.post(srv.u("/generate/sync"), json=body) as r:
        return r.status, await r.json()


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read()


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filename=st.text(), subfolder=st.text())
@example("../../etc/passwd", "../../sub")
@example("/etc/cron.d/x", "../../sub")
@example("..\\..\\boot.ini", "../../sub")
@example("a/../../b.png", "../../sub")
@example(".hidden", "../../sub")
def test_file_names_cannot_escape_the_job_folder(
    tmp_path: Path, filename: str, subfolder: str
) -> None:
    try:
        name = safe_name(filename, subfolder)
    except OutputError:
        return  # nothing usable left of it: refused, never guessed
    assert name and len(name) <= 200 and not name.startswith(".")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert (job_dir(tmp_path, "job1") / name).resolve().parent == (tmp_path / "job1").resolve()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=st.text())
@example("..")
@example("../x")
@example("/abs")
@example("a/b")
@example("")
def test_a_job_id_names_one_folder_below_the_root_or_none(tmp_path: Path, job_id: str) -> None:
    try:
        folder = job_dir(tmp_path, job_id)
    except OutputError as exc:
        assert "job id" in exc.message
        return
    assert folder.parent == tmp_path and folder.name == job_id


async def test_request_s3_and_webhook_end_to_end_without_leaking_secrets(
    make_server: MakeServer,
    proxy: FaultyProxy,
    moto_url: str,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    make_bucket(moto_url, "client-bucket")
    srv, sender = await started(make_server, s3_prefix="cq")
    try:
        status, res = await generate(
            srv,
            request_id="e2e-1",
            s3={"bucket_name": "client-bucket", "endpoint_url": proxy.url, **KEYS},
            webhook={"url": receiver.url, "secret": HOOK_SECRET, "extra_params": {"order": 42}},
        )
        assert status == 200 and res["status"] == "completed", res
        [out] = res["output"]
        assert out.get("upload_error") is None
        assert out["url"].startswith(f"{proxy.url}/client-bucket/cq/e2e-1/{out['filename']}?")
        local = Path(out["local_path"])
        assert local.parent == job_dir(Path(srv.services.settings.output_dir), "e2e-1")
        code, data = await get(out["url"])
        assert code == 200 and data == local.read_bytes()
        assert hashlib.sha256(data).hexdigest() == out["sha256"]
        assert proxy.keys_used() == {"REQ-AKID-123"}  # the request's keys, never the operator's
        # The file is also served by comfyq itself.
        async with srv.session.get(srv.u(f"/outputs/e2e-1/{out['filename']}")) as r:
            assert r.status == 200 and await r.read() == data

        d = await wait_until(lambda: delivery_ended(srv.services.store, "e2e-1"))
        assert d["state"] == "delivered"
        [hit] = receiver.hits
        hook = json.loads(hit.body)
        assert (
            hook["id"] == "e2e-1"
            and hook["status"] == "completed"
            and hook["extra"] == {"order": 42}
        )
        assert hook["output"][0]["url"] == out["url"] and "local_path" not in hook["output"][0]

        async with srv.session.get(srv.u("/jobs")) as r:
            listing = await r.text()
        async with srv.session.get(srv.u("/result/e2e-1")) as r:
            result = await r.text()
        conn = connect(srv.services.db_path, readonly=True)
        try:
            dump = "\n".join(conn.iterdump())
        finally:
            conn.close()
        logs = "\n".join(rec.getMessage() for rec in caplog.records)
        for secret in (KEYS["secret_access_key"], HOOK_SECRET):
            for where, text in (
                ("Result", result),
                ("/jobs", listing),
                ("webhook", hit.body.decode()),
                ("log", logs),
                ("database", dump),
            ):
                assert secret not in text, f"{secret} found in {where}"
    finally:
        await stop(sender)


async def test_operator_s3_with_prefix_and_no_request_block(
    make_server: MakeServer,
    proxy: FaultyProxy,
    moto_url: str,
) -> None:
    make_bucket(moto_url, "operator-bucket")
    srv, sender = await started(
        make_server,
        s3_access_key_id="OP-AKID",
        s3_secret_access_key="op-secret",
        s3_bucket_name="operator-bucket",
        s3_endpoint_url=proxy.url,
        s3_prefix="renders/",
        s3_presign_expiry=120,
    )
    try:
        status, res = await generate(srv, request_id="op-1")
        assert status == 200 and res["status"] == "completed"
        [out] = res["output"]
        assert (
            out["url"].startswith(f"{proxy.url}/operator-bucket/renders/op-1/")
            and "X-Amz-Expires=120" in out["url"]
        )
        assert (await get(out["url"]))[0] == 200
        assert proxy.keys_used() == {"OP-AKID"}
        # A request that names another bucket without keys: the operator's keys are not lent to
        # it, and since the upload could only fail, admission refuses it (400 naming s3) before
        # any job exists.
        status, res = await generate(srv, request_id="op-2", s3={"bucket_name": "someone-elses"})
        assert status == 400, res
        text = str(res)
        assert "s3" in text and "must bring its own access_key_id" in text
        assert not [s for s in proxy.seen if "someone-elses" in s.path]
    finally:
        await stop(sender)


@pytest.mark.parametrize("fail_job", [False, True])
async def test_upload_failure_warns_or_fails_as_configured(
    make_server: MakeServer, proxy: FaultyProxy, fail_job: bool
) -> None:
    srv, sender = await started(make_server, s3_fail_job_on_upload_error=fail_job)
    try:
        status, res = await generate(
            srv, s3={"bucket_name": "does-not-exist", "endpoint_url": proxy.url, **KEYS}
        )
        [out] = res["output"]
        assert "NoSuchBucket" in out["upload_error"] and out["url"].startswith("/outputs/")
        if fail_job:
            assert status == 500 and res["status"] == "failed"
            assert (
                res["error"]["type"] == "output_error"
                and "upload of 1 of 1 output(s) failed" in res["error"]["message"]
            )
        else:
            assert (
                status == 200
                and res["status"] == "completed"
                and res["warnings"][0]["filename"] == out["filename"]
            )
        # Either way the file itself is kept and served.
        async with srv.session.get(srv.u(out["url"])) as r:
            assert r.status == 200
    finally:
        await stop(sender)


async def test_a_dead_webhook_receiver_holds_up_no_job(make_server: MakeServer) -> None:
    dead = await Receiver("hang").start()
    srv, sender = await started(make_server)
    try:
        first = [await generate(srv, webhook={"url": dead.url, "timeout": 30}) for _ in range(3)]
        await dead.wait_hits(1)
        # With posts hanging, later jobs still complete, and each has its delivery queued.
        later = [await generate(srv, webhook={"url": dead.url}) for _ in range(3)]
        assert all(s == 200 and r["status"] == "completed" for s, r in first + later)
        assert dead.hanging >= 1  # ...while posts to the dead receiver were still hanging
        for _, res in first + later:
            [d] = await deliveries(srv.services.store, res["id"])
            assert d["state"] in ("pending", "sending")
    finally:
        await stop(sender)
        await dead.stop()


async def test_default_webhook_url_applies_to_jobs_that_name_none(
    make_server: MakeServer, receiver: Receiver
) -> None:
    srv, sender = await started(
        make_server, webhook_url=receiver.url, webhook_secret="whsec_" + "QUJD" * 8
    )
    try:
        status, res = await generate(srv, request_id="default-hook")
        assert status == 200 and res["status"] == "completed"
        job = await srv.services.store.get("default-hook")
        assert job is not None and job.payload["input"]["webhook"]["url"] == receiver.url
        (hit,) = await receiver.wait_hits(1)
        assert json.loads(hit.body)["id"] == "default-hook"
        assert {k.lower() for k in hit.headers} >= {
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
        }
    finally:
        await stop(sender)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("a.png", bytes.fromhex("89504e470d0a1a0a0000000d49484452") + bytes(range(256)) * 50),
        ("b.txt", b"plain words\n" * 3),
        ("c.webm", b"\x1aE\xdf\xa3" + b"\x00" * 40),
        ("empty.bin", b""),
    ],
)
def test_an_output_in_hand_is_described_as_the_file_on_disk(
    tmp_path: Path, name: str, data: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    sha, b3, size, mime = hashes_and_type(path, data)
    assert (sha, b3, size, mime) == hashes_and_type(path)
    assert sha == hashlib.sha256(data).hexdigest() and size == len(data)


def _png(mode: str, *, frames: int = 1) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    images = [Image.new(mode, (8, 8), i * 40) for i in range(frames)]
    images[0].save(out, "PNG", save_all=frames > 1, append_images=images[1:])
    return out.getvalue()


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(max_size=9000))
@example(tail=b"")
@example(tail=b"\x00" * 249 + b"ustar\x00")
def test_the_png_shortcut_answers_as_libmagic_does(tail: bytes) -> None:
    from comfyq.inputs.filetypes import magic_type
    from comfyq.outputs.local import _PNG, _content_type

    for data in [_PNG + tail, *(_png(m) for m in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"))]:
        head = data[:8192]
        assert _content_type(head) == magic_type(head) == "image/png"
    animated = _png("RGB", frames=2)[:8192]  # APNG: libmagic names it image/png as well
    assert _content_type(animated) == magic_type(animated) == "image/png"
