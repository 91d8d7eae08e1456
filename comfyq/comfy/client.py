"""Async client for one ComfyUI server: submit prompts, follow them to their outcome, move files.

How a prompt is followed: ``submit`` registers a watch for our own prompt id *before* posting, so
no message is lost however fast ComfyUI runs it. ``follow`` reads the watch and, whenever messages
may have been missed (socket down or reconnected, socket quiet for ``ws_quiet_timeout``), asks
``GET /queue`` and ``GET /history/{id}``: done means the outcome comes from history, pending or
running means keep waiting, and neither (twice) means ComfyUI lost it (``PromptLost``). While
ComfyUI does not answer, it keeps trying with backoff; the caller's deadline bounds the wait.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from comfyq.comfy.feed import Item, Watch, WsFeed
from comfyq.comfy.follow import Follower, Location
from comfyq.comfy.protocol import (
    LiveEvent,
    RunResult,
    SubmitResult,
    queue_ids,
    run_result_from_history,
)
from comfyq.comfy.transfer import download_file, upload_file
from comfyq.errors import ComfyUIUnreachable, ValidationError

_log = logging.getLogger("comfyq.comfy.client")


def redact_url(url: str) -> str:
    """``url`` without user:password, for logs and /health."""
    u = URL(url)
    return str(u.with_user(None)) if u.user or u.password else url


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

    # --- lifecycle and state ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the websocket (feature_flags handshake) and keep it up in the background."""
        self._get_session()
        await self._feed.start(wait=self.request_timeout)

    async def close(self) -> None:
        """Close the websocket and, if this client created it, the HTTP session."""
        await self._feed.close()
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
            kwargs["headers"] = {"Content-Type": "application/json"}
        t = aiohttp.ClientTimeout(total=timeout or self.request_timeout)
        try:
            async with self._get_session().request(
                method, self.url(path), timeout=t, **kwargs
            ) as resp:
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
        """Where ComfyUI has the prompt; the history entry when it is done."""
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

    def watch(self, prompt_id: str, workflow: dict[str, Any] | None = None) -> None:
        """Start buffering websocket messages of ``prompt_id`` (submit does this itself)."""
        self._feed.watch(prompt_id, workflow)

    def forget(self, prompt_id: str) -> None:
        """Stop buffering messages of ``prompt_id`` (follow does this when it returns)."""
        self._feed.forget(prompt_id)

    async def submit(
        self, workflow: dict[str, Any], prompt_id: str, *, extra_data: dict[str, Any] | None = None
    ) -> SubmitResult:
        """``POST /prompt`` with our prompt id and client id; 400 raises ValidationError.

        ComfyUIUnreachable after the request went out (timeout, connection cut) does not prove
        that ComfyUI refused it: ``locate(prompt_id)`` before submitting the same job again.
        Use a fresh prompt id per attempt, so an old history entry is never mistaken for it.
        """
        body: dict[str, Any] = {
            "prompt": workflow,
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
                raise self._rejected(status, answer, raw)
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
        self, answer: dict[str, Any], prompt_id: str, workflow: dict[str, Any], watch: Watch
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

    def _rejected(self, status: int, answer: Any, raw: bytes) -> ValidationError:
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            error = answer["error"]
            message = str(error.get("message") or "ComfyUI rejected the workflow")
            details = {"error": error, "node_errors": answer.get("node_errors") or {}}
            return ValidationError(message, details=details)
        text = raw[:2000].decode(errors="replace")
        return ValidationError(
            f"ComfyUI rejected the workflow (HTTP {status})",
            details={"status": status, "body": text},
        )

    async def cancel(self, prompt_id: str) -> None:
        """Remove the prompt if pending and interrupt it if running (never anything else)."""
        watch = self._feed.watches.get(prompt_id)
        if watch is not None:
            watch.cancelled = True
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
        workflow: dict[str, Any] | None = None,
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
        return str(
            URL(self.url("/view")).with_query(filename=filename, subfolder=subfolder, type=type)
        )

    async def download(self, filename: str, subfolder: str, type: str, dest: Path) -> int:
        """Stream ``/view`` into ``dest`` (via ``dest.part``); returns bytes; 404 -> OutputError."""
        label = f"{subfolder}/{filename}".lstrip("/") + f" ({type})"
        size = await download_file(
            self._get_session(),
            self.view_url(filename, subfolder, type),
            self.display_url,
            label,
            dest,
            timeout=self.request_timeout,
        )
        self._log.debug(
            "fetched output %s from ComfyUI at %s (%d bytes)", label, self.display_url, size
        )
        return size
