"""A real S3-protocol server (moto's ThreadedMotoServer) and a loopback proxy in front of it that
records which access key signed each request and can fail requests on demand."""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import boto3  # type: ignore[import-untyped]  # boto3 ships no types
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from moto.server import ThreadedMotoServer

from support import serve


# A real S3-protocol server for the whole session (buckets are named per test).
@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


_CREDENTIAL = re.compile(r"Credential=([^/]+)/")


def _admin(moto_url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )


def make_bucket(moto_url: str, name: str) -> None:
    """Create a bucket on the moto server (blocking; boto3 is fine in setup)."""
    _admin(moto_url).create_bucket(Bucket=name)


def open_multipart_uploads(moto_url: str, bucket: str) -> list[dict[str, Any]]:
    """Multipart uploads begun in ``bucket`` and neither completed nor aborted (blocking)."""
    found: list[dict[str, Any]] = (
        _admin(moto_url).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    )
    return found


@dataclass
class Seen:
    method: str
    path: str
    query: str
    access_key: str
    answered: str  # "forwarded" or the injected fault


class FaultyProxy:
    """Forwards every request to moto, except those the ``faults`` queue says to fail.

    A fault applies to the next request whose method is in ``fault_methods``: ``"503"`` answers
    503 SlowDown, ``"drop"`` closes the connection without an answer, ``"hang"`` never answers
    (``hung`` is set once one hangs; the client gives up or ``stop()`` ends it).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: deque[str] = deque()
        self.fault_methods = {"PUT", "POST"}
        self.seen: list[Seen] = []
        self.hung = asyncio.Event()
        self._release = asyncio.Event()
        self._server: TestServer | None = None
        self._client: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> FaultyProxy:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = await serve.start(app)
        self.url = serve.base_url(self._server)
        self._client = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._client is not None:
            await self._client.close()
        if self._server is not None:
            await self._server.close()

    def keys_used(self) -> set[str]:
        return {s.access_key for s in self.seen if s.access_key}

    def writes(self) -> list[Seen]:
        return [s for s in self.seen if s.method in ("PUT", "POST") and s.answered == "forwarded"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        m = _CREDENTIAL.search(request.headers.get("Authorization", ""))
        key = m.group(1) if m else request.query.get("X-Amz-Credential", "").split("/")[0]
        body = await request.read()
        if self.faults and request.method in self.fault_methods:
            fault = self.faults.popleft()
            self.seen.append(Seen(request.method, request.path, request.query_string, key, fault))
            if fault == "hang":
                self.hung.set()
                await self._release.wait()
                return web.Response(status=503)
            if fault == "drop":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            return web.Response(
                status=503,
                content_type="application/xml",
                text="<Error><Code>SlowDown</Code><Message>slow down</Message></Error>",
            )
        self.seen.append(Seen(request.method, request.path, request.query_string, key, "forwarded"))
        assert self._client is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._client.request(
            request.method, self.upstream + str(request.rel_url), headers=headers, data=body
        ) as up:
            data = await up.read()
            # A HEAD answer's Content-Length is the object's size: pass it on as it is.
            drop = {"transfer-encoding", "connection", "server", "date"}
            if request.method != "HEAD":
                drop.add("content-length")
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in drop}
            return web.Response(status=up.status, body=data or None, headers=out_headers)
