"""Comfy API v2 assets over HTTP: streamed multipart uploads hashed with blake3, dedup, the size
cap, hash mismatches, from-hash and by-hash, Range downloads, deletes and what holds them, and a
core/ASSET reference placed on the backend that runs the job."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
from blake3 import blake3
from PIL import Image
from support.s3 import make_bucket
from support.servers import MakeServer, Server, pause, resume, wait_healthy
from support.v2 import check, check_error, parse_sse

from comfyq.store.model import Stage


def png(color: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def b3(data: bytes) -> str:
    return "blake3:" + blake3(data).hexdigest()


def form(data: bytes, **fields: str | list[str]) -> aiohttp.FormData:
    f = aiohttp.FormData()
    base: dict[str, Any] = {"content_type": "image/png", "file_path": "photo.png", **fields}
    for name, value in base.items():
        for v in value if isinstance(value, list) else [value]:
            f.add_field(name, v)
    f.add_field("file", data, filename="photo.png", content_type="image/png")
    return f


async def upload(srv: Server, data: bytes, headers: Any = None, **fields: Any) -> tuple[int, Any]:
    async with srv.session.post(
        srv.u("/api/v2/assets"), data=form(data, **fields), headers=headers
    ) as r:
        return r.status, await r.json()


def blob_files(srv: Server) -> list[str]:
    root = srv.services.settings.assets_dir
    from pathlib import Path

    return sorted(p.name for p in Path(root).rglob("*") if p.is_file() and p.parent.name != "tmp")


async def test_upload_dedup_and_mismatch(server: Server) -> None:
    data = png((10, 20, 30))
    status, asset = await upload(server, data, tags=["input", "x"], expires_in="3600")
    assert status == 201, asset
    check("Asset", asset)
    assert asset["hash"] == b3(data) and asset["size_bytes"] == len(data) and asset["created_new"]
    assert asset["file_path"] == "photo.png" and asset["job_id"] is None
    status, again = await upload(server, data, expected_hash=b3(data))
    assert status == 200 and check("Asset", again)["created_new"] is False
    assert again["id"] != asset["id"] and again["hash"] == asset["hash"]
    assert len(blob_files(server)) == 1  # the bytes are kept once
    other = png((1, 1, 1))
    status, err = await upload(server, other, expected_hash=b3(data))
    assert status == 409 and check_error(err, "hash_mismatch")
    assert len(blob_files(server)) == 1  # nothing of it kept
    status, err = await upload(server, other, expected_hash="sha256:abc")
    assert status == 422 and check_error(err, "invalid_request")
    status, err = await upload(server, other, expires_in="5")
    assert status == 422 and check_error(err, "invalid_request")
    async with server.session.post(
        server.u("/api/v2/assets"),
        data=aiohttp.FormData({"file_path": "a"}, default_to_multipart=True),
    ) as r:
        assert r.status == 422 and check_error(await r.json(), "invalid_request")
    async with server.session.post(server.u("/api/v2/assets"), json={"file": "x"}) as r:
        assert r.status == 415 and check_error(await r.json(), "unsupported_media_type")
    # File names are never paths: a hostile name is only shown back.
    status, odd = await upload(server, png((9, 9, 9)), file_path="../../etc/passwd")
    assert status == 201 and odd["file_path"] == "../../etc/passwd"
    assert all(len(n) == 64 for n in blob_files(server))
    # Idempotency-Key on uploads is single-use too.
    status, _ = await upload(server, png((3, 3, 3)), headers={"Idempotency-Key": "up-1"})
    assert status == 201
    status, err = await upload(server, png((4, 4, 4)), headers={"Idempotency-Key": "up-1"})
    assert status == 422 and check_error(err, "idempotency_key_reuse")


async def test_size_cap_is_413_and_keeps_nothing(make_server: MakeServer) -> None:
    srv = await make_server(asset_max_bytes=2048)
    status, err = await upload(srv, b"\0" * 4096)
    assert status == 413 and check_error(err, "payload_too_large")

    async def chunks() -> Any:  # no Content-Length: the cap is enforced while streaming
        for _ in range(8):
            yield b"\1" * 1024

    f = aiohttp.FormData()
    f.add_field("content_type", "application/octet-stream")
    f.add_field("file_path", "big.bin")
    f.add_field("file", chunks(), filename="big.bin")
    async with srv.session.post(srv.u("/api/v2/assets"), data=f) as r:
        assert r.status == 413 and check_error(await r.json(), "payload_too_large")
    assert blob_files(srv) == []


async def test_from_hash_by_hash_content_and_delete(server: Server) -> None:
    data = png((200, 100, 50), size=64)
    status, asset = await upload(server, data)
    assert status == 201
    h = asset["hash"]
    async with server.session.head(server.u(f"/api/v2/assets/by-hash/{h}")) as r:
        assert r.status == 200
    async with server.session.head(server.u(f"/api/v2/assets/by-hash/blake3:{'0' * 64}")) as r:
        assert r.status == 404
    async with server.session.head(server.u("/api/v2/assets/by-hash/junk")) as r:
        assert r.status == 404
    async with server.session.post(
        server.u("/api/v2/assets/from-hash"), json={"hash": h, "file_path": "b.png"}
    ) as r:
        minted = await r.json()
        assert (
            r.status == 201
            and check("Asset", minted)["hash"] == h
            and minted["file_path"] == "b.png"
        )
    async with server.session.post(
        server.u("/api/v2/assets/from-hash"), json={"hash": f"blake3:{'1' * 64}"}
    ) as r:
        assert r.status == 404 and check_error(await r.json(), "blob_not_found")
    async with server.session.post(server.u("/api/v2/assets/from-hash"), json={"hash": 5}) as r:
        assert r.status == 422 and check_error(await r.json(), "invalid_request")
    async with server.session.get(server.u(f"/api/v2/assets/{asset['id']}")) as r:
        assert r.status == 200 and check("Asset", await r.json())["id"] == asset["id"]
    url = asset["url"]
    async with server.session.get(url) as r:
        assert r.status == 200 and await r.read() == data
    async with server.session.get(url, headers={"Range": "bytes=0-9"}) as r:
        assert r.status == 206 and await r.read() == data[:10]
        assert r.headers["Content-Range"] == f"bytes 0-9/{len(data)}"
    async with server.session.get(url, headers={"Range": "bytes=10-"}) as r:
        assert r.status == 206 and await r.read() == data[10:]
    async with server.session.get(url, headers={"Range": f"bytes={len(data) + 5}-"}) as r:
        assert r.status == 416
    async with server.session.head(url) as r:  # HEAD: the GET's headers, no body
        assert r.status == 200 and r.headers["Content-Length"] == str(len(data))
        assert await r.read() == b""
    # Delete: the minted asset first; the bytes stay for the other one.
    async with server.session.delete(server.u(f"/api/v2/assets/{minted['id']}")) as r:
        assert r.status == 204
    async with server.session.delete(server.u(f"/api/v2/assets/{minted['id']}")) as r:
        assert r.status == 404 and check_error(await r.json(), "not_found")
    async with server.session.get(url) as r:
        assert r.status == 200 and await r.read() == data
    async with server.session.delete(server.u(f"/api/v2/assets/{asset['id']}")) as r:
        assert r.status == 204
    assert blob_files(server) == []  # the last reference gone: the bytes too
    async with server.session.get(url) as r:
        assert r.status == 404


async def test_asset_job_placement_and_holds(server: Server) -> None:
    await wait_healthy(server)
    data = png((0, 128, 255), size=32)
    _, asset = await upload(server, data)
    ref = {"__type": "core/ASSET", "info": {"id": asset["id"], "file_path": "photo.png"}}
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "asset_job"},
        },
    }
    pause(server, Stage.PREPROCESS)
    async with server.session.post(server.u("/api/v2/jobs"), json={"workflow": wf}) as r:
        job = await r.json()
        assert r.status == 201, job
    # A waiting job holds the asset it uses.
    async with server.session.delete(server.u(f"/api/v2/assets/{asset['id']}")) as r:
        assert r.status == 409 and check_error(await r.json(), "asset_in_use")
    resume(server, Stage.PREPROCESS)
    for _ in range(500):
        async with server.session.get(server.u(f"/api/v2/jobs/{job['id']}")) as r:
            body = await r.json()
        if body["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.02)
    assert body["status"] == "succeeded", body
    (out,) = body["outputs"]
    async with server.session.get(out["url"]) as r:
        result = await r.read()
    with Image.open(io.BytesIO(result)) as img:
        assert img.convert("RGB").getpixel((1, 1)) == (255, 127, 0)  # the uploaded image, inverted
    assert out["hash"] == b3(result) and out["size_bytes"] == len(result)
    # An output is held by its job; the finished job no longer holds the uploaded asset.
    async with server.session.delete(server.u(f"/api/v2/assets/{out['id']}")) as r:
        assert r.status == 409 and check_error(await r.json(), "asset_in_use")
    async with server.session.delete(server.u(f"/api/v2/assets/{asset['id']}")) as r:
        assert r.status == 204


async def test_an_output_kept_in_s3_redirects_to_its_presigned_url(
    make_server: MakeServer, moto_url: str
) -> None:
    make_bucket(moto_url, "v2-outs")
    srv = await make_server(
        s3_access_key_id="OPKEY",
        s3_secret_access_key="opsecret",
        s3_bucket_name="v2-outs",
        s3_endpoint_url=moto_url,
        s3_region="us-east-1",
    )
    await wait_healthy(srv)
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 4242},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "s3"}},
    }
    async with srv.session.post(srv.u("/api/v2/jobs"), json={"workflow": wf}) as r:
        job = await r.json()
    for _ in range(1000):
        async with srv.session.get(srv.u(job["urls"]["self"])) as r:
            body = await r.json()
        if body["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.02)
    assert body["status"] == "succeeded", body
    (out,) = check("Job", body)["outputs"]
    async with srv.session.get(out["url"], allow_redirects=False) as r:
        assert r.status == 302
        location = r.headers["Location"]
    assert "/v2-outs/" in location and "X-Amz-Signature=" in location
    async with aiohttp.ClientSession() as s, s.get(location) as r:
        data = await r.read()
    assert r.status == 200 and len(data) == out["size_bytes"] and b3(data) == out["hash"]


async def test_malformed_multipart_is_4xx(server: Server) -> None:
    cases: list[tuple[str, bytes]] = [
        ("multipart/form-data", b"--x\r\n"),
        ("multipart/form-data; boundary=xyz", b"garbage without any boundary"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data\r\n\r\n"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        ),
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nbroken header line\r\n\r\nv\r\n--xyz--\r\n",
        ),
        ("multipart/mixed; boundary=xyz", b"--xyz--\r\n"),
    ]
    for ctype, body in cases:
        async with server.session.post(
            server.u("/api/v2/assets"), data=body, headers={"Content-Type": ctype}
        ) as r:
            assert 400 <= r.status < 500, (ctype, body, r.status, await r.text())
            check("ErrorEnvelope", await r.json())
    assert blob_files(server) == []


async def test_odd_ranges_never_fail_the_server(server: Server) -> None:
    data = png((5, 6, 7))
    _, asset = await upload(server, data)
    for value in (
        "bytes=abc",
        "bytes=5-2",
        "items=0-1",
        "bytes=0-1,3-4",
        "bytes=-5",
        "bytes=",
        "x",
    ):
        async with server.session.get(asset["url"], headers={"Range": value}) as r:
            body = await r.read()
            assert r.status in (200, 206, 400, 416), (value, r.status)
            if r.status == 206:
                assert body and len(body) <= len(data)


async def test_the_v2_surface_on_postgres(make_server: MakeServer, pg_url: str) -> None:
    """The same routes over the PostgreSQL store: upload, a job using the asset, its output,
    concurrent duplicates of one Idempotency-Key, deletes and holds."""
    srv = await make_server(database=pg_url)
    await wait_healthy(srv)
    data = png((90, 80, 70), size=24)
    status, asset = await upload(srv, data)
    assert status == 201 and check("Asset", asset)["hash"] == b3(data)
    status, again = await upload(srv, data)
    assert status == 200 and again["created_new"] is False
    ref = {"__type": "core/ASSET", "info": {"id": asset["id"]}}
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pg"}},
    }

    async def post(key: str) -> tuple[int, Any]:
        async with srv.session.post(
            srv.u("/api/v2/jobs"), json={"workflow": wf}, headers={"Idempotency-Key": key}
        ) as r:
            return r.status, await r.json()

    results = await asyncio.gather(*(post("pg-dup") for _ in range(6)))
    assert sorted(s for s, _ in results) == [201] + [422] * 5
    job = next(b for s, b in results if s == 201)
    for _ in range(1000):
        async with srv.session.get(srv.u(job["urls"]["self"])) as r:
            body = await r.json()
        if body["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.02)
    assert check("Job", body)["status"] == "succeeded", body
    (out,) = body["outputs"]
    async with srv.session.get(out["url"], headers={"Range": "bytes=0-3"}) as r:
        assert r.status == 206 and await r.read() == b"\x89PNG"
    async with srv.session.delete(srv.u(f"/api/v2/assets/{out['id']}")) as r:
        assert r.status == 409
    async with srv.session.delete(srv.u(f"/api/v2/assets/{again['id']}")) as r:
        assert r.status == 204
    async with srv.session.get(srv.u("/api/v2/jobs?limit=5")) as r:
        assert [j["id"] for j in (await r.json())["jobs"]] == [job["id"]]
    # A live stream's end is built from the row the final state change committed (no read):
    # on PostgreSQL too it is the job a poll answers, metadata and node count included.
    pause(srv, Stage.GENERATE)
    body = {"workflow": wf, "metadata": {"store": "pg"}}
    async with srv.session.post(srv.u("/api/v2/jobs"), json=body) as r:
        assert r.status == 201
        live = await r.json()
    async with srv.session.get(srv.u(live["urls"]["events"])) as r:
        head = b""
        while not head.endswith(b"\n\n"):
            head += await r.content.readline()
        resume(srv, Stage.GENERATE)
        text = (head + await r.read()).decode()
    frames = parse_sse(text)
    end = frames[-1][1]
    assert end["status"] == "succeeded" and end["metadata"] == {"store": "pg"}
    assert end["progress"]["nodes_total"] == len(wf)
    async with srv.session.get(srv.u(live["urls"]["self"])) as r:
        assert check("Job", await r.json()) == end
