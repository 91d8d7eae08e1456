"""The long-lived ComfyUI websocket: reconnects with backoff, routes messages to per-prompt watches.

ComfyUI sends a prompt's execution messages only to the socket whose clientId equals the prompt's
``client_id``, and drops them when that socket is not connected (they are never replayed). So one
socket per ComfyClient stays open, and every message is put into the watch of its prompt, where it
waits until ``follow()`` reads it. Watches tell their reader when the socket went down or came back,
because messages may have been lost in between and the reader must then ask ``/history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
import msgspec

from comfyq.comfy.protocol import (
    TERMINAL_TYPES,
    Executing,
    LiveEvent,
    Preview,
    ProtocolError,
    Status,
    Text,
    WsMessage,
    parse_binary_frame,
    parse_text_frame,
)

# Progress and preview items a watch keeps while nobody reads it; the rest (executed, terminal
# messages) is never dropped, so a slow reader loses ticks, not outcomes.
MAX_DROPPABLE = 2000
_DROPPABLE_TYPES = frozenset({"progress", "progress_state", "preview", "text"})

FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}

# Node ids typed with a constraint stay out of msgspec's cache of dict keys (see
# comfyq.store.model): a large workflow's ids would keep heap arenas pinned after it was freed.
_NodeId = Annotated[str, msgspec.Meta(max_length=1 << 30)]


class _ClassType(msgspec.Struct, gc=False):
    """A node read for its class_type alone: its inputs are skipped, never built."""

    class_type: Any = None


_decode_types = msgspec.json.Decoder(dict[_NodeId, _ClassType]).decode
_decode_members = msgspec.json.Decoder(dict[_NodeId, msgspec.Raw]).decode


class StoredWorkflow(Mapping[str, Any]):
    """A workflow (a JSON object) kept as the JSON text it was stored as, never decoded whole:
    ``submit`` splices ``raw`` into its ``POST /prompt`` body; a watch asks ``node_type``, built
    on first use into a map of node id to class_type; a rejection naming a node reads that node
    alone (``self[node_id]``). A 5,000-node workflow decoded whole is ~35k objects and 3.5 MB,
    whose freeing left the heap fragmented (issue 19)."""

    __slots__ = ("_types", "raw")

    def __init__(self, raw: msgspec.Raw | bytes) -> None:
        self.raw = raw if isinstance(raw, msgspec.Raw) else msgspec.Raw(raw)
        self._types: dict[str, str] | None = None

    def __getitem__(self, node_id: str) -> Any:
        """The node's whole value, read from the text without building any other node."""
        try:
            one = msgspec.defstruct("_Node", [("v", Any, msgspec.UNSET)], rename={"v": node_id})
        except ValueError:  # an id msgspec cannot name a field by (a quote, a backslash)
            member = _decode_members(self.raw).get(node_id)
            if member is None:
                raise KeyError(node_id) from None
            return msgspec.json.decode(member)
        value = getattr(msgspec.json.decode(self.raw, type=one), "v")  # noqa: B009
        if value is msgspec.UNSET:
            raise KeyError(node_id)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(_decode_members(self.raw))

    def __len__(self) -> int:
        return len(_decode_members(self.raw))

    def __bool__(self) -> bool:
        view = memoryview(self.raw)
        return len(view) > 16 or b"".join(bytes(view).split()) not in (b"{}", b"")

    def node_type(self, node_id: str) -> str | None:
        """The class_type of ``node_id`` (None when absent or not a string)."""
        types = self._types
        if types is None:
            types = self._types = _node_types(self.raw)
        return types.get(node_id)


def _node_types(raw: msgspec.Raw) -> dict[str, str]:
    try:
        nodes: dict[str, Any] = {k: n.class_type for k, n in _decode_types(raw).items()}
    except msgspec.ValidationError:  # a node that is not an object: read them whole
        whole = msgspec.json.decode(raw)
        if not isinstance(whole, dict):
            return {}
        nodes = {k: n.get("class_type") if isinstance(n, dict) else None for k, n in whole.items()}
    names: dict[str, str] = {}  # one string per class, not one per node
    return {k: names.setdefault(v, v) for k, v in nodes.items() if isinstance(v, str)}


@dataclass(slots=True)
class Item:
    """One thing a watch hands its reader: a message, a preview/text event, or a socket change."""

    kind: str  # "msg" | "event" | "ws_down" | "ws_up" | "poke"
    msg: WsMessage | None = None
    event: LiveEvent | None = None

    @property
    def droppable(self) -> bool:
        if self.kind == "event":
            return True
        return self.kind == "msg" and self.msg is not None and self.msg.type in _DROPPABLE_TYPES


