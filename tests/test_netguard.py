"""AddressGuard: address classification, URL checks, resolver and session integration.

Only loopback addresses ever receive traffic; every other address here is refused before a
connection is attempted (and the refusal message proves the guard, not the network, said no).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from support import serve

from comfyq.errors import InputError
from comfyq.netguard import AddressGuard, BlockedAddress, redact_url

BLOCKED = [
    "127.0.0.1",
    "127.0.0.2",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 around 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 around 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    "::7f00:1",  # IPv4-compatible (deprecated)
    "2001:db8::1",
    "100::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2002:808:808::1"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_refused(address: str) -> None:
    guard = AddressGuard()
    assert guard.blocked_reason(address) is not None
    assert not guard.address_allowed(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert AddressGuard().blocked_reason(address) is None


def test_allowlist_cidrs_and_hosts() -> None:
    guard = AddressGuard(["127.0.0.1", "10.1.0.0/16", "files.internal", "*.corp.example", "::1"])
    assert guard.address_allowed("127.0.0.1")
    assert not guard.address_allowed("127.0.0.2")
    assert guard.address_allowed("10.1.200.3")
    assert not guard.address_allowed("10.2.0.1")
    assert guard.address_allowed("::1")
    # The IPv4-mapped form of an allowlisted address is the same destination.
    assert guard.address_allowed("::ffff:127.0.0.1")
    assert guard.address_allowed("192.168.0.7", host="files.internal")
    assert guard.address_allowed("192.168.0.7", host="FILES.INTERNAL.")
    assert guard.address_allowed("192.168.0.7", host="a.corp.example")
    assert not guard.address_allowed("192.168.0.7", host="corp.example.evil")
    assert not guard.address_allowed("192.168.0.7", host="other.internal")


@pytest.mark.parametrize("entry", ["http://x", "a b", "host/path", "user@host", "*."])
def test_bad_allowlist_entries_are_startup_errors(entry: str) -> None:
    with pytest.raises(ValueError, match="allowlist entry"):
        AddressGuard([entry])


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/a.png", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("s3://bucket/key", "only http and https"),
        ("http://", "no host"),
        ("https://user:pw@example.com/a.png", "credentials"),
        ("https://example.com/a b.png", "whitespace"),
        ("https://example.com/a\nb", "whitespace"),
        ("https://example.com:99999/a.png", "port"),
        ("http://127.0.0.1:8188/prompt", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:8188/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "embeds 127.0.0.1"),
        ("http://0.0.0.0:8188/", "unspecified"),
        ("https://" + "a" * 9000 + ".com", "longer"),
        ("http://2130706433/", "non-canonical"),
        ("http://0x7f000001/", "non-canonical"),
        ("http://0x7f.1/", "non-canonical"),
        ("http://127.1/", "non-canonical"),
        ("http://017700000001/", "non-canonical"),
    ],
)
def test_check_url_syntax_refusals(url: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        AddressGuard().check_url_syntax(url)
    assert fragment in info.value.message


def test_check_url_syntax_accepts_and_redacts() -> None:
    guard = AddressGuard()
    u = guard.check_url_syntax("https://Example.com/a.png?X-Amz-Signature=secret#frag")
    assert u.host == "example.com"
    with pytest.raises(InputError) as info:
        guard.check_url_syntax("http://10.0.0.1/x.png?token=hunter2")
    assert "hunter2" not in info.value.message
    assert "?<redacted>" in info.value.message
    assert redact_url("https://u:p@h.com/p?q=1#f") == "https://h.com/p?<redacted>"
    assert AddressGuard(["10.0.0.0/8"]).check_url_syntax("http://10.0.0.1/").host == "10.0.0.1"


async def test_resolve_checked_localhost() -> None:
    with pytest.raises(BlockedAddress, match="loopback"):
        await AddressGuard().resolve_checked("localhost", 80)
    assert await AddressGuard(["127.0.0.1"]).resolve_checked("localhost", 80) == ["127.0.0.1"]
    assert await AddressGuard(["localhost"]).resolve_checked("localhost", 80) == ["127.0.0.1"]
    with pytest.raises(BlockedAddress):
        await AddressGuard().resolve_checked("169.254.169.254", 80)


@dataclass
class TableResolver(AbstractResolver):
    """A real resolver that answers from a table (stands in for an attacker's DNS)."""

    table: dict[str, list[str]]
    calls: list[str] = field(default_factory=list)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for a in self.table[host]
        ]

    async def close(self) -> None:
        return None


