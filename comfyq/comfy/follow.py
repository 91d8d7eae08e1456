"""The state machine of one ``ComfyClient.follow`` call.

It reads the prompt's watch and decides when to ask ComfyUI directly: at once when the socket
went down or came back (messages may be lost), when the prompt has been quiet for
``ws_quiet_timeout``, and every ``poll_interval`` while the socket is down. Unreachable ComfyUI
means backoff, never a busy loop; every wait is bounded, so it never hangs without checking.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

from comfyq.comfy.feed import Item, Watch
from comfyq.comfy.protocol import (
    TERMINAL_TYPES,
    Executed,
    Executing,
    ExecutionCached,
    LiveEvent,
    Progress,
    RunResult,
    WsMessage,
    interrupted_from,
    merge_output,
    node_error_from,
    run_result_from_history,
)
from comfyq.errors import ComfyUIUnreachable, Interrupted, PromptLost

Location = Literal["pending", "running", "done", "unknown"]


class PromptSource(Protocol):
    """What a follower needs of its client (``ComfyClient`` is one); keeps follow below client."""

    display_url: str
    poll_interval: float
    reconnect_max: float
    ws_quiet_timeout: float

    @property
    def ws_connected(self) -> bool: ...

    @property
    def log(self) -> logging.Logger | logging.LoggerAdapter[logging.Logger]: ...

    async def locate(self, prompt_id: str) -> tuple[Location, dict[str, Any] | None]: ...


# Messages whose ``timestamp`` (ComfyUI's clock, epoch ms) goes into RunResult.timing.
_TIMED = {
    "execution_start": "started_at",
    "execution_success": "ended_at",
    "execution_error": "ended_at",
    "execution_interrupted": "ended_at",
}


class Follower:
    """The state of one ``follow`` call."""

    def __init__(
        self, client: PromptSource, watch: Watch, on_event: Callable[[LiveEvent], None] | None
    ) -> None:
        self.c = client
        self.w = watch
        self.pid = watch.prompt_id
        self.on_event = on_event
        self.outputs: dict[str, dict[str, Any]] = {}
        self.cached: list[str] = []
        self.messages: list[Any] = []
        self.timing: dict[str, int] = {}
        self.succeeded = False
        self.loop = asyncio.get_running_loop()
        # When the last message was taken while waiting (``consume``), and what it raised.
        self.seen_at = -math.inf
        self.failed: BaseException | None = None

    def result(self) -> RunResult:
        return RunResult(
            self.pid,
            self.outputs,
            self.cached,
            "success",
            self.messages,
            source="websocket",
            timing=self.timing,
        )

    async def run(self, *, check_now: bool) -> RunResult:
        self.w.consumer = self.consume
        try:
            return await self._run(check_now)
        finally:
            self.w.consumer = None

    async def _run(self, check_now: bool) -> RunResult:
        c, now = self.c, self.loop.time
        quiet_base = now()
        next_poll = now() if check_now else math.inf
        backoff = c.poll_interval
        while True:
            quiet_base = max(quiet_base, self.seen_at)
            if now() >= min(next_poll, quiet_base + c.ws_quiet_timeout):
                try:
                    where, entry = await self.locate_twice()
                except ComfyUIUnreachable as exc:
                    c.log.debug("following %s: %s", self.pid, exc.message)
                    next_poll = quiet_base = now() + backoff
                    backoff = min(backoff * 2, max(c.reconnect_max, c.poll_interval))
                    continue
                backoff = c.poll_interval
                quiet_base = now()
                if where == "done" and entry is not None:
                    return run_result_from_history(self.pid, entry)
                if where == "unknown":
                    if self.succeeded:  # history gone already (restart right after success)
                        return self.result()
                    if self.w.cancelled:
                        raise Interrupted(
                            "the prompt was removed from ComfyUI's queue before it ran",
                            details={"prompt_id": self.pid, "deleted_from_queue": True},
                        )
                    raise PromptLost(
                        f"ComfyUI at {c.display_url} has prompt {self.pid} neither queued "
                        "nor in its history (it probably restarted)",
                        details={"backend": c.display_url, "prompt_id": self.pid},
                    )
                if self.succeeded:  # success is sent just before ComfyUI writes history
                    next_poll = now() + min(c.poll_interval, 0.2)
                else:
                    next_poll = math.inf if c.ws_connected else now() + c.poll_interval
                continue
            item = await self.w.get(min(next_poll, quiet_base + c.ws_quiet_timeout) - now())
            if self.failed is not None:
                raise self.failed
            if item is None:
                continue
            if item.kind in ("ws_down", "ws_up", "poke"):
                next_poll = now()
                continue
            quiet_base = now()
            if item.kind == "event" and item.event is not None:
                self.emit(item.event)
            elif item.kind == "msg" and item.msg is not None:
                done = self.handle(item.msg)
                if done is not None:
                    return done
                if self.succeeded or self._ended(item.msg):
                    next_poll = now()

    async def locate_twice(self) -> tuple[str, dict[str, Any] | None]:
        """``locate``, asked again a moment later before believing "unknown"."""
        where, entry = await self.c.locate(self.pid)
        if where == "unknown" and not self.w.cancelled:
            await asyncio.sleep(min(self.c.poll_interval, 0.5))
            where, entry = await self.c.locate(self.pid)
        return where, entry

    def consume(self, item: Item) -> bool:
        """Take ``item`` as it arrives while ``run`` waits (the watch's consumer): progress,
        previews and every other message that neither ends the prompt nor calls for a look at
        ComfyUI are applied here, without waking ``run``; False leaves the item to ``run``."""
        kind = item.kind
        if kind == "msg":
            msg = item.msg
            if msg is None or msg.type in TERMINAL_TYPES or self._ended(msg):
                return False
            try:
                self.handle(msg)
            except Exception as exc:  # noqa: BLE001 - raised by run, not into the websocket
                self.failed = exc
                return False  # wakes run, which raises it
        elif kind == "event" and item.event is not None:
            self.emit(item.event)
        else:
            return False
        self.seen_at = self.loop.time()
        return True

    @staticmethod
    def _ended(msg: WsMessage) -> bool:
        return (
            msg.type == "executing"
            and isinstance(msg.parsed, Executing)
            and msg.parsed.node is None
        )

    def handle(self, msg: WsMessage) -> RunResult | None:
        """Apply one message; returns the result on success seen without gaps."""
        t, p = msg.type, msg.parsed
        stamp = getattr(p, "timestamp", None)
        if isinstance(stamp, int) and t in _TIMED:
            self.timing[_TIMED[t]] = stamp
        if t in TERMINAL_TYPES:
            self.messages.append([t, msg.data])
            if t == "execution_error":
                raise node_error_from(msg.data, self.pid)
            if t == "execution_interrupted":
                raise interrupted_from(msg.data, self.pid)
            self.succeeded = True
            # After a gap some ``executed`` messages may be missing: history is complete.
            return None if self.w.gap else self.result()
        if t == "execution_start":
            self.messages.append([t, msg.data])
        elif t == "execution_cached" and isinstance(p, ExecutionCached):
            self.messages.append([t, msg.data])
            self.cached.extend(p.nodes)
        elif t == "executed" and isinstance(p, Executed) and p.node is not None:
            merge_output(self.outputs, p.node, p.output or {})
        ev = self.event_for(msg)
        if ev is not None:
            self.emit(ev)
        return None

    def event_for(self, msg: WsMessage) -> LiveEvent | None:
        t, p, w = msg.type, msg.parsed, self.w
        if t == "executing" and isinstance(p, Executing):
            if p.node is None:
                return None
            return LiveEvent(t, self.pid, p.node, w.node_type(p.node), source=msg)
        if t == "progress" and isinstance(p, Progress):
            return LiveEvent(
                t, self.pid, p.node, w.node_type(p.node), int(p.value), int(p.max), source=msg
            )
        if t == "executed" and isinstance(p, Executed):
            return LiveEvent(t, self.pid, p.node, w.node_type(p.node), source=msg)
        if t in ("execution_start", "execution_cached", "progress_state"):
            return LiveEvent(t, self.pid, source=msg)
        return None

    def emit(self, ev: LiveEvent) -> None:
        if self.on_event is None:
            return
        if ev.node_type is None:
            ev.node_type = self.w.node_type(ev.node)
        try:
            self.on_event(ev)
        except Exception:
            self.c.log.exception("progress listener failed for prompt %s", self.pid)
