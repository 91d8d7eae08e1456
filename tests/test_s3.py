"""S3 uploads against a real S3-protocol server (moto): which keys and bucket, content type,
deterministic keys, presigned URLs, multipart, idempotent re-runs, transient errors and failures."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.s3 import FaultyProxy, make_bucket, open_multipart_uploads

from comfyq.netguard import AddressGuard
from comfyq.outputs.s3 import LocalFile, S3ConfigError, S3Settings, S3Uploader, resolve

MiB = 1024 * 1024
OP = S3Settings(
    access_key_id="OPKEY",
    secret_access_key="opsecret",
    bucket="op-bucket",
    endpoint_url="http://minio.internal:9000",
    region="eu-west-1",
)


# --- which bucket, endpoint and keys ---------------------------------------------------------


def test_no_block_uses_the_operator_settings_when_complete() -> None:
    t = resolve(None, None, OP)
    assert t is not None and (t.bucket, t.endpoint_url, t.access_key_id) == (
        "op-bucket",
        "http://minio.internal:9000",
        "OPKEY",
    )
    assert t.operator_endpoint and t.region == "eu-west-1"
    assert resolve(None, None, S3Settings(bucket="b")) is None  # operator S3 incomplete: no upload
    assert resolve({}, None, S3Settings()) is None  # an empty block names nowhere


def test_fields_fall_back_one_by_one() -> None:
    t = resolve({"region": "us-east-2", "connect_timeout": 5, "connect_attempts": 7}, None, OP)
    assert (
        t is not None
        and t.region == "us-east-2"
        and t.bucket == "op-bucket"
        and t.access_key_id == "OPKEY"
    )
    assert (t.connect_timeout, t.attempts) == (5.0, 7)
    # Naming the operator's own bucket or endpoint (trailing slash aside) is still the operator's.
    same = resolve(
        {"bucket_name": "op-bucket", "endpoint_url": "http://minio.internal:9000/"}, None, OP
    )
    assert same is not None and same.access_key_id == "OPKEY"
    # Own keys with the operator's bucket and endpoint: the request's keys are used.
    own = resolve({}, {"access_key_id": "AK", "secret_access_key": "SK"}, OP)
    assert own is not None and (own.access_key_id, own.bucket, own.endpoint_url) == (
        "AK",
        "op-bucket",
        "http://minio.internal:9000",
    )


@pytest.mark.parametrize(
    "block",
    [
        {"bucket_name": "someone-elses"},
        {"endpoint_url": "https://evil.example"},
        {"bucket_name": "op-bucket", "endpoint_url": "https://evil.example"},
    ],
)
def test_operator_keys_never_go_to_another_bucket_or_endpoint(block: dict[str, Any]) -> None:
    with pytest.raises(S3ConfigError, match="must bring its own access_key_id"):
        resolve(block, None, OP)
    t = resolve(block, {"access_key_id": "AK", "secret_access_key": "SK"}, OP)
    assert t is not None and t.access_key_id == "AK" and t.secret_access_key == "SK"
    assert not t.operator_endpoint or "endpoint_url" not in block


def test_half_a_key_pair_or_nothing_to_use_is_an_error() -> None:
    with pytest.raises(S3ConfigError, match="go together"):
        resolve({"bucket_name": "b"}, {"access_key_id": "AK"}, OP)
    with pytest.raises(S3ConfigError, match="no bucket_name"):
        resolve({}, {"access_key_id": "AK", "secret_access_key": "SK"}, S3Settings())


def test_keys_stay_out_of_repr() -> None:
    t = resolve(
        {"bucket_name": "b"}, {"access_key_id": "AKIAXX", "secret_access_key": "SUPERSECRET"}, OP
    )
    assert "SUPERSECRET" not in repr(t) and "AKIAXX" not in repr(t)
    assert "opsecret" not in repr(OP)


# --- uploads against moto --------------------------------------------------------------------


@pytest.fixture
async def proxy(moto_url: str) -> AsyncIterator[FaultyProxy]:
    p = await FaultyProxy(moto_url).start()
    yield p
    await p.stop()


def file_of(tmp_path: Path, name: str, data: bytes, mime: str = "image/png") -> LocalFile:
    path = tmp_path / name
    path.write_bytes(data)
    return LocalFile(name, path, mime, len(data), hashlib.sha256(data).hexdigest())


async def fetch(url: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read(), r.headers.get("Content-Type", "")


def uploader(endpoint: str, bucket: str, **kw: Any) -> S3Uploader:
    return S3Uploader(
        S3Settings(
            access_key_id="OPKEY",
            secret_access_key="opsecret",
            bucket=bucket,
            endpoint_url=endpoint,
            region="us-east-1",
            **kw,
        )
    )


async def test_upload_sets_type_key_and_a_working_presigned_url(
    proxy: FaultyProxy,
    moto_url: str,
    tmp_path: Path,
) -> None:
    make_bucket(moto_url, "outs-a")
    up = uploader(proxy.url, "outs-a", prefix="/renders/", presign_expiry=600)
    target = up.target(None, None)
    assert target is not None
    f = file_of(tmp_path, "cat_00001_.png", b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    [res] = await up.upload_all(target, "job-1", [f])
    assert res.error is None and res.key == "renders/job-1/cat_00001_.png" and not res.skipped
    assert (
        res.url is not None
        and "X-Amz-Expires=600" in res.url
        and "/outs-a/renders/job-1/" in res.url
    )
    status, body, ctype = await fetch(res.url)
    assert status == 200 and body == f.path.read_bytes() and ctype == "image/png"
    assert proxy.keys_used() == {"OPKEY"}


async def test_large_files_go_up_in_parts_and_reruns_are_skipped(
    proxy: FaultyProxy,
    moto_url: str,
    tmp_path: Path,
) -> None:
    make_bucket(moto_url, "outs-b")
    up = uploader(
        proxy.url, "outs-b", multipart_threshold=5 * MiB, part_size=5 * MiB, part_concurrency=2
    )
    target = up.target(None, None)
    assert target is not None
    data = os.urandom(12 * MiB + 123)
    f = file_of(tmp_path, "clip.mp4", data, "video/mp4")
    [res] = await up.upload_all(target, "job-2", [f])
    assert res.error is None and res.url is not None
    parts = [s for s in proxy.writes() if "partNumber=" in s.query]
    assert len(parts) == 3 and any("uploads" in s.query for s in proxy.writes())
    status, body, ctype = await fetch(res.url)
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    assert ctype == "video/mp4"
    # The same job's postprocess again (after a crash): same key, same content, nothing sent.
    before = len(proxy.writes())
    [again] = await up.upload_all(target, "job-2", [f])
    assert again.skipped and again.url is not None and len(proxy.writes()) == before


async def test_a_cancelled_multipart_upload_is_aborted(
    proxy: FaultyProxy, moto_url: str, tmp_path: Path
) -> None:
    make_bucket(moto_url, "outs-e")
    up = uploader(
        proxy.url, "outs-e", multipart_threshold=5 * MiB, part_size=5 * MiB, part_concurrency=1
    )
    target = up.target(None, None)
    assert target is not None
    f = file_of(tmp_path, "big.bin", os.urandom(11 * MiB), "application/octet-stream")
    proxy.fault_methods = {"PUT"}  # the upload is created (POST ?uploads); its first part hangs
    proxy.faults.append("hang")
    task = asyncio.create_task(up.upload_all(target, "job-5", [f]))
    await asyncio.wait_for(proxy.hung.wait(), 30)
    assert await asyncio.to_thread(open_multipart_uploads, moto_url, "outs-e")  # begun
    task.cancel()  # e.g. the job's deadline, or a shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [s.method for s in proxy.seen if "uploadId=" in s.query][-1] == "DELETE"
    assert await asyncio.to_thread(open_multipart_uploads, moto_url, "outs-e") == []


async def test_transient_errors_are_retried(
    proxy: FaultyProxy, moto_url: str, tmp_path: Path
) -> None:
    make_bucket(moto_url, "outs-c")
    up = uploader(proxy.url, "outs-c", multipart_threshold=5 * MiB, part_size=5 * MiB)
    target = up.target(None, None)
    assert target is not None
    proxy.faults.extend(["503", "drop", "503"])
    small = file_of(tmp_path, "a.png", b"a" * 100)
    big = file_of(tmp_path, "b.bin", os.urandom(6 * MiB), "application/octet-stream")
    res = await up.upload_all(target, "job-3", [small, big])
    assert [r.error for r in res] == [None, None]
    assert [s.answered for s in proxy.seen if s.answered != "forwarded"] == ["503", "drop", "503"]
    for r, f in zip(res, (small, big), strict=True):
        assert r.url is not None
        status, body, _ = await fetch(r.url)
        assert status == 200 and body == f.path.read_bytes()


async def test_failures_become_upload_errors(
    proxy: FaultyProxy, moto_url: str, tmp_path: Path
) -> None:
    f = file_of(tmp_path, "a.png", b"abc")
    missing = uploader(proxy.url, "no-such-bucket")
    [res] = await missing.upload_all(missing.target(None, None), "j", [f])  # type: ignore[arg-type]
    assert res.url is None and res.error is not None and "NoSuchBucket" in res.error

    make_bucket(moto_url, "outs-d")
    flaky = uploader(proxy.url, "outs-d")
    target = flaky.target({"connect_attempts": 2}, None)
    assert target is not None
    proxy.faults.extend(["503"] * 5)
    [res] = await flaky.upload_all(target, "j", [f])
    assert res.url is None and res.error is not None and "SlowDown" in res.error

    closed = uploader("http://127.0.0.1:9", "outs-d", connect_timeout=2)  # nothing listens there
    [res] = await closed.upload_all(closed.target({"connect_attempts": 1}, None), "j", [f])  # type: ignore[arg-type]
    assert res.url is None and res.error is not None and "EndpointConnectionError" in res.error


async def test_request_endpoints_pass_the_address_guard(
    proxy: FaultyProxy,
    moto_url: str,
    tmp_path: Path,
) -> None:
    make_bucket(moto_url, "theirs")
    keys = {"access_key_id": "THEIRKEY", "secret_access_key": "theirsecret"}
    blocked = S3Uploader(S3Settings(), AddressGuard())
    target = blocked.target({"bucket_name": "theirs", "endpoint_url": proxy.url}, keys)
    assert target is not None and not target.operator_endpoint
    with pytest.raises(S3ConfigError, match="endpoint_url refused.*loopback"):
        await blocked.check_endpoint(target)
    # The operator's own endpoint is trusted, even on loopback.
    op = S3Uploader(
        S3Settings(
            access_key_id="OPKEY", secret_access_key="x", bucket="b", endpoint_url=proxy.url
        ),
        AddressGuard(),
    )
    op_target = op.target(None, None)
    assert op_target is not None
    await op.check_endpoint(op_target)
    # Allowlisted: the request's own keys sign every request (never the operator's).
    allowed = S3Uploader(op.settings, AddressGuard(["127.0.0.1"]))
    target = allowed.target({"bucket_name": "theirs", "endpoint_url": proxy.url + "/"}, keys)
    assert target is not None
    await allowed.check_endpoint(target)
    [res] = await allowed.upload_all(target, "j9", [file_of(tmp_path, "x.png", b"x")])
    assert res.error is None and res.url is not None and "theirs/j9/x.png" in res.url
    assert proxy.keys_used() == {"THEIRKEY"}
