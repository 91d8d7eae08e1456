"""Outbound address policy: which URLs comfyq may fetch or post to (SSRF guard).

Input downloads and webhooks reach URLs that clients choose, so every hop is checked twice: the
URL itself (scheme, host, literal IP addresses) before a request starts, and every address a host
name resolves to at connect time (so redirects to host names and DNS rebinding are covered too).
Loopback, private, link-local, multicast, reserved and unspecified addresses are refused unless
the operator allowlisted the host or a network containing the address.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from comfyq.errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64_PREFIXES = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
_MAX_URL_LENGTH = 8192
_LEGACY_IPV4 = re.compile(
    r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.IGNORECASE
)


class BlockedAddress(InputError):
    """A URL's host is, or resolves to, an address the guard refuses."""


def redact_url(url: str | URL) -> str:
    """The URL without credentials, query or fragment, safe for messages and logs."""
    try:
        u = url if isinstance(url, URL) else URL(url)
        if not u.is_absolute():
            return "<relative URL>"
        shown = u.with_user(None).with_password(None).with_query(None).with_fragment(None)
        text = str(shown)
        # Presigned URLs carry their signature in the query; its presence is still useful to know.
        return text + "?<redacted>" if u.raw_query_string else text
    except (ValueError, TypeError):
        return "<unparseable URL>"


