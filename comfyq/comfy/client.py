"""Async client for one ComfyUI server: submit prompts, follow them to their outcome, move files.

How a prompt is followed: ``submit`` registers a watch for our own prompt id *before* posting, so
no message is lost however fast ComfyUI runs it. ``follow`` reads the watch and, whenever messages
may have been missed (socket down or reconnected, socket quiet for ``ws_quiet_timeout``), asks
``GET /queue`` and ``GET /history/{id}``: done means the outcome comes from history, pending or
running means keep waiting, and neither (twice) means ComfyUI lost it (``PromptLost``). While
ComfyUI does not answer, it keeps trying with backoff; the caller's deadline bounds the wait.

Newer ComfyUI (0.38+) adds a jobs API and an atomic cancel route; ``probe`` finds out which
routes a server has (``capabilities.py``), and ``locate``/``cancel`` use them where present. The
probe is repeated after the websocket came back, since ComfyUI may have restarted as another
version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from comfyq.comfy import capabilities as caps
from comfyq.comfy.capabilities import Capabilities
from comfyq.comfy.feed import Item, StoredWorkflow, Watch, WsFeed
from comfyq.comfy.follow import Follower, Location
from comfyq.comfy.jobsapi import GONE, cancel_job, locate_job
from comfyq.comfy.protocol import (
    LiveEvent,
    RunResult,
    SubmitResult,
    canonical_prompt_id,
    queue_ids,
    run_result_from_history,
)
from comfyq.comfy.rejection import validation_error
from comfyq.comfy.transfer import download_then, upload_file
from comfyq.errors import ComfyUIUnreachable
from comfyq.netguard import redact_url

T = TypeVar("T")

_JSON = {"Content-Type": "application/json"}
_FIXED_PATHS = ("/prompt", "/queue", "/system_stats", "/free", "/interrupt")

_log = logging.getLogger("comfyq.comfy.client")


class ComfyClient:
    """One ComfyUI server: HTTP calls plus a long-lived websocket shared by every prompt."""

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout: float = 30.0,
        ws_quiet_timeout: float = 30.0,
        poll_interval: float = 1.0,
        reconnect_min: float = 0.2,
        reconnect_max: float = 10.0,
        ws_heartbeat: float | None = 20.0,
        preview_metadata: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.display_url = redact_url(self.base_url)
        self.client_id = client_id or uuid.uuid4().hex
        self.request_timeout = request_timeout
        self.ws_quiet_timeout = ws_quiet_timeout
        self.poll_interval = poll_interval
        self.reconnect_max = reconnect_max
        self._log = logger or _log
        self._session = session
        self._own_session = session is None
        ws_base = URL(self.base_url)
        ws_base = ws_base.with_scheme("wss" if ws_base.scheme == "https" else "ws")
        ws_url = str(
            ws_base.with_path(ws_base.path.rstrip("/") + "/ws").with_query(clientId=self.client_id)
        )
        self._feed = WsFeed(
            self._get_session,
            ws_url,
            connect_timeout=request_timeout,
            heartbeat=ws_heartbeat,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
            logger=self._log,
            label=self.display_url,
            preview_metadata=preview_metadata,
        )
        # Built once per client, not per request: the default timeout and the URLs of the fixed
        # routes (aiohttp would parse a string URL on every call).
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._urls = {p: URL(self.base_url + p) for p in _FIXED_PATHS}
        self._view = URL(self.base_url + "/view")
        self._caps: Capabilities | None = None
        self._caps_epoch = -1  # the feed's ``connects`` when the probe started
        self._probing: asyncio.Task[Capabilities] | None = None

    # --- lifecycle and state ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the websocket (feature_flags handshake) and keep it up in the background."""
        self._get_session()
        await self._feed.start(wait=self.request_timeout)

    async def close(self) -> None:
        """Close the websocket and, if this client created it, the HTTP session."""
        await self._feed.close()
        if self._probing is not None and not self._probing.done():
            self._probing.cancel()
            with contextlib.suppress(BaseException):
                await self._probing
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
        """This client's logger (a backend's adapter names the backend)."""
        return self._log

    @property
    def ws_connected(self) -> bool:
        return self._feed.connected

    @property
    def ws_error(self) -> str | None:
        return self._feed.last_error

    @property
    def queue_remaining(self) -> int | None:
        """Running plus pending prompts, as of ComfyUI's last ``status`` message."""
        return self._feed.queue_remaining

    @property
    def on_preview(self) -> Callable[[LiveEvent], None] | None:
        """Called for every preview image (types 1 and 4) and progress text (type 3).

        ``prompt_id`` is None for a TEXT frame while none of our prompts runs (ComfyUI
        broadcasts those to every socket). Followers also get these via ``on_event``.
        """
        return self._feed.on_preview

    @on_preview.setter
    def on_preview(self, callback: Callable[[LiveEvent], None] | None) -> None:
        self._feed.on_preview = callback

    @property
    def on_ws_state(self) -> Callable[[bool], None] | None:
        """Called with True/False when the websocket comes up or goes down."""
        return self._feed.on_state

    @on_ws_state.setter
    def on_ws_state(self, callback: Callable[[bool], None] | None) -> None:
        self._feed.on_state = callback

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "comfyq"})
            self._own_session = True
        return self._session

    def url(self, path: str) -> str:
        return self.base_url + path

    # --- plain HTTP ------------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> tuple[int, str, bytes]:
        """(status, content type, body); network failures become ComfyUIUnreachable."""
        kwargs: dict[str, Any] = {}
        if json is not None:
            kwargs["data"] = msgspec.json.encode(json)
            kwargs["headers"] = _JSON
        t = self._timeout if not timeout else aiohttp.ClientTimeout(total=timeout)
        url = self._urls.get(path) or self.url(path)
        try:
            async with self._get_session().request(method, url, timeout=t, **kwargs) as resp:
                return resp.status, resp.content_type, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ComfyUIUnreachable(
                f"ComfyUI at {self.display_url} did not answer {method} {path}: {reason}",
                details={"backend": self.display_url},
            ) from exc

    async def _get_json(self, path: str, timeout: float | None = None) -> Any:
        status, _, body = await self._request("GET", path, timeout=timeout)
        if status != 200:
            raise self._http_error("GET", path, status, body)
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ComfyUIUnreachable(
                f"ComfyUI at {self.display_url} sent invalid JSON for GET {path}",
                details={"backend": self.display_url, "body": body[:200].decode(errors="replace")},
            ) from exc

    def _http_error(self, method: str, path: str, status: int, body: bytes) -> ComfyUIUnreachable:
        text = body[:500].decode(errors="replace")
        return ComfyUIUnreachable(
            f"ComfyUI at {self.display_url} answered {method} {path} with HTTP {status}",
            details={"backend": self.display_url, "status": status, "body": text},
        )

    async def system_stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """``GET /system_stats``; raises ComfyUIUnreachable."""
        body = await self._get_json("/system_stats", timeout)
        if not isinstance(body, dict):
            raise ComfyUIUnreachable(f"unexpected /system_stats answer from {self.display_url}")
        return body

    # --- capabilities --------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities | None:
        """What the last probe found (None before the first one)."""
        return self._caps

    @property
    def capabilities_stale(self) -> bool:
        """True until probed, and again once the websocket came back (ComfyUI may have
        restarted)."""
        return self._caps is None or self._caps_epoch != self._feed.connects

    def invalidate_capabilities(self) -> None:
        """Probe again before the next use (ComfyUI did not answer, or a route went missing)."""
        self._caps_epoch = -1

    async def ensure_capabilities(self) -> Capabilities:
        """The capabilities, probed first if stale; raises ComfyUIUnreachable."""
        if not self.capabilities_stale and self._caps is not None:
            return self._caps
        return await self.probe()

    async def probe(self, stats: dict[str, Any] | None = None) -> Capabilities:
        """Ask ComfyUI what it can do (``stats``: a ``/system_stats`` answer already in hand).

        Concurrent callers share one probe. Raises ComfyUIUnreachable if ComfyUI does not answer.
        """
        task = self._probing
        if task is None or task.done():
            task = self._probing = asyncio.create_task(self._probe(stats))
        return await asyncio.shield(task)

    async def _probe(self, stats: dict[str, Any] | None) -> Capabilities:
        # Probed before the socket ever came up (the pool starts both at once): its first
        # connection reaches this same server, so only later ones call for another probe.
        epoch = self._feed.connects or 1
        if stats is None:
            stats = await self.system_stats()
        found = await caps.probe(self._request, stats)
        old, self._caps, self._caps_epoch = self._caps, found, epoch
        if old is None or (old.version, old.names()) != (found.version, found.names()):
            self._log.info("backend %s: %s", self.display_url, found.describe())
        return found

    async def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids in ComfyUI's queue: (running, pending in run order)."""
        body = await self._get_json("/queue")
        return queue_ids(body if isinstance(body, dict) else {})

    async def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        """``GET /history/{id}`` entry, or None while pending/running/unknown."""
        body = await self._get_json(f"/history/{quote(prompt_id, safe='')}")
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def locate(self, prompt_id: str) -> tuple[Location, dict[str, Any] | None]:
        """Where ComfyUI has the prompt; the history entry (or its jobs-API equal) when done."""
        if (await self.ensure_capabilities()).jobs_api:
            found = await locate_job(self._request, self._http_error, prompt_id)
            if found == GONE:  # ComfyUI restarted as an older version
                self.invalidate_capabilities()
            elif isinstance(found, tuple):
                return found
        # Queue first: a prompt that leaves the queue is already in history (ComfyUI moves it
        # under one lock), so this order cannot miss a prompt that finishes in between.
        running, pending = await self.queue()
        if prompt_id in running:
            return "running", None
        if prompt_id in pending:
            return "pending", None
        entry = await self.history_entry(prompt_id)
        return ("done", entry) if entry is not None else ("unknown", None)

    async def result_from_history(self, entry: dict[str, Any]) -> RunResult:
        """RunResult of a history entry, or raise NodeError / Interrupted."""
        prompt = entry.get("prompt")
        pid = prompt[1] if isinstance(prompt, list) and len(prompt) > 1 else ""
        return run_result_from_history(str(pid), entry)

    async def free(self, *, unload_models: bool = False, free_memory: bool = True) -> None:
        """``POST /free``: ask ComfyUI to release memory (after an out-of-memory error)."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        status, _, text = await self._request("POST", "/free", json=body)
        if status != 200:
            raise self._http_error("POST", "/free", status, text)

    # --- prompts ----------------------------------------------------------------------------------

    def watch(
        self, prompt_id: str, workflow: dict[str, Any] | StoredWorkflow | None = None
    ) -> None:
        """Start buffering websocket messages of ``prompt_id`` (submit does this itself)."""
        self._feed.watch(prompt_id, workflow)

    def forget(self, prompt_id: str) -> None:
        """Stop buffering messages of ``prompt_id`` (follow does this when it returns)."""
        self._feed.forget(prompt_id)

    async def submit(
        self,
        workflow: dict[str, Any] | StoredWorkflow,
        prompt_id: str,
        *,
        extra_data: dict[str, Any] | None = None,
    ) -> SubmitResult:
        """``POST /prompt`` with our prompt id and client id; 400 raises ValidationError.

        ComfyUIUnreachable after the request went out (timeout, connection cut) does not prove
        that ComfyUI refused it: ``locate(prompt_id)`` before submitting the same job again.
        Use a fresh prompt id per attempt, so an old history entry is never mistaken for it.
        The id must be a UUID; it is sent (and returned) in canonical lowercase form, the only
        form newer ComfyUI accepts. A rejection of either generation maps to the same
        ValidationError (``rejection.py``).

        A ``StoredWorkflow`` is sent as the JSON text it holds, spliced into the body unchanged
        (the same document as its decoded dict would encode to), and is never decoded whole.
        """
        prompt_id = canonical_prompt_id(prompt_id)
        body: dict[str, Any] = {
            "prompt": workflow.raw if isinstance(workflow, StoredWorkflow) else workflow,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
        }
        if extra_data:
            body["extra_data"] = extra_data
        watch = self._feed.watch(prompt_id, workflow)
        try:
            status, ctype, raw = await self._request("POST", "/prompt", json=body)
            answer = self._decode_answer(raw) if ctype == "application/json" else None
            if status == 200 and isinstance(answer, dict):
                return self._accepted(answer, prompt_id, workflow, watch)
            if status in (400, 413, 422):
                raise validation_error(status, answer, raw, workflow)
            raise self._http_error("POST", "/prompt", status, raw)
        except BaseException:
            self._feed.forget(prompt_id, watch)
            raise

    @staticmethod
    def _decode_answer(raw: bytes) -> Any:
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return None

    def _accepted(
        self,
        answer: dict[str, Any],
        prompt_id: str,
        workflow: dict[str, Any] | StoredWorkflow,
        watch: Watch,
    ) -> SubmitResult:
        got = answer.get("prompt_id")
        if isinstance(got, str) and got != prompt_id:
            # ComfyUI before client-supplied ids (< 0.3.4x) picks its own; follow that one.
            self._log.warning(
                "ComfyUI at %s ignored prompt_id %s and used %s", self.display_url, prompt_id, got
            )
            self._feed.forget(prompt_id, watch)
            self._feed.watch(got, workflow).gap = True
            prompt_id = got
        number = answer.get("number")
        node_errors = answer.get("node_errors")
        self._log.debug(
            "ComfyUI at %s queued prompt %s (number %s)", self.display_url, prompt_id, number
        )
        return SubmitResult(
            prompt_id=prompt_id,
            number=float(number) if isinstance(number, (int, float)) else math.nan,
            node_errors=node_errors if isinstance(node_errors, dict) else {},
        )

    async def cancel(self, prompt_id: str) -> None:
        """Remove the prompt if pending and interrupt it if running (never anything else).

        Where ComfyUI has ``POST /api/jobs/{id}/cancel`` that is one atomic call: it interrupts the
        running prompt only while it is still this one, or dequeues it. Otherwise ``/queue delete``
        then a targeted ``/interrupt``, which leaves ComfyUI's check-then-interrupt race open.
        """
        watch = self._feed.watches.get(prompt_id)
        if watch is not None:
            watch.cancelled = True
        done = False
        if (await self.ensure_capabilities()).atomic_cancel:
            acted = await cancel_job(self._request, self._http_error, prompt_id)
            if acted == GONE:  # ComfyUI restarted as a version without the route
                self.invalidate_capabilities()
            else:
                done = True
                self._log.debug(
                    "ComfyUI at %s: cancel of %s %s",
                    self.display_url,
                    prompt_id,
                    "took effect" if acted else "found nothing to stop (finished or unknown)",
                )
        if not done:
            # Delete before interrupt: a prompt that starts in between is still caught by the
            # targeted interrupt, while the other order could miss it.
            for path, body in (
                ("/queue", {"delete": [prompt_id]}),
                ("/interrupt", {"prompt_id": prompt_id}),
            ):
                status, _, raw = await self._request("POST", path, json=body)
                if status != 200:
                    raise self._http_error("POST", path, status, raw)
        if watch is not None:
            watch.push(Item("poke"))

    async def follow(
        self,
        prompt_id: str,
        *,
        workflow: dict[str, Any] | StoredWorkflow | None = None,
        on_event: Callable[[LiveEvent], None] | None = None,
    ) -> RunResult:
        """Wait for the prompt's outcome; raises NodeError, Interrupted or PromptLost.

        Messages that arrived since ``submit`` (or ``watch``) are read first, so calling this
        late loses nothing; a prompt never watched is looked up in queue and history at once.
        One follower per prompt. Interrupted after our own ``cancel`` may also mean "deleted
        from the queue before it ran" (``details["deleted_from_queue"]``).
        """
        fresh = prompt_id not in self._feed.watches
        watch = self._feed.watch(prompt_id, workflow)
        try:
            return await Follower(self, watch, on_event).run(check_now=fresh or watch.gap)
        finally:
            self._feed.forget(prompt_id, watch)

    # --- files --------------------------------------------------------------------------------

    async def upload(
        self,
        data: bytes | Path,
        name: str,
        *,
        subfolder: str = "",
        type: str = "input",
        overwrite: bool = True,
        mask: bool = False,
        original_ref: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /upload/image`` (or ``/upload/mask``); returns {"name", "subfolder", "type"}."""
        stored = await upload_file(
            self._get_session(),
            self.base_url,
            self.display_url,
            data,
            name,
            subfolder=subfolder,
            type=type,
            overwrite=overwrite,
            mask=mask,
            original_ref=original_ref,
            timeout=self.request_timeout,
        )
        self._log.debug("uploaded %s to ComfyUI at %s", name, self.display_url)
        return stored

    def view_url(self, filename: str, subfolder: str, type: str) -> str:
        """The ``/view`` URL of an output file."""
        return str(self._view_url(filename, subfolder, type))

    def _view_url(self, filename: str, subfolder: str, type: str) -> URL:
        return self._view.with_query(filename=filename, subfolder=subfolder, type=type)

    async def download(self, filename: str, subfolder: str, type: str, dest: Path) -> int:
        """Stream ``/view`` into ``dest`` (via ``dest.part``); returns bytes; 404 -> OutputError."""
        size, _ = await self.download_then(filename, subfolder, type, dest, None)
        return size

    async def download_then(
        self,
        filename: str,
        subfolder: str,
        type: str,
        dest: Path,
        after: Callable[[Path, bytes | None], T] | None,
    ) -> tuple[int, T | None]:
        """:meth:`download`, then ``after(dest, data)`` in the thread that wrote the file
        (``data``: the content, when the file was small enough to be read whole; else None)."""
        label = f"{subfolder}/{filename}".lstrip("/") + f" ({type})"
        size, value = await download_then(
            self._get_session(),
            self._view_url(filename, subfolder, type),
            self.display_url,
            label,
            dest,
            timeout=self.request_timeout,
            after=after,
        )
        self._log.debug(
            "fetched output %s from ComfyUI at %s (%d bytes)", label, self.display_url, size
        )
        return size, value
