"""Output files from any instance.

Each job's files are written by the instance that post-processed it, into its own output folder;
the job's result records that instance's name (``held_by``: a box keeps its name, and its files,
across restarts, while its instance id is new at every start). ``GET /outputs/{id}/{file}`` on
another
instance finds the file missing locally (unless the output folder is shared storage) and streams
it from the holder's API, whose address the registry keeps. With S3 the Result's URLs point at
S3 already and no instance is involved. A request that already went one hop is never passed on
again, so two instances that disagree cannot bounce a request between them.

Why a proxy and not the bytes in the database: outputs are large (images of MBs, videos of GBs),
a database that carries them grows its WAL, backups and replication by that much for data that
is read once or twice; the proxy costs one extra hop on a LAN, measured in bench_cluster.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from comfyq.cluster.member import Membership
from comfyq.store.model import Job

log = logging.getLogger("comfyq.cluster")

HOP = "X-Comfyq-Hop"  # set on proxied requests: the receiver serves from its disk or says 404
_PASS = (
    "Content-Type",
    "Content-Length",
    "Content-Disposition",
    "X-Content-Type-Options",
    "ETag",
    "Last-Modified",
)
URL_TTL = 5.0  # seconds an instance's registered URL is reused without reading the registry


def holder_of(job: Job) -> str | None:
    """The name of the instance holding the job's files (None: recorded by a single instance)."""
    held = (job.result or {}).get("held_by")
    return held if isinstance(held, str) and held else None


class OutputRouter:
    """Finds the instance that holds a job's files and fetches them from it."""

    def __init__(
        self, cluster: Membership, *, api_key: str | None = None, timeout: float = 300.0
    ) -> None:
        self.cluster = cluster
        # Instances of one cluster share their API keys: a hop presents this instance's first one.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, tuple[float, str]] = {}
        self.proxied = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=5)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def holder_url(self, job: Job) -> str | None:
        """The API base URL of the instance holding ``job``'s files, when that is another one."""
        held = holder_of(job)
        if held is None or held == self.cluster.me.name or not self.cluster.shared:
            return None
        hit = self._urls.get(held)
        if hit is not None and time.monotonic() - hit[0] < URL_TTL:
            return hit[1]
        beat = self.cluster.settings.instance_heartbeat
        # Most recently heard first: the newest start of that name, alive ones before dead ones.
        for inst in sorted(await self.cluster.link.instances(), key=lambda i: not i.alive(beat)):
            if inst.url and inst.name not in self._fresh():
                self._urls[inst.name] = (time.monotonic(), inst.url)
        hit = self._urls.get(held)
        return hit[1] if hit is not None else None

    def _fresh(self) -> set[str]:
        now = time.monotonic()
        return {n for n, (at, _) in self._urls.items() if now - at < URL_TTL}

    async def proxy(
        self, request: web.Request, job: Job, filename: str
    ) -> web.StreamResponse | None:
        """Stream the file from its holder; None when no other instance can be asked."""
        if request.headers.get(HOP):
            return None
        for _ in range(2):  # a cached address may be stale (the holder restarted elsewhere)
            base = await self.holder_url(job)
            if base is None:
                return None
            resp = await self._proxy_from(request, job, filename, base)
            if resp is not None:
                return resp
            self._urls.pop(holder_of(job) or "", None)
        return None

    async def _proxy_from(
        self, request: web.Request, job: Job, filename: str, base: str
    ) -> web.StreamResponse | None:
        headers = {HOP: self.cluster.me.id, **self._auth}
        url = f"{base}{request.rel_url.raw_path}"
        try:
            async with self._client().get(url, headers=headers) as up:
                if up.status != 200:
                    log.info(
                        "output %s/%s: holder %s answered %d", job.id, filename, base, up.status
                    )
                    return None
                resp = web.StreamResponse(
                    status=200, headers={k: up.headers[k] for k in _PASS if k in up.headers}
                )
                await resp.prepare(request)
                try:
                    async for chunk in up.content.iter_chunked(1 << 16):
                        await resp.write(chunk)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # The head is sent: no other holder can answer now. The connection is cut
                    # (the client sees a short download), never a second answer after the first.
                    raise ConnectionResetError(
                        f"output {job.id}/{filename}: holder {base} went away midway: {exc}"
                    ) from exc
                await resp.write_eof()
                self.proxied += 1
                return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("output %s/%s: holder %s unreachable: %s", job.id, filename, base, exc)
            return None

    async def fetch(self, job: Job, filename: str, limit: int) -> tuple[bytes | None, str | None]:
        """The file's bytes from its holder, up to ``limit`` (for base64 inlining)."""
        base = await self.holder_url(job)
        if base is None:
            return None, "the instance holding this file is not known"
        from comfyq.result import output_url

        try:
            async with self._client().get(
                base + output_url(job.id, filename), headers={HOP: self.cluster.me.id, **self._auth}
            ) as up:
                if up.status != 200:
                    return None, f"the instance holding this file answered {up.status}"
                if (up.content_length or 0) > limit:
                    over = f"{up.content_length} bytes is over the {limit}-byte limit"
                    return None, f"not inlined as base64: {over}"
                data = await up.content.read(limit + 1)
                if len(data) > limit:
                    return None, f"not inlined as base64: over the {limit}-byte limit"
                return data, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"the instance holding this file is unreachable: {exc}"

    def health(self) -> dict[str, Any]:
        return {"proxied": self.proxied}
