"""Downloader SSRF refusals. Non-loopback targets are refused before any connection is made;
loopback targets are real servers that count their hits (a refused fetch leaves them at 0)."""

from __future__ import annotations

import socket
import struct
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from support import serve

from comfyq.errors import InputError
from comfyq.inputs import Downloader
from comfyq.netguard import AddressGuard, BlockedAddress


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


PNG = _png()


@dataclass
class Site:
    base: str = ""
    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)


async def _start(host: str, site: Site) -> TestServer:
    async def image(request: web.Request) -> web.Response:
        site.hits[request.path] += 1
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        site.hits[request.path] += 1
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/img.png", image)
    app.router.add_get("/redirect", redirect)
    server = await serve.start(app, host=host)
    assert server.port is not None
    site.port, site.base = server.port, serve.base_url(server)
    return server


@pytest.fixture
async def sites() -> AsyncIterator[tuple[Site, Site]]:
    """The origin on 127.0.0.1 and a trap on 127.0.0.2 (also loopback, never allowlisted)."""
    origin, trap = Site(), Site()
    servers = [await _start("127.0.0.1", origin), await _start("127.0.0.2", trap)]
    try:
        yield origin, trap
    finally:
        for s in servers:
            await s.close()


class TableResolver(AbstractResolver):
    """Answers from a table, like a DNS server an attacker controls."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.table[host]
        ]

    async def close(self) -> None:
        return None


def _downloader(tmp_path: Path, guard: AddressGuard) -> Downloader:
    # Short timeouts: were a refusal ever to fail open, the test would end quickly, not hang.
    return Downloader(tmp_path / "cache", guard, connect_timeout=2, total_timeout=5)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:{port}/img.png", "loopback"),
        ("http://10.0.0.1/img.png", "private"),
        ("http://169.254.169.254/latest/meta-data/iam/", "link-local"),
        ("http://[::1]:{port}/img.png", "loopback"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://localhost:{port}/img.png", "loopback"),
    ],
)
async def test_private_targets_refused_without_allowlist(
    sites: tuple[Site, Site], tmp_path: Path, url: str, reason: str
) -> None:
    origin, _ = sites
    d = _downloader(tmp_path, AddressGuard())
    try:
        with pytest.raises(BlockedAddress, match=reason):
            await d.fetch(url.format(port=origin.port))
    finally:
        await d.close()
    assert sum(origin.hits.values()) == 0


async def test_allowlisted_origin_downloads(sites: tuple[Site, Site], tmp_path: Path) -> None:
    origin, _ = sites
    d = _downloader(tmp_path, AddressGuard(["127.0.0.1"]))
    try:
        assert (await d.fetch(f"{origin.base}/img.png")).mime == "image/png"
        # localhost resolves to the allowlisted address, so it is the same destination.
        assert (await d.fetch(f"http://localhost:{origin.port}/img.png")).size == len(PNG)
    finally:
        await d.close()
    assert origin.hits["/img.png"] == 2


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{trap}/img.png",
        "http://10.0.0.1/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{trap}/img.png",
        "//127.0.0.2:{trap}/img.png",  # scheme-relative
        "ftp://127.0.0.1/img.png",
    ],
)
async def test_redirect_from_allowed_origin_to_private_target_refused(
    sites: tuple[Site, Site], tmp_path: Path, target: str
) -> None:
    origin, trap = sites
    d = _downloader(tmp_path, AddressGuard(["127.0.0.1"]))
    to = target.format(trap=trap.port)
    try:
        with pytest.raises(InputError, match="redirect refused"):
            await d.fetch(f"{origin.base}/redirect?to={to}")
    finally:
        await d.close()
    assert origin.hits["/redirect"] == 1
    assert sum(trap.hits.values()) == 0


async def test_host_name_resolving_to_unlisted_loopback_refused(
    sites: tuple[Site, Site], tmp_path: Path
) -> None:
    origin, trap = sites
    table = TableResolver({"cdn.test": ["127.0.0.2"], "good.test": ["127.0.0.1"]})
    d = _downloader(tmp_path, AddressGuard(["127.0.0.1"], resolver=table))
    try:
        with pytest.raises(BlockedAddress, match="cdn.test"):
            await d.fetch(f"http://cdn.test:{trap.port}/img.png")
        # Redirect to a name is checked at connect time by the guarded resolver.
        with pytest.raises(BlockedAddress, match="127.0.0.2"):
            await d.fetch(f"{origin.base}/redirect?to=http://cdn.test:{trap.port}/img.png")
        # A name that resolves to the allowlisted address works, redirect included.
        asset = await d.fetch(f"{origin.base}/redirect?to=http://good.test:{origin.port}/img.png")
        assert asset.mime == "image/png"
    finally:
        await d.close()
    assert sum(trap.hits.values()) == 0
    assert origin.hits["/img.png"] == 1
