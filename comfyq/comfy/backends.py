"""A pool of ComfyUI backends: health probes, slot accounting, and the BACKENDS_READY log line.

A backend is healthy while ``GET /system_stats`` answers and its websocket is up. The websocket
state is pushed by the client the moment it changes, so a backend that dies stops getting new jobs
at once, and one that comes back gets probed immediately instead of at the next probe tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from comfyq.clock import iso
from comfyq.comfy.client import ComfyClient
from comfyq.comfy.warmup import Warmup
from comfyq.errors import ComfyUIUnreachable
from comfyq.logs import SIGNAL
from comfyq.netguard import redact_url

_log = logging.getLogger("comfyq.comfy.backends")


@dataclass(eq=False)
class Backend:
    """One ComfyUI server and what the pool knows about it."""

    url: str
    client: ComfyClient
    slots: int
    http_ok: bool = False
    ws_ok: bool = False
    last_error: str | None = None
    in_flight: int = 0
    elsewhere: int = 0  # prompts other instances sharing this backend have in flight on it
    system_stats: dict[str, Any] | None = None
    require_websocket: bool = True
    # Warm-up (comfyq.comfy.warmup): cold after every (re)start until the warm-up prompt ended.
    warm: bool = True
    warming: bool = False
    warmups: int = 0
    warmup_error: str | None = None
    _last_pick: int = field(default=0, repr=False)
    _was_healthy: bool = field(default=False, repr=False)

    @property
    def reachable(self) -> bool:
        """HTTP answers and the websocket is up (warm or not)."""
        return self.http_ok and (self.ws_ok or not self.require_websocket)

    @property
    def healthy(self) -> bool:
        """Reachable and warm: takes jobs."""
        return self.reachable and self.warm

    @property
    def display_url(self) -> str:
        return redact_url(self.url)


class BackendPool:
    """Hands out backend slots to jobs and keeps every backend's health current."""

    def __init__(
        self,
        urls: list[str],
        *,
        slots_per_backend: int,
        probe_interval: float = 5.0,
        ready_timeout: float = 600.0,
        client_kwargs: dict[str, Any] | None = None,
        logger: logging.Logger | None = None,
        probe_timeout: float = 5.0,
        require_websocket: bool = True,
        client_id_for: Callable[[str], str] | None = None,
        warmup: Warmup | None = None,
    ) -> None:
        unique = list(dict.fromkeys(u.strip().rstrip("/") for u in urls if u.strip()))
        if not unique:
            raise ValueError("BackendPool needs at least one ComfyUI URL")
        if slots_per_backend < 1:
            raise ValueError("slots_per_backend must be at least 1")
        self.probe_interval = probe_interval
        self.ready_timeout = ready_timeout
        self.probe_timeout = probe_timeout
        self._log = logger or _log
        kwargs = dict(client_kwargs or {})
        kwargs.setdefault("logger", self._log)

        # A client id that stays the same across restarts lets a restarted comfyq get the messages
        # of prompts it submitted before it died (ComfyUI routes them by client id).
        def client(url: str) -> ComfyClient:
            if client_id_for:
                return ComfyClient(url, **kwargs, client_id=client_id_for(url))
            return ComfyClient(url, **kwargs)

        self._backends = [
            Backend(u, client(u), slots_per_backend, require_websocket=require_websocket)
            for u in unique
        ]
        self._by_url = {b.url: b for b in self._backends}
        self._client_kwargs = kwargs
        self._foreign: dict[str, ComfyClient] = {}
        self.warmup = warmup
        # url -> what the supervisor of that backend's process says (comfyq.comfy.supervisor)
        self.process_info: dict[str, Callable[[], dict[str, Any]]] = {}
        if warmup is not None:
            for b in self._backends:
                b.warm = False
        self._picks = itertools.count(1)
        self._wake: asyncio.Future[None] | None = None
        self._probe_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Autoscalers read these tokens from the log: exactly one of them, and only when true.
        self._ready_logged = False
        self._ready_timed_out = False
        # While held (comfyq serve holds it until its listener accepts connections), BACKENDS_READY
        # waits: a watcher that connects the moment it reads the line must not be refused.
        self._ready_held = False

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends)

    def hold_ready_line(self) -> None:
        """Keep BACKENDS_READY back until :meth:`release_ready_line`."""
        self._ready_held = True

    def release_ready_line(self) -> None:
        """Let BACKENDS_READY out (now, if every backend is already ready)."""
        self._ready_held = False
        self._maybe_announce()

    def _maybe_announce(self) -> None:
        if (
            not self._ready_held
            and not self._ready_logged
            and not self._ready_timed_out
            and not self._closed
            and all(x.healthy for x in self._backends)
        ):
            self._ready_logged = True
            self._log.info(
                "BACKENDS_READY: %d backend(s) reachable, ready to serve",
                len(self._backends),
                extra=SIGNAL,
            )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every backend's websocket and start probing; returns without waiting for them."""
        for b in self._backends:
            b.client.on_ws_state = self._ws_listener(b)
        self._tasks = [
            asyncio.create_task(self._probe_loop(), name="comfy-pool-probe"),
            asyncio.create_task(self._ready_deadline(), name="comfy-pool-ready"),
        ]
        self._tasks += [
            asyncio.create_task(b.client.start(), name=f"comfy-start {b.display_url}")
            for b in self._backends
        ]

    async def close(self) -> None:
        """Stop probing, close every client, and fail anyone still waiting for a slot."""
        self._closed = True
        self._notify()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await asyncio.gather(*(b.client.close() for b in self._backends))
        await asyncio.gather(*(c.close() for c in self._foreign.values()))
        self._foreign.clear()

    # --- slots ------------------------------------------------------------------------------------

    def get(self, url: str) -> Backend | None:
        """The backend with this URL, if configured."""
        return self._by_url.get(url.strip().rstrip("/"))

    def client_for(self, url: str) -> ComfyClient:
        """A client for ``url``: the pool's own, or (several instances: a backend another instance
        used for this job) an HTTP-only one, for lookups and downloads, never for slots."""
        url = url.strip().rstrip("/")
        b = self._by_url.get(url)
        if b is not None:
            return b.client
        client = self._foreign.get(url)
        if client is None:
            client = self._foreign[url] = ComfyClient(url, **self._client_kwargs)
        return client

    def any_healthy(self) -> bool:
        return any(b.healthy for b in self._backends)

    def _pick(self, prefer: str | None, exclude: Collection[str]) -> Backend | None:
        excluded = {u.strip().rstrip("/") for u in exclude}
        if all(b.url in excluded for b in self._backends):
            excluded = set()  # excluding everything would wait forever: treat as no preference
        free = [
            b
            for b in self._backends
            if b.healthy and b.in_flight + b.elsewhere < b.slots and b.url not in excluded
        ]
        if not free:
            return None
        preferred = self.get(prefer) if prefer else None
        if preferred is not None and preferred in free:
            return preferred
        # Least loaded first; among equals the one picked longest ago (round robin).
        return min(free, key=lambda b: (b.in_flight / b.slots, b._last_pick))

    @contextlib.asynccontextmanager
    async def slot(
        self, *, prefer: str | None = None, exclude: Collection[str] = ()
    ) -> AsyncIterator[Backend]:
        """Wait (without polling) for a healthy backend with a free slot and hold that slot."""
        while True:
            if self._closed:
                raise ComfyUIUnreachable("the backend pool is closed")
            backend = self._pick(prefer, exclude)
            if backend is not None:
                break
            await asyncio.shield(self._wake_future())
        backend.in_flight += 1
        backend._last_pick = next(self._picks)
        try:
            yield backend
        finally:
            backend.in_flight -= 1
            self._notify()

    def set_elsewhere(self, load: dict[str, int]) -> None:
        """Prompts in flight per URL on other instances sharing these backends (cluster-wide)."""
        freed = False
        for b in self._backends:
            n = load.get(b.url, 0)
            freed = freed or n < b.elsewhere
            b.elsewhere = n
        if freed:
            self._notify()

    def _wake_future(self) -> asyncio.Future[None]:
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_future()
        return self._wake

    def _notify(self) -> None:
        """Wake every waiter; they re-check (called on any change that may free a slot)."""
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        self._wake = None

    async def wait_ready(self, timeout: float) -> bool:
        """True once every backend is healthy at the same time, False after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while not all(b.healthy for b in self._backends):
                    if self._closed:
                        return False
                    await asyncio.shield(self._wake_future())
        except TimeoutError:
            return False
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-backend state for /health and /metrics (URLs without credentials)."""
        out = []
        for b in self._backends:
            system = (b.system_stats or {}).get("system") or {}
            found = b.client.capabilities
            out.append(
                {
                    "url": b.display_url,
                    "healthy": b.healthy,
                    "http_ok": b.http_ok,
                    "websocket_ok": b.ws_ok,
                    "in_flight": b.in_flight,
                    "in_flight_elsewhere": b.elsewhere,
                    "slots": b.slots,
                    "last_error": b.last_error,
                    "comfyui_version": system.get("comfyui_version"),
                    "queue_remaining": b.client.queue_remaining,
                    "capabilities": found.names() if found is not None else None,
                    "capabilities_probed_at": iso(found.probed_at) if found is not None else None,
                    "warm": b.warm,
                    "warmups": b.warmups,
                    "warmup_error": b.warmup_error,
                    "reachable": b.reachable,
                    "process": info() if (info := self.process_info.get(b.url)) else None,
                }
            )
        return out

    # --- health ---------------------------------------------------------------------------------

    def _ws_listener(self, b: Backend) -> Any:
        def changed(up: bool) -> None:
            b.ws_ok = up
            if up:
                self._probe_now.set()  # it may have restarted: confirm HTTP right away
            else:
                b.last_error = b.client.ws_error or "websocket disconnected"
            self._update(b)

        return changed

    def _update(self, b: Backend) -> None:
        if self.warmup is not None and not self._closed:
            if not b.reachable:
                b.warm = False  # it may restart: warm it again once it is back
            elif not b.warm and not b.warming:
                b.warming = True
                self._tasks.append(
                    asyncio.create_task(self._warm(b), name=f"comfy-warmup {b.display_url}")
                )
        now, was = b.healthy, b._was_healthy
        b._was_healthy = now
        if now:
            b.last_error = None
        if now != was and not self._closed:
            if now:
                self._log.info("backend %s is healthy", b.display_url)
            else:
                self._log.warning(
                    "backend %s is unhealthy: %s", b.display_url, b.last_error or "unknown reason"
                )
        if now:
            self._maybe_announce()
        self._notify()

    async def _warm(self, b: Backend) -> None:
        assert self.warmup is not None
        self._log.info("backend %s is reachable: running the warm-up workflow", b.display_url)
        try:
            b.warmup_error = await self.warmup.run(b)
        except ComfyUIUnreachable as exc:
            self._log.warning("backend %s: warm-up interrupted: %s", b.display_url, exc.message)
            b.warming = False
            self._probe_now.set()  # retried once the backend is reachable again
            return
        finally:
            self._tasks = [t for t in self._tasks if not t.done()]
        if b.warmup_error:
            self._log.error("backend %s: %s; taking jobs anyway", b.display_url, b.warmup_error)
        b.warmups += 1
        b.warming = False
        b.warm = b.reachable
        self._update(b)

    async def _probe(self, b: Backend) -> None:
        try:
            b.system_stats = await b.client.system_stats(timeout=self.probe_timeout)
            if b.client.capabilities_stale:  # first time, or the socket came back: restarted?
                await b.client.probe(b.system_stats)
            b.http_ok = True
        except ComfyUIUnreachable as exc:
            b.http_ok = False
            b.last_error = exc.message
            b.client.invalidate_capabilities()
        b.ws_ok = b.client.ws_connected
        if b.http_ok and not b.reachable:
            b.last_error = b.client.ws_error or "websocket not connected"
        self._update(b)

    async def _probe_loop(self) -> None:
        while True:
            self._probe_now.clear()
            await asyncio.gather(*(self._probe(b) for b in self._backends))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_interval):
                    await self._probe_now.wait()

    async def _ready_deadline(self) -> None:
        await asyncio.sleep(self.ready_timeout)
        if self._ready_logged or self._closed:
            return
        self._ready_timed_out = True
        n = len(self._backends)
        down = [
            f"{b.display_url} ({b.last_error or 'not ready'})"
            for b in self._backends
            if not b.healthy
        ]
        self._log.error(
            "BACKENDS_READY_TIMEOUT: %d/%d backend(s) reachable after %.0fs; not ready: %s",
            n - len(down),
            n,
            self.ready_timeout,
            ", ".join(down),
            extra=SIGNAL,
        )