def _blocked_reason(ip: IPAddress) -> str | None:
    """Why an address may not be contacted, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that embed an IPv4 address are judged by the IPv4 address they lead to.
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None:
            for net in _NAT64_PREFIXES:
                if ip in net:
                    embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = _blocked_reason(embedded)
            return f"embeds {embedded}, which is {inner}" if inner else None
        if ip.teredo is not None:
            server, client = ip.teredo
            for part in (server, client):
                inner = _blocked_reason(part)
                if inner:
                    return f"is a Teredo address embedding {part}, which is {inner}"
        if ip.is_site_local:
            return "a site-local address"
    checks = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


class AddressGuard:
    """Decides which URLs and addresses outbound requests may reach."""

    def __init__(
        self,
        allowlist: Sequence[str] = (),
        *,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self._networks: list[IPNetwork] = []
        self._hosts: set[str] = set()
        self._host_suffixes: list[str] = []
        for raw in allowlist:
            entry = raw.strip()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            host = entry.lower().rstrip(".")
            bare = host.removeprefix("*.")
            if (
                not bare
                or bare.startswith(".")
                or any(c in bare for c in "/:@ ?#[]*")
                or ".." in bare
            ):
                raise ValueError(f"URL allowlist entry {raw!r} is neither a host name nor a CIDR")
            if host.startswith("*."):
                self._host_suffixes.append("." + bare)
            else:
                self._hosts.add(host)
        # An injected resolver lets tests decide what names resolve to; the default is the
        # system resolver (created lazily because it needs the running loop).
        self._inner = resolver

    # --- policy ----------------------------------------------------------------------------

    def host_allowlisted(self, host: str) -> bool:
        """True when the operator allowlisted this host name."""
        h = host.lower().rstrip(".")
        return h in self._hosts or any(h.endswith(s) for s in self._host_suffixes)

    def address_allowed(self, address: str | IPAddress, host: str | None = None) -> bool:
        """True when ``address`` may be contacted (reached via ``host``, if given)."""
        return self.blocked_reason(address, host) is None

    def blocked_reason(self, address: str | IPAddress, host: str | None = None) -> str | None:
        """Why ``address`` may not be contacted, or None when it may."""
        ip = _parse_ip(address) if isinstance(address, str) else address
        if ip is None:
            return "not an IP address"
        if host is not None and self.host_allowlisted(host):
            return None
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        for cand in candidates:
            for net in self._networks:
                if cand.version == net.version and cand in net:
                    return None
        return _blocked_reason(ip)

    # --- URL checks ------------------------------------------------------------------------

    def check_url_syntax(self, url: str | URL) -> URL:
        """Parse ``url`` and refuse anything but plain http(s) URLs to allowed hosts."""
        if isinstance(url, URL):
            u = url
        else:
            if not isinstance(url, str):
                raise InputError("URL must be a string")
            if len(url) > _MAX_URL_LENGTH:
                raise InputError(f"URL is longer than {_MAX_URL_LENGTH} characters")
            if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
                raise InputError(f"URL {redact_url(url)} contains whitespace or control characters")
            try:
                u = URL(url)
            except (ValueError, TypeError) as exc:
                what = "has an invalid port" if "port" in str(exc).lower() else "cannot be parsed"
                raise InputError(f"URL {what}") from None
        shown = redact_url(u)
        if u.scheme not in ("http", "https"):
            raise InputError(f"URL {shown}: only http and https URLs are allowed")
        host = u.raw_host
        if not host:
            raise InputError(f"URL {shown} has no host")
        if u.raw_user is not None or u.raw_password is not None:
            raise InputError(f"URL {shown}: credentials in URLs are not allowed")
        try:
            port = u.port
        except ValueError:
            raise InputError(f"URL {shown} has an invalid port") from None
        if port is None or not 0 < port < 65536:
            raise InputError(f"URL {shown} has an invalid port")
        ip = _parse_ip(host)
        if ip is None and _LEGACY_IPV4.fullmatch(host):
            # inet_aton spellings (2130706433, 0x7f.1, 127.1) reach an address without looking
            # like one; some aiohttp versions pass them straight to connect().
            raise BlockedAddress(f"URL {shown}: non-canonical IPv4 address {host!r} refused")
        if ip is not None:
            reason = self.blocked_reason(ip)
            if reason:
                raise BlockedAddress(
                    f"URL {shown} refused: {ip} is {reason} (not in the URL allowlist)"
                )
        return u

    async def resolve_checked(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and return only the addresses that may be contacted."""
        results = await self._resolve_filtered(host, port, socket.AF_UNSPEC)
        return [r["host"] for r in results]

    async def _resolve_filtered(
        self, host: str, port: int, family: socket.AddressFamily
    ) -> list[ResolveResult]:
        ip = _parse_ip(host)
        if ip is not None:
            reason = self.blocked_reason(ip)
            if reason:
                raise BlockedAddress(f"address {ip} is {reason} (not in the URL allowlist)")
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [
                ResolveResult(hostname=host, host=str(ip), port=port, family=fam, proto=0, flags=0)
            ]
        # A fresh ThreadedResolver per lookup: it binds the running loop, and one guard may
        # serve several loops (tests, or a CLI that runs its own loop).
        inner = self._inner or aiohttp.ThreadedResolver()
        try:
            results = await inner.resolve(host, port, family=family)
        except OSError as exc:
            raise InputError(f"cannot resolve host {host!r}: {exc.strerror or exc}") from None
        allowed: list[ResolveResult] = []
        refused: list[str] = []
        for r in results:
            reason = self.blocked_reason(r["host"], host)
            if reason is None:
                allowed.append(r)
            else:
                refused.append(f"{r['host']} is {reason}")
        if not allowed:
            detail = "; ".join(refused) if refused else "no addresses"
            raise BlockedAddress(f"host {host!r} refused: {detail} (not in the URL allowlist)")
        return allowed

    # --- aiohttp integration ---------------------------------------------------------------

    def resolver(self) -> AbstractResolver:
        """A resolver for ``aiohttp.TCPConnector`` that applies the guard at connect time."""
        return GuardedResolver(self)

    def trace_config(self) -> aiohttp.TraceConfig:
        """A trace config that checks a session's first URL and every redirect target.

        aiohttp never asks the resolver about literal IP addresses, so a redirect to
        ``http://10.0.0.1/`` would otherwise slip past the resolver check.
        """

        async def on_request_start(
            session: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestStartParams,
        ) -> None:
            self.check_url_syntax(params.url)

        async def on_request_redirect(
            session: aiohttp.ClientSession,
            ctx: SimpleNamespace,
            params: aiohttp.TraceRequestRedirectParams,
        ) -> None:
            location = params.response.headers.get("Location")
            if not location:
                return
            try:
                target = params.response.url.join(URL(location))
            except (ValueError, TypeError):
                return  # aiohttp refuses unparseable redirects itself
            if target.raw_host:
                self.check_url_syntax(target)

        tc = aiohttp.TraceConfig()
        tc.on_request_start.append(on_request_start)
        tc.on_request_redirect.append(on_request_redirect)
        return tc

    def connector(self, **kwargs: Any) -> aiohttp.TCPConnector:
        """A ``TCPConnector`` that resolves host names through the guard."""
        return aiohttp.TCPConnector(resolver=self.resolver(), **kwargs)

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """A client session whose every request (and redirect) passes the guard.

        Environment proxies are ignored on purpose: a proxy would connect on our behalf to
        addresses the guard never sees.
        """
        connector = kwargs.pop("connector", None) or self.connector()
        traces = list(kwargs.pop("trace_configs", None) or [])
        traces.append(self.trace_config())
        kwargs["trust_env"] = False
        return aiohttp.ClientSession(connector=connector, trace_configs=traces, **kwargs)


class GuardedResolver(AbstractResolver):
    """Resolves through the guard: refused addresses are dropped, none left is an error."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and keep only allowed addresses."""
        return await self._guard._resolve_filtered(host, port, family)

    async def close(self) -> None:
        """Nothing to release: the guard, not each connector, owns any injected resolver."""
