"""Downloader against a real loopback HTTP server: caching, coalescing, limits, types, inline."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import struct
import sys
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from support import serve

from comfyq.errors import InputError
from comfyq.inputs import Downloader, sniff_type
from comfyq.netguard import AddressGuard

KiB = 1024
MiB = 1024 * KiB


def make_png(seed: int = 0, w: int = 4, h: int = 4) -> bytes:
    """A small valid PNG whose pixels depend on ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(
        b"\x00" + bytes((seed * 7 + x + y * 3) % 256 for x in range(w * 3)) for y in range(h)
    )
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


JPEG = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    + bytes(range(256)) * 4
    + b"\xff\xd9"
)
PNG = make_png()


def make_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "hello")
    return buf.getvalue()


@dataclass
class Origin:
    """The test server's state: request counts, bytes streamed, mutable content."""

    base: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    streamed: int = 0
    version: int = 1


def build_app(origin: Origin) -> web.Application:
    async def static(request: web.Request) -> web.StreamResponse:
        origin.hits[request.path] += 1
        bodies: dict[str, tuple[bytes, str]] = {
            "/img.png": (PNG, "image/png"),
            "/photo.jpg": (JPEG, "image/jpeg"),
            "/page.html": (b"<!doctype html><html><body>hi</body></html>", "text/html"),
            "/elf": (Path(sys.executable).read_bytes()[: 16 * KiB], "application/octet-stream"),
            "/archive.zip": (make_zip(), "application/zip"),
            "/pic.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "image/svg+xml"),
            "/data.json": (b'{"a": [1, 2, 3]}', "application/json"),
            "/empty": (b"", "image/png"),
            # The declared type is a lie on purpose: the bytes decide.
            "/disguised.png": (b"<html><script>x</script></html>", "image/png"),
        }
        body, ctype = bodies[request.path]
        return web.Response(body=body, content_type=ctype)

    async def counted(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        await asyncio.sleep(0.05)
        return web.Response(body=make_png(42), content_type="image/png")

    async def mutable(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        etag = f'"v{origin.version}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=make_png(origin.version), content_type="image/png", headers={"ETag": etag}
        )

    async def chain(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG, content_type="image/png")
        # Relative Location on purpose: it must be resolved against the current URL.
        raise web.HTTPFound(f"{n - 1}")

    async def loop(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        raise web.HTTPFound("/loop/b" if request.path == "/loop/a" else "/loop/a")

    async def redirect_to(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        raise web.HTTPFound(request.query["to"])

    async def huge(request: web.Request) -> web.StreamResponse:
        # A generated body far over the cap, streamed from one reused buffer.
        origin.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        block = PNG + bytes(MiB - len(PNG))
        try:
            for _ in range(256):
                await resp.write(block)
                origin.streamed += len(block)
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    async def huge_declared(request: web.Request) -> web.StreamResponse:
        origin.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = 10 * 1024 * MiB
        await resp.prepare(request)
        await resp.write(PNG)
        await asyncio.sleep(30)
        return resp

    async def slow_headers(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        await asyncio.sleep(30)
        return web.Response(body=PNG)

    async def slow_body(request: web.Request) -> web.StreamResponse:
        origin.hits[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        await resp.write(PNG)
        await asyncio.sleep(30)
        return resp

    async def status(request: web.Request) -> web.Response:
        origin.hits[request.path] += 1
        return web.Response(status=int(request.match_info["code"]), text="nope")

    app = web.Application()
    for path in (
        "/img.png",
        "/photo.jpg",
        "/page.html",
        "/elf",
        "/archive.zip",
        "/pic.svg",
        "/data.json",
        "/empty",
        "/disguised.png",
    ):
        app.router.add_get(path, static)
    app.router.add_get("/counted.png", counted)
    app.router.add_get("/mutable.png", mutable)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/loop/{x}", loop)
    app.router.add_get("/redirect-to", redirect_to)
    app.router.add_get("/huge", huge)
    app.router.add_get("/huge-declared", huge_declared)
    app.router.add_get("/slow-headers", slow_headers)
    app.router.add_get("/slow-body", slow_body)
    app.router.add_get("/status/{code}", status)
    return app


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    state = Origin()
    server = await serve.start(build_app(state))
    state.base = serve.base_url(server)
    try:
        yield state
    finally:
        await server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def downloader(tmp_path: Path) -> AsyncIterator[Downloader]:
    d = Downloader(tmp_path / "cache", AddressGuard(["127.0.0.1"]), max_bytes=4 * MiB)
    try:
        yield d
    finally:
        await d.close()


def partial_files(d: Downloader) -> list[str]:
    folder = d.cache_dir / ".partial"
    return os.listdir(folder) if folder.exists() else []


async def test_fetch_png_and_jpeg(origin: Origin, downloader: Downloader) -> None:
    png = await downloader.fetch(f"{origin.base}/img.png")
    assert png.mime == "image/png" and png.ext == ".png"
    assert png.sha256 == hashlib.sha256(PNG).hexdigest()
    assert png.path == downloader.cache_dir / f"{png.sha256}.png"
    assert png.path.read_bytes() == PNG and png.size == len(PNG)
    jpg = await downloader.fetch(f"{origin.base}/photo.jpg")
    assert (jpg.mime, jpg.ext, jpg.size) == ("image/jpeg", ".jpg", len(JPEG))
    data = await downloader.fetch(f"{origin.base}/data.json")
    assert data.mime == "application/json"
    assert partial_files(downloader) == []


async def test_second_fetch_is_a_cache_hit(origin: Origin, downloader: Downloader) -> None:
    first = await downloader.fetch(f"{origin.base}/img.png")
    second = await downloader.fetch(f"{origin.base}/img.png")
    assert first == second
    assert origin.hits["/img.png"] == 1
    assert (downloader.stats.downloads, downloader.stats.cache_hits) == (1, 1)


async def test_concurrent_fetches_of_one_url_download_once(
    origin: Origin, downloader: Downloader
) -> None:
    url = f"{origin.base}/counted.png"
    assets = await asyncio.gather(*(downloader.fetch(url) for _ in range(20)))
    assert origin.hits["/counted.png"] == 1
    assert downloader.stats.downloads == 1
    assert len(set(assets)) == 1
    assert assets[0].path.read_bytes() == make_png(42)
    assert partial_files(downloader) == []


async def test_same_content_from_two_urls_is_stored_once(
    origin: Origin, downloader: Downloader
) -> None:
    a = await downloader.fetch(f"{origin.base}/img.png")
    b = await downloader.fetch(f"{origin.base}/img.png?copy=1")
    assert a.path == b.path
    assert origin.hits["/img.png"] == 2
    assert sorted(p.name for p in downloader.cache_dir.iterdir() if p.is_file()) == [a.path.name]


async def test_stale_entry_is_revalidated_and_changed_content_refreshed(
    origin: Origin, tmp_path: Path
) -> None:
    clock = FakeClock()
    d = Downloader(tmp_path / "c", AddressGuard(["127.0.0.1"]), cache_ttl=60, clock=clock)
    try:
        url = f"{origin.base}/mutable.png"
        v1 = await d.fetch(url)
        clock.now += 30
        assert await d.fetch(url) == v1 and origin.hits["/mutable.png"] == 1
        clock.now += 61
        assert await d.fetch(url) == v1  # 304 Not Modified
        assert origin.hits["/mutable.png"] == 2 and d.stats.revalidated == 1
        origin.version = 2
        clock.now += 61
        v2 = await d.fetch(url)
        assert v2.sha256 == hashlib.sha256(make_png(2)).hexdigest() != v1.sha256
        assert v1.path.exists() and v2.path.exists()
    finally:
        await d.close()


async def test_redirects_are_followed_counted_and_bounded(
    origin: Origin, downloader: Downloader
) -> None:
    asset = await downloader.fetch(f"{origin.base}/chain/5")
    assert asset.sha256 == hashlib.sha256(PNG).hexdigest()
    with pytest.raises(InputError, match="more than 5 redirects"):
        await downloader.fetch(f"{origin.base}/chain/6")
    assert origin.hits["/chain/0"] == 1  # the 6-hop chain never reached its end
    with pytest.raises(InputError, match="redirect loop"):
        await downloader.fetch(f"{origin.base}/loop/a")
    assert origin.hits["/loop/a"] == 1 and origin.hits["/loop/b"] == 1


async def test_body_over_the_cap_is_cut_off_while_streaming(
    origin: Origin, downloader: Downloader
) -> None:
    with pytest.raises(InputError, match="over the 4194304 byte limit"):
        await downloader.fetch(f"{origin.base}/huge")
    # The client stopped reading long before the server's 256 MiB were sent.
    assert origin.streamed < 64 * MiB
    assert partial_files(downloader) == []
    assert [p for p in downloader.cache_dir.iterdir() if p.is_file()] == []


async def test_declared_length_over_the_cap_is_refused_up_front(
    origin: Origin, downloader: Downloader
) -> None:
    with pytest.raises(InputError, match="10737418240 bytes, over the 4194304 byte limit"):
        await downloader.fetch(f"{origin.base}/huge-declared")
    assert partial_files(downloader) == []


@pytest.mark.parametrize("path", ["/slow-headers", "/slow-body"])
async def test_slow_responses_time_out(origin: Origin, tmp_path: Path, path: str) -> None:
    d = Downloader(tmp_path / "c", AddressGuard(["127.0.0.1"]), read_timeout=0.3)
    try:
        with pytest.raises(InputError, match="timed out"):
            await d.fetch(f"{origin.base}{path}")
        assert partial_files(d) == []
    finally:
        await d.close()


async def test_total_timeout_bounds_the_whole_download(origin: Origin, tmp_path: Path) -> None:
    d = Downloader(tmp_path / "c", AddressGuard(["127.0.0.1"]), total_timeout=0.3)
    try:
        with pytest.raises(InputError, match="timed out"):
            await d.fetch(f"{origin.base}/slow-body")
    finally:
        await d.close()


@pytest.mark.parametrize(
    ("path", "mime"),
    [
        ("/page.html", "text/html"),
        ("/elf", "application/x-"),
        ("/archive.zip", "application/zip"),
        ("/pic.svg", "image/svg+xml"),
        ("/disguised.png", "text/html"),
    ],
)
async def test_unaccepted_types_are_refused(
    origin: Origin, downloader: Downloader, path: str, mime: str
) -> None:
    with pytest.raises(InputError, match="not an accepted input type") as info:
        await downloader.fetch(f"{origin.base}{path}")
    assert info.value.details["mimetype"].startswith(mime)
    assert [p for p in downloader.cache_dir.iterdir() if p.is_file()] == []


async def test_http_errors_and_unreachable_hosts(origin: Origin, downloader: Downloader) -> None:
    with pytest.raises(InputError, match="HTTP 404") as info:
        await downloader.fetch(f"{origin.base}/status/404")
    assert info.value.details == {"status": 404}
    with pytest.raises(InputError, match="empty body"):
        await downloader.fetch(f"{origin.base}/empty")
    # A port nothing listens on (bound then closed).
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(InputError, match="cannot connect"):
        await downloader.fetch(f"http://127.0.0.1:{port}/img.png")


async def test_query_strings_never_reach_messages_or_logs(
    origin: Origin, downloader: Downloader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "X-Amz-Signature=deadbeefsecret"
    for path in ("/status/403", "/page.html", "/chain/9", "/slow-headers"):
        url = f"{origin.base}{path}?{secret}"
        if path == "/slow-headers":
            d = Downloader(downloader.cache_dir, AddressGuard(["127.0.0.1"]), read_timeout=0.2)
            try:
                with pytest.raises(InputError) as info:
                    await d.fetch(url)
            finally:
                await d.close()
        else:
            with pytest.raises(InputError) as info:
                await downloader.fetch(url)
        assert "deadbeefsecret" not in str(info.value.to_dict())
        assert "?<redacted>" in info.value.message
    await downloader.fetch(f"{origin.base}/img.png?{secret}")
    # The test server's own access log shows the query; every client-side record must not.
    ours = [r for r in caplog.records if r.name != "aiohttp.access"]
    assert any(r.name == "comfyq.inputs" for r in ours)
    assert not [r for r in ours if "deadbeefsecret" in r.getMessage()]


async def test_close_aborts_inflight_downloads(origin: Origin, tmp_path: Path) -> None:
    d = Downloader(tmp_path / "c", AddressGuard(["127.0.0.1"]))
    task = asyncio.ensure_future(d.fetch(f"{origin.base}/slow-body"))
    while origin.hits["/slow-body"] == 0:
        await asyncio.sleep(0.01)
    await d.close()
    with pytest.raises((asyncio.CancelledError, InputError)):
        await task
    assert partial_files(d) == []


# --- inline data ---------------------------------------------------------------------------


async def test_decode_base64_and_data_uris(downloader: Downloader) -> None:
    b64 = base64.b64encode(PNG).decode()
    plain = await downloader.decode(b64)
    assert plain.mime == "image/png" and plain.path.read_bytes() == PNG
    assert await downloader.decode(f"data:image/png;base64,{b64}") == plain
    # Whitespace, URL-safe alphabet and missing padding are all tolerated.
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert await downloader.decode(wrapped) == plain
    urlsafe = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    assert await downloader.decode(urlsafe) == plain
    jpg = await downloader.decode("data:;base64," + base64.b64encode(JPEG).decode())
    assert jpg.mime == "image/jpeg"
    text = await downloader.decode("data:text/plain,hello%20world")
    assert text.mime == "text/plain" and text.path.read_bytes() == b"hello world"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("input.png", "neither valid base64"),
        ("data:image/png;base64", "no ','"),
        ("", "empty"),
        (base64.b64encode(b"<html><body>x</body></html>").decode(), "not an accepted input type"),
        (base64.b64encode(make_zip()).decode(), "not an accepted input type"),
    ],
)
async def test_decode_refusals(downloader: Downloader, data: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        await downloader.decode(data)


async def test_decode_is_size_capped(tmp_path: Path) -> None:
    d = Downloader(tmp_path / "c", AddressGuard(), max_bytes=1024)
    big = base64.b64encode(PNG + bytes(4096)).decode()
    with pytest.raises(InputError, match="over the 1024 byte limit"):
        await d.decode(big)
    with pytest.raises(InputError, match="over the 1024 byte limit"):
        await d.decode("data:text/plain," + "a" * 2000)
    await d.close()


async def test_prune_removes_unused_files(origin: Origin, downloader: Downloader) -> None:
    old = await downloader.decode(base64.b64encode(JPEG).decode())
    fresh = await downloader.fetch(f"{origin.base}/img.png")
    past = time.time() - 7200
    os.utime(old.path, (past, past))
    assert await downloader.prune(older_than=3600) == 1
    assert not old.path.exists() and fresh.path.exists()
    # A pruned file referenced by the URL index is downloaded again, not served missing.
    os.utime(fresh.path, (past, past))
    assert await downloader.prune(older_than=3600) == 1
    again = await downloader.fetch(f"{origin.base}/img.png")
    assert again.path.exists() and origin.hits["/img.png"] == 2


def test_sniff_type_knows_model_formats() -> None:
    header = b'{"__metadata__":{}}'
    assert sniff_type(len(header).to_bytes(8, "little") + header) == "application/x-safetensors"
    assert sniff_type(b"GGUF\x03\x00\x00\x00" + bytes(16)) == "application/x-gguf"
    assert sniff_type(PNG) == "image/png"