async def test_resolver_drops_refused_addresses() -> None:
    # Only resolution is exercised here: nothing connects to the public address.
    table = TableResolver({"mixed.test": ["8.8.8.8", "127.0.0.1", "::1"], "bad.test": ["10.0.0.1"]})
    guard = AddressGuard(resolver=table)
    results = await guard.resolver().resolve("mixed.test", 443)
    assert [r["host"] for r in results] == ["8.8.8.8"]
    with pytest.raises(BlockedAddress, match="10.0.0.1 is a private address"):
        await guard.resolver().resolve("bad.test", 443)
    with pytest.raises(InputError, match="cannot resolve"):
        await guard.resolve_checked("nxdomain.test", 80)


@dataclass
class Server:
    url: str
    hits: list[str]


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server]]:
    """A server on 127.0.0.1 and a trap on 127.0.0.2 (it must never be hit)."""
    trap = Server("", [])
    main = Server("", [])

    async def record(request: web.Request) -> web.Response:
        trap.hits.append(request.path)
        return web.Response(text="trap")

    async def ok(request: web.Request) -> web.Response:
        main.hits.append(request.path)
        return web.Response(text="ok")

    async def to_trap(request: web.Request) -> web.Response:
        main.hits.append(request.path)
        raise web.HTTPFound(f"{trap.url}/secret")

    trap_app = web.Application()
    trap_app.router.add_get("/{tail:.*}", record)
    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/to-trap", to_trap)
    trap_server = await serve.start(trap_app, host="127.0.0.2")
    server = await serve.start(app)
    trap.url, main.url = serve.base_url(trap_server), serve.base_url(server)
    try:
        yield main, trap
    finally:
        await server.close()
        await trap_server.close()


async def test_session_refuses_loopback_by_name_without_allowlist(
    servers: tuple[Server, Server],
) -> None:
    main, _ = servers
    port = main.url.rsplit(":", 1)[1]
    async with AddressGuard().session() as session:
        with pytest.raises(BlockedAddress, match="loopback"):
            await session.get(f"http://localhost:{port}/ok")
        with pytest.raises(BlockedAddress, match="loopback"):
            await session.get(f"{main.url}/ok")
    assert main.hits == []


async def test_session_with_allowlist_and_redirect_to_other_loopback(
    servers: tuple[Server, Server],
) -> None:
    main, trap = servers
    async with AddressGuard(["127.0.0.1"]).session() as session:
        async with session.get(f"{main.url}/ok") as resp:
            assert resp.status == 200
        port = main.url.rsplit(":", 1)[1]
        async with session.get(f"http://localhost:{port}/ok") as resp:
            assert resp.status == 200
        # aiohttp follows this redirect itself; the guard's trace hook refuses the hop.
        with pytest.raises(BlockedAddress, match="127.0.0.2"):
            await session.get(f"{main.url}/to-trap")
    assert main.hits == ["/ok", "/ok", "/to-trap"]
    assert trap.hits == []


async def test_session_name_resolving_to_loopback_is_refused(
    servers: tuple[Server, Server],
) -> None:
    main, _ = servers
    port = main.url.rsplit(":", 1)[1]
    table = TableResolver({"innocent.test": ["127.0.0.1"]})
    async with AddressGuard(resolver=table).session() as session:
        with pytest.raises(BlockedAddress, match="innocent.test"):
            await session.get(f"http://innocent.test:{port}/ok")
    assert table.calls == ["innocent.test"]
    assert main.hits == []
    # The same name, allowlisted by the operator, connects.
    guard = AddressGuard(["innocent.test"], resolver=table)
    async with guard.session() as session, session.get(f"http://innocent.test:{port}/ok") as resp:
        assert resp.status == 200
    assert main.hits == ["/ok"]


async def test_session_ignores_proxy_environment(
    servers: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy would connect on our behalf to addresses the guard never sees. The "proxy" here
    # is the loopback trap, so even a regression sends nothing off the machine.
    main, trap = servers
    monkeypatch.setenv("HTTP_PROXY", trap.url)
    monkeypatch.setenv("http_proxy", trap.url)
    guard = AddressGuard(["127.0.0.1"])
    async with (
        guard.session(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(f"{main.url}/ok") as resp,
    ):
        assert resp.status == 200
    assert trap.hits == []