class Watch:
    """Buffer of everything that arrives for one prompt until its follower reads it."""

    def __init__(
        self, prompt_id: str, workflow: dict[str, Any] | StoredWorkflow | None, gap: bool
    ) -> None:
        self.prompt_id = prompt_id
        self.workflow = workflow
        # True once messages may have been lost (socket was down while the prompt was watched).
        self.gap = gap
        self.cancelled = False
        self.dropped = 0
        self._items: deque[Item] = deque()
        self._droppable = 0
        self._waiter: asyncio.Future[None] | None = None
        # One timer per watch, moved lazily: the follower waits again after every message, each
        # time with a deadline a little later than the last. Arming and cancelling a timer per wait
        # cost more than the wait itself; this one is re-armed only when it fires early.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        # The reader's hook while it waits: takes an item as it arrives (True) instead of the
        # reader being woken for it, so a prompt's progress messages cost no task switch each.
        self.consumer: Callable[[Item], bool] | None = None

    def node_type(self, node: str | None) -> str | None:
        """The class_type of ``node`` in the workflow, if known."""
        if isinstance(self.workflow, StoredWorkflow):
            return None if node is None else self.workflow.node_type(node)
        if node is None or not self.workflow:
            return None
        spec = self.workflow.get(node)
        value = spec.get("class_type") if isinstance(spec, dict) else None
        return value if isinstance(value, str) else None

    def push(self, item: Item) -> None:
        if item.kind == "ws_down":
            self.gap = True
        # Only while the reader waits with nothing buffered: order is kept, and the reader is
        # never changed under it while it asks ComfyUI something.
        if (
            self.consumer is not None
            and self._waiter is not None
            and not self._items
            and self.consumer(item)
        ):
            return
        if item.droppable:
            if self._droppable >= MAX_DROPPABLE:
                self.dropped += 1
                return
            self._droppable += 1
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float) -> Item | None:
        """The next item, or None when ``timeout`` seconds pass first."""
        if not self._items:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + max(timeout, 0.0)
            if self._timer is None or self._timer_at > self._deadline:
                if self._timer is not None:
                    self._timer.cancel()
                self._arm(loop, self._deadline)
            self._waiter = waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._items:
                return None
        item = self._items.popleft()
        if item.droppable:
            self._droppable -= 1
        return item

    def close(self) -> None:
        """Drop the timer once nobody waits (the follower is gone)."""
        if self._timer is not None and self._waiter is None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next get() arms a timer for its own deadline
        if self._deadline <= self._timer_at:
            waiter.set_result(None)  # timed out
        else:
            self._arm(loop, self._deadline)


