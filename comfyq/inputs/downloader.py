"""Downloader: URL inputs fetched safely into the content-hash cache, inline ones decoded there."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from comfyq.errors import InputError
from comfyq.fileio import BatchedWriter, write_file
from comfyq.inputs.filetypes import (
    DEFAULT_ALLOWED_TYPES,
    SNIFF_BYTES,
    Asset,
    MiB,
    extension_for,
    sniff_type,
    type_allowed,
)
from comfyq.inputs.storage import (
    PARTIAL_DIR,
    discard,
    inline_candidate,
    prune_dir,
    touch,
)
from comfyq.logs import detached
from comfyq.netguard import AddressGuard, redact_url

log = logging.getLogger("comfyq.inputs")

_WRITE_BATCH = 1 * MiB
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_TOUCH_INTERVAL = 60.0


@dataclass
class DownloaderStats:
    """Counters for metrics and benchmarks."""

    downloads: int = 0
    cache_hits: int = 0
    revalidated: int = 0
    coalesced: int = 0
    failures: int = 0
    bytes_downloaded: int = 0


@dataclass
class _IndexEntry:
    asset: Asset
    stored_at: float
    etag: str | None = None
    last_modified: str | None = None
    touched_at: float = 0.0


class Downloader:
    """Fetches URL and inline inputs into a content-addressed cache directory."""

    def __init__(
        self,
        cache_dir: Path,
        guard: AddressGuard,
        *,
        max_bytes: int = 512 * MiB,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        total_timeout: float = 600,
        max_redirects: int = 5,
        allowed_types: Iterable[str] = DEFAULT_ALLOWED_TYPES,
        cache_ttl: float = 3600,
        index_size: int = 10_000,
        user_agent: str = "comfyq",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self._guard = guard
        self._max_bytes = max_bytes
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._max_redirects = max_redirects
        self._allowed = frozenset(allowed_types)
        self._cache_ttl = cache_ttl
        self._index_size = index_size
        self._user_agent = user_agent
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task[Asset]] = {}
        self._index: OrderedDict[str, _IndexEntry] = OrderedDict()
        self.stats = DownloaderStats()

    # --- public API ------------------------------------------------------------------------

    @property
    def max_bytes(self) -> int:
        """The size limit of one input (download or inline)."""
        return self._max_bytes

    @property
    def allowed_types(self) -> frozenset[str]:
        """The input types accepted (uploads are checked against the same list)."""
        return self._allowed

    async def fetch(self, url: str) -> Asset:
        """Download ``url`` (or reuse the cached copy) and return the stored file."""
        u = self._guard.check_url_syntax(url)
        key = str(u.with_fragment(None))
        entry = self._index.get(key)
        now = self._clock()
        if entry is not None and now - entry.stored_at <= self._cache_ttl:
            # Touching (existence check + mtime for prune) at most once a minute per entry keeps
            # hot cache hits free of thread hops; prune() drops the entries of what it deletes.
            if now - entry.touched_at < _TOUCH_INTERVAL or await asyncio.to_thread(
                touch, entry.asset.path
            ):
                if now - entry.touched_at >= _TOUCH_INTERVAL:
                    entry.touched_at = now
                self._index.move_to_end(key)
                self.stats.cache_hits += 1
                log.debug("input %s: cached copy (%d bytes)", redact_url(u), entry.asset.size)
                return entry.asset
            self._index.pop(key, None)
        # No await between looking up and registering the task: that is what makes
        # concurrent fetches of one URL share a single download.
        task = self._inflight.get(key)
        shared = task is not None
        if task is None:
            # Several jobs may wait for this download: its own lines name none of them.
            task = asyncio.create_task(
                self._download(key, u), name=f"download {redact_url(u)}", context=detached()
            )
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._download_done, key))
        else:
            self.stats.coalesced += 1
        # shield: one waiter giving up (job cancelled) must not abort the others' download.
        asset = await asyncio.shield(task)
        log.debug(
            "input %s: %s (%d bytes, %s)",
            redact_url(u),
            "fetched (download shared with another job)" if shared else "fetched",
            asset.size,
            asset.mime,
        )
        return asset

    async def decode(self, data: str) -> Asset:
        """Store a base64 string or a data: URI after the same size and type checks."""
        if not isinstance(data, str):
            raise InputError("inline data must be a string")
        # One thread hop does the blocking work: decode, sniff, hash, and look for the file.
        raw, mime, sha, exists = await asyncio.to_thread(
            inline_candidate, data, self._max_bytes, self.cache_dir
        )
        if not type_allowed(mime, self._allowed):
            raise InputError(
                f"inline data is {mime}, which is not an accepted input type "
                "(images, video, audio, text, safetensors/GGUF models)",
                details={"mimetype": mime},
            )
        ext = extension_for(mime)
        final = self.cache_dir / f"{sha}{ext}"
        if not exists:
            tmp = self._new_partial()
            try:
                await asyncio.to_thread(write_file, tmp, raw, replace=final)
            except BaseException:
                await discard(tmp)
                raise
        return Asset(final, sha, mime, ext, len(raw))

    async def prune(self, older_than: float) -> int:
        """Delete cached files unused for ``older_than`` seconds; returns how many."""
        cutoff = time.time() - older_than
        removed = await asyncio.to_thread(prune_dir, self.cache_dir, cutoff)
        gone = set(removed)
        for key in [k for k, e in self._index.items() if e.asset.path in gone]:
            del self._index[key]
        return len(removed)

    async def close(self) -> None:
        """Abort in-flight downloads and close the HTTP session."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- downloading -----------------------------------------------------------------------

    def _download_done(self, key: str, task: asyncio.Task[Asset]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            self.stats.failures += 1

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
            )
            self._session = self._guard.session(
                connector=self._guard.connector(limit=64, limit_per_host=16),
                timeout=timeout,
                auto_decompress=False,
                headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"},
            )
        return self._session

    async def _download(self, key: str, u: URL) -> Asset:
        shown = redact_url(u)
        try:
            async with asyncio.timeout(self._total_timeout):
                return await self._follow(key, u)
        except InputError:
            raise
        except TimeoutError:
            raise InputError(f"download of {shown} timed out") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            raise InputError(f"download of {shown} failed: cannot connect ({reason})") from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            raise InputError(f"download of {shown} failed: the connection broke") from None
        except aiohttp.ClientError as exc:
            # aiohttp's messages often repeat the full URL, so only the error class is shown.
            raise InputError(f"download of {shown} failed ({type(exc).__name__})") from None

    async def _follow(self, key: str, start: URL) -> Asset:
        entry = self._index.get(key)
        validators: dict[str, str] = {}
        if entry is not None and await asyncio.to_thread(touch, entry.asset.path):
            if entry.etag:
                validators["If-None-Match"] = entry.etag
            if entry.last_modified:
                validators["If-Modified-Since"] = entry.last_modified
        session = self._get_session()
        current, seen, hops = start, {str(start)}, 0
        while True:
            async with session.get(current, headers=validators, allow_redirects=False) as resp:
                if resp.status in _REDIRECT_CODES:
                    current = self._next_hop(start, current, resp.headers.get("Location"))
                    hops += 1
                    if hops > self._max_redirects:
                        raise InputError(
                            f"download of {redact_url(start)} followed more than "
                            f"{self._max_redirects} redirects"
                        )
                    if str(current) in seen:
                        raise InputError(f"download of {redact_url(start)}: redirect loop")
                    seen.add(str(current))
                    continue
                if resp.status == 304 and entry is not None and validators:
                    entry.stored_at = entry.touched_at = self._clock()
                    self._remember(key, entry)
                    self.stats.revalidated += 1
                    return entry.asset
                if resp.status != 200:
                    raise InputError(
                        f"download of {redact_url(current)} failed: HTTP {resp.status}",
                        details={"status": resp.status},
                    )
                asset = await self._store(resp, redact_url(current))
                self.stats.downloads += 1
                self._remember(
                    key,
                    _IndexEntry(
                        asset,
                        self._clock(),
                        etag=resp.headers.get("ETag"),
                        last_modified=resp.headers.get("Last-Modified"),
                        touched_at=self._clock(),
                    ),
                )
                return asset

    def _next_hop(self, start: URL, current: URL, location: str | None) -> URL:
        if not location:
            raise InputError(f"{redact_url(current)} redirected without a Location header")
        try:
            target = current.join(URL(location))
        except (ValueError, TypeError):
            raise InputError(f"{redact_url(current)} redirected to an invalid URL") from None
        try:
            return self._guard.check_url_syntax(target)
        except InputError as exc:
            raise type(exc)(
                f"download of {redact_url(start)}: redirect refused: {exc.message}"
            ) from None

    async def _store(self, resp: aiohttp.ClientResponse, shown: str) -> Asset:
        declared = resp.content_length
        if declared is not None and declared > self._max_bytes:
            raise InputError(f"{shown} is {declared} bytes, over the {self._max_bytes} byte limit")
        tmp = self._new_partial()
        digest = hashlib.sha256()
        size, mime = 0, ""
        head = bytearray()
        try:
            # One thread hop per MiB writes and hashes it (the first also opens the file).
            async with BatchedWriter(tmp, batch=_WRITE_BATCH, digest=digest) as f:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise InputError(f"{shown} is over the {self._max_bytes} byte limit")
                    if not mime:
                        head += chunk
                        if len(head) >= SNIFF_BYTES:
                            mime = await self._check_type(bytes(head[:SNIFF_BYTES]), shown)
                            head = bytearray()
                    await f.write(chunk)
            if size == 0:
                raise InputError(f"{shown} returned an empty body")
            if not mime:
                mime = await self._check_type(bytes(head), shown)
            self.stats.bytes_downloaded += size
            sha = digest.hexdigest()
            ext = extension_for(mime)
            final = self.cache_dir / f"{sha}{ext}"
            # Atomic: a concurrent writer of the same content replaces identical bytes.
            await asyncio.to_thread(os.replace, tmp, final)
        except BaseException:
            await discard(tmp)
            raise
        return Asset(final, sha, mime, ext, size)

    async def _check_type(self, head: bytes, shown: str) -> str:
        mime = await asyncio.to_thread(sniff_type, head)
        if not type_allowed(mime, self._allowed):
            raise InputError(
                f"{shown} is {mime}, which is not an accepted input type "
                "(images, video, audio, text, safetensors/GGUF models)",
                details={"mimetype": mime},
            )
        return mime

    def _new_partial(self) -> Path:
        """A fresh name in the partial-downloads folder (the write's first hop creates it)."""
        return self.cache_dir / PARTIAL_DIR / f"{uuid.uuid4().hex}.part"

    def _remember(self, key: str, entry: _IndexEntry) -> None:
        self._index[key] = entry
        self._index.move_to_end(key)
        while len(self._index) > self._index_size:
            self._index.popitem(last=False)