class WsFeed:
    """Keeps ``/ws?clientId=...`` open and routes what it receives."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        ws_url: str,
        *,
        connect_timeout: float,
        heartbeat: float | None,
        reconnect_min: float,
        reconnect_max: float,
        logger: logging.Logger,
        label: str,
        preview_metadata: bool = True,
    ) -> None:
        self._session = session
        self._preview_metadata = preview_metadata
        self._ws_url = ws_url
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._log = logger
        self._label = label
        self._task: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._first_attempt = asyncio.Event()
        self._closing = False
        self.watches: dict[str, Watch] = {}
        self.connected = False
        # Times the socket came up; a change means ComfyUI may have restarted (maybe upgraded).
        self.connects = 0
        self.last_error: str | None = None
        self.server_features: dict[str, Any] = {}
        self.queue_remaining: int | None = None
        self.on_preview: Callable[[LiveEvent], None] | None = None
        self.on_state: Callable[[bool], None] | None = None
        # The prompt ComfyUI is executing for this client: type-1 previews and type-3 texts
        # carry no prompt id, and ComfyUI runs one prompt at a time.
        self.current_prompt: str | None = None
        self.current_node: str | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, wait: float) -> None:
        """Start the connection task and wait up to ``wait`` s for the first attempt to finish."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=f"comfy-ws {self._label}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._first_attempt.wait()

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if self._ws is not None:
            await self._ws.close()
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._set_connected(False)

    async def reconnect(self) -> None:
        """Drop the current socket (the loop opens a new one); used when it seems stuck."""
        if self._ws is not None:
            await self._ws.close()

    # --- watches ------------------------------------------------------------------------------

    def watch(
        self, prompt_id: str, workflow: dict[str, Any] | StoredWorkflow | None = None
    ) -> Watch:
        """The watch of ``prompt_id``, created if needed; buffers messages until read."""
        w = self.watches.get(prompt_id)
        if w is None:
            w = self.watches[prompt_id] = Watch(prompt_id, workflow, gap=not self.connected)
        elif workflow is not None and w.workflow is None:
            w.workflow = workflow
        return w

    def forget(self, prompt_id: str, watch: Watch | None = None) -> None:
        if watch is None or self.watches.get(prompt_id) is watch:
            gone = self.watches.pop(prompt_id, None)
            if gone is not None:
                gone.close()

    def _broadcast(self, kind: str) -> None:
        for w in self.watches.values():
            w.push(Item(kind))

    def _set_connected(self, value: bool) -> None:
        if value == self.connected:
            return
        self.connected = value
        if value:
            self.connects += 1
        self._broadcast("ws_up" if value else "ws_down")
        if self.on_state is not None:
            try:
                self.on_state(value)
            except Exception:  # noqa: BLE001 - a listener bug must not kill the socket
                self._log.exception("websocket state listener failed")

    # --- connection loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._reconnect_min
        while not self._closing:
            got_message = False
            try:
                async with asyncio.timeout(self._connect_timeout):
                    ws = await self._session().ws_connect(
                        self._ws_url, heartbeat=self._heartbeat, max_msg_size=0
                    )
                self._ws = ws
                if self._preview_metadata:
                    # Must be the first message, or ComfyUI keeps sending type-1 previews.
                    await ws.send_json(FEATURE_FLAGS)
                async for msg in ws:
                    got_message = True
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self._on_text(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self._on_binary(msg.data)
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        exc = ws.exception()
                        self.last_error = f"websocket error: {exc!r}"
                        break
                else:
                    self.last_error = "websocket closed"
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - a bug here must not end reconnecting
                self._log.exception("websocket %s failed unexpectedly", self._label)
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                ws_, self._ws = self._ws, None
                if ws_ is not None and not ws_.closed:
                    await asyncio.shield(ws_.close())
                self._set_connected(False)
                self._first_attempt.set()
            if self._closing:
                break
            if got_message:
                delay = self._reconnect_min
            self._log.debug(
                "websocket %s down (%s), retry in %.2fs", self._label, self.last_error, delay
            )
            # Jitter keeps many clients from reconnecting to a restarted ComfyUI in lockstep.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._reconnect_max)

    def _on_text(self, raw: str) -> None:
        try:
            msg = parse_text_frame(raw)
        except ProtocolError as exc:
            self._log.warning("ignoring websocket frame from %s: %s", self._label, exc)
            return
        if msg.type == "status":
            if isinstance(msg.parsed, Status):
                self.queue_remaining = msg.parsed.queue_remaining
                # The first status (with sid) is sent after ComfyUI registered the socket;
                # before it, messages for our client id would still be dropped.
                if msg.parsed.sid is not None:
                    self.last_error = None
                    self._set_connected(True)
                    self._first_attempt.set()
            return
        if msg.type == "feature_flags":
            self.server_features = dict(msg.data)
            return
        pid = msg.prompt_id
        if msg.type == "execution_start":
            self.current_prompt, self.current_node = pid, None
        elif msg.type == "executing" and isinstance(msg.parsed, Executing):
            node = msg.parsed.node
            if pid is None:
                # The reconnect form: {"node": X} for the prompt running for this client.
                pid = self.current_prompt
            if node is None:
                if pid == self.current_prompt:
                    self.current_prompt = self.current_node = None
            else:
                self.current_prompt, self.current_node = pid, node
        elif msg.type in TERMINAL_TYPES and pid == self.current_prompt:
            self.current_node = None
        if pid is not None:
            w = self.watches.get(pid)
            if w is not None:
                w.push(Item("msg", msg=msg))

    def _on_binary(self, data: bytes) -> None:
        try:
            frame = parse_binary_frame(data)
        except ProtocolError as exc:
            self._log.debug("ignoring binary frame from %s: %s", self._label, exc)
            return
        if isinstance(frame, Preview):
            pid = frame.prompt_id or self.current_prompt
            node = frame.node_id or self.current_node
            ev = LiveEvent(
                "preview",
                pid,
                node=node,
                data=dict(frame.metadata or {}),
                image=frame.image,
                mime=frame.mime,
            )
        elif isinstance(frame, Text):
            # TEXT frames are broadcast; while our prompt runs, ComfyUI runs nothing else.
            pid = self.current_prompt
            ev = LiveEvent("text", pid, node=frame.node_id, data={"text": frame.text})
        else:  # pragma: no cover - parse_binary_frame returns only these two
            return
        w = self.watches.get(pid) if pid is not None else None
        if w is not None:
            ev.node_type = w.node_type(ev.node)
            w.push(Item("event", event=ev))
        if self.on_preview is not None:
            try:
                self.on_preview(ev)
            except Exception:  # noqa: BLE001 - a listener bug must not kill the socket
                self._log.exception("preview listener failed")
