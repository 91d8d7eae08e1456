"""Runs queued prompts one at a time with ComfyUI's message sequence, caching and history."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from .env import SimEnv
from .generation import INTERMEDIATE_OUTPUT, Generation, generation, uuid4_text
from .graph import ExecList, _Unequal, is_link, signatures
from .nodedefs import NODES
from .queue import PromptQueue, QueueItem
from .types import NodeFailure, NodeSpec
from .ws import Hub, json_num, json_str, preview_frame, preview_meta_frame, text_frame

# Frames ComfyUI's tracebacks start with for a failing node (paths as recorded in the traces).
_TB_EXECUTE = [
    (
        '  File "/opt/ComfyUI/execution.py", line 496, in execute\n    output_data, output_ui, '
        "has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, "
        "input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, "
        "hidden_inputs=hidden_inputs)\n"
    ),
    (
        '  File "/opt/ComfyUI/execution.py", line 315, in get_output_data\n    return_values = '
        "await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, "
        "allow_interrupt=True, execution_block_cb=execution_block_cb, "
        "pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n"
    ),
    (
        '  File "/opt/ComfyUI/execution.py", line 289, in _async_map_node_over_list\n'
        "    await process_inputs(input_dict, i)\n"
    ),
    (
        '  File "/opt/ComfyUI/execution.py", line 277, in process_inputs\n'
        "    result = f(**inputs)\n             ^^^^^^^^^^^\n"
    ),
]


@dataclass
class Faults:
    """Fault injection switches shared by the HTTP layer, the hub and the executor."""

    stall_ws: bool = False
    reject_next: list[tuple[int, Any]] = field(default_factory=list)
    view_delay: float = 0.0
    fail_nodes: dict[str, tuple[str, str]] = field(default_factory=dict)
    # While set, a prompt taken off the queue (already "running") waits here before it executes;
    # ``held`` lists the prompt ids that reached it. Tests use it to act during that handover.
    start_gate: asyncio.Event | None = None
    held: list[str] = field(default_factory=list)
    # "METHOD /path" of the latest requests (any process of this simulator), oldest first.
    requests: deque[str] = field(default_factory=lambda: deque(maxlen=10000))


@dataclass
class Timing:
    """How long simulated nodes take and how many progress ticks slow nodes report."""

    node_duration: float = 0.0
    node_durations: dict[str, float] = field(default_factory=dict)
    progress_steps: int = 0


# Node classes with an IS_CHANGED (LoadImage...): a prompt without one skips _is_changed.
_HAS_IS_CHANGED = frozenset(n for n, spec in NODES.items() if spec.is_changed)


class _Interrupted(Exception):
    pass


def format_value(x: Any) -> Any:
    """ComfyUI's current_inputs formatting: scalars as-is, anything else as str()."""
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


class _Ctx:
    """RunContext handed to node functions while one node executes."""

    __slots__ = ("duration", "env", "ex", "extra_data", "node_id", "prompt", "prompt_id")

    def __init__(
        self,
        ex: Executor,
        node_id: str,
        prompt_id: str,
        duration: float,
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
    ) -> None:
        self.ex = ex
        self.node_id = node_id
        self.prompt_id = prompt_id
        self.duration = duration
        self.prompt = prompt
        self.extra_data = extra_data
        self.env = ex.env

    async def tick(self, value: float, maximum: float, preview_png: bytes | None = None) -> None:
        ex, nid, cid = self.ex, self.node_id, self.ex.client_id
        ex.check_interrupt()
        await ex.progress_update(nid, value, maximum)
        meta = ex.hub.supports_metadata(cid)
        if preview_png is not None and meta:
            await ex.hub.send_bytes(
                preview_meta_frame(
                    preview_png,
                    {
                        "node_id": nid,
                        "prompt_id": self.prompt_id,
                        "display_node_id": nid,
                        "parent_node_id": None,
                        "real_node_id": nid,
                    },
                ),
                cid,
            )
        await ex.hub.send_json(
            "progress",
            {"value": value, "max": maximum, "prompt_id": self.prompt_id, "node": nid},
            cid,
        )
        if preview_png is not None and not meta:
            await ex.hub.send_bytes(preview_frame(preview_png), cid)

    async def text(self, text: str) -> None:
        await self.ex.hub.send_bytes(text_frame(self.node_id, text), None)

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)


class Executor:
    """ComfyUI's prompt worker plus PromptExecutor, on the event loop."""

    def __init__(
        self,
        queue: PromptQueue,
        hub: Hub,
        env: SimEnv,
        faults: Faults,
        timing: Timing,
        gen: Generation | None = None,
    ) -> None:
        self.queue, self.hub, self.env = queue, hub, env
        self.faults, self.timing = faults, timing
        self.gen = gen or generation()
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.interrupted = False
        # Prompts cancelled through POST /api/jobs/{id}/cancel: unlike the global flag, which
        # execute() clears when a prompt starts, this one survives the pending -> running handover.
        self.cancelled: set[str] = set()
        self._sent_ui: dict[str, Any] = {}  # node -> the executed output this prompt sent
        self.out_cache: dict[Any, tuple[Any, ...]] = {}
        self.ui_cache: dict[Any, dict[str, Any]] = {}
        self._prompt_id = ""
        self._progress: dict[str, dict[str, Any]] = {}
        self._keys: dict[str, Any] = {}

    async def run_forever(self) -> None:
        """Take prompts in number order, forever."""
        while True:
            item, task_id = await self.queue.get()
            gate = self.faults.start_gate
            if gate is not None:
                self.faults.held.append(item[1])
                await gate.wait()
            outputs, meta, status = await self.execute(item)
            await self.queue.task_done(task_id, outputs, meta, status)
            if self.client_id is not None:
                rest = self.hub.post(executing_text(None, item[1]), self.client_id)
                if rest is not None:
                    await rest
            if self.gen.assets:  # the asset scanner runs after prompts and tells everyone
                await self._asset_scan()
            self.apply_flags()
            if self.queue.heap:  # else get() waits anyway: no extra turn of the loop
                await asyncio.sleep(0)  # let HTTP handlers in between back-to-back prompts

    def apply_flags(self) -> None:
        """POST /free {"free_memory": true} empties the node cache once nothing runs."""
        flags, self.queue.flags = self.queue.flags, {}
        if flags.get("free_memory"):
            self.out_cache.clear()
            self.ui_cache.clear()

    def check_interrupt(self) -> None:
        """Raise if /interrupt was called (checked at node start and at progress ticks)."""
        if self.interrupted or self._prompt_id in self.cancelled:
            raise _Interrupted()

    def cancel(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` only (the atomic cancel of a running job)."""
        self.cancelled.add(prompt_id)

    async def _asset_scan(self) -> None:
        for text in (_SEED_STARTED, _SEED_COMPLETED):
            rest = self.hub.post(text)
            if rest is not None:
                await rest

    def _register(self, nid: str, output: Any) -> Any:
        """An executed output as this generation sends it: newer ComfyUI adds ``metadata`` to
        file entries and, with assets on, a fresh asset ``id``/``preview_id`` per prompt."""
        if not self.gen.rich_executed or not isinstance(output, dict):
            return output
        shown: dict[str, Any] = {}
        for key, items in output.items():
            if not isinstance(items, list):
                shown[key] = items
                continue
            shown[key] = []
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    clean = {k: v for k, v in item.items() if k not in ("id", "preview_id")}
                    item = {**clean, "metadata": {}}
                    if self.gen.assets:
                        item["id"] = item["preview_id"] = uuid4_text()
                shown[key].append(item)
        self._sent_ui[nid] = shown
        return shown

    async def _progress_send(self) -> None:
        rest = self._progress_post()
        if rest is not None:
            await rest

    def _progress_post(self) -> Awaitable[None] | None:
        """Queue a progress_state message (Hub.post: what is left to await, or None)."""
        cid = self.client_id
        sockets = self.hub.sockets
        if self.faults.stall_ws or (cid not in sockets if cid is not None else not sockets):
            return None  # nobody would get it: skip building the (growing) node map
        # {"type": "progress_state", "data": {"prompt_id", "nodes": {id: {...}}}}, written
        # straight to text (the same text json.dumps gives; see progress_state_text).
        return self.hub.post(progress_state_text(self._prompt_id, self._progress), cid)

    def _entry(self, nid: str) -> dict[str, Any]:
        entry = self._progress.get(nid)
        if entry is None:
            entry = self._progress[nid] = {"state": "pending", "value": 0, "max": 1}
        return entry

    async def progress_update(self, nid: str, value: float, maximum: float) -> None:
        """A progress-bar tick of the running node."""
        entry = self._entry(nid)
        entry.update(state="running", value=value, max=maximum)
        await self._progress_send()

    async def _add_message(
        self, event: str, data: dict[str, Any], broadcast: bool, messages: list[list[Any]]
    ) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        messages.append([event, data])
        if self.client_id is not None or broadcast:
            await self.hub.send_json(event, data, self.client_id)

    async def _add_prompt_message(
        self, event: str, pid: str, messages: list[list[Any]], nodes: list[str] | None = None
    ) -> None:
        """_add_message for execution_start / _cached / _success ({["nodes",] "prompt_id",
        "timestamp"}), the text written directly (three per job; see prompt_message_text)."""
        ts = int(time.time() * 1000)
        data: dict[str, Any] = {"prompt_id": pid, "timestamp": ts}
        if nodes is not None:
            data = {"nodes": nodes, **data}
        messages.append([event, data])
        if self.client_id is not None:
            rest = self.hub.post(prompt_message_text(event, pid, ts, nodes), self.client_id)
            if rest is not None:
                await rest

    async def _is_changed(self, prompt: dict[str, Any]) -> dict[str, Any]:
        changed: dict[str, Any] = {}
        for nid, node in prompt.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            spec = NODES.get(class_type) if isinstance(class_type, str) else None
            if spec is None or spec.is_changed is None:
                continue
            try:
                inputs = node.get("inputs") or {}
                if spec.custom_validate:  # file-backed nodes hash their file: not on the loop
                    changed[nid] = await asyncio.to_thread(spec.is_changed, self.env, inputs)
                else:
                    changed[nid] = spec.is_changed(self.env, inputs)
            except Exception:  # noqa: BLE001 - ComfyUI uses NaN: never equal, never cached
                changed[nid] = _Unequal()
        return changed

    async def execute(
        self, item: QueueItem
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Run one prompt; returns (outputs, meta, status) for its history entry."""
        _, pid, prompt, extra, to_execute = item
        extra = extra if isinstance(extra, dict) else {}
        self.interrupted = False
        self._sent_ui = {}
        self.client_id = extra.get("client_id")
        self._prompt_id = pid
        self._progress = {}
        messages: list[list[Any]] = []
        await self._add_prompt_message("execution_start", pid, messages)
        # IS_CHANGED only for classes that have one (LoadImage...): none in most prompts.
        changes = any(
            isinstance(n, dict) and isinstance(n.get("class_type"), str)
            and n["class_type"] in _HAS_IS_CHANGED
            for n in prompt.values()
        )  # fmt: skip
        keys = self._keys = signatures(prompt, await self._is_changed(prompt) if changes else {})
        live = {k for k in keys.values() if not isinstance(k, _Unequal)}
        # Classic cache: only entries used by the current prompt survive.
        for cache in (self.out_cache, self.ui_cache):
            for k in [k for k in cache if k not in live]:
                del cache[k]
        suffixes = self.env.preview_suffixes
        for nid in [n for n in suffixes if n not in prompt]:
            del suffixes[nid]
        cached = [nid for nid in prompt if keys[nid] in self.out_cache]
        await self._add_prompt_message("execution_cached", pid, messages, cached)
        xlist = ExecList(prompt, lambda nid: keys.get(nid) in self.out_cache)
        for nid in to_execute:
            xlist.add_node(nid)
        executed: list[str] = []
        success = True
        while not xlist.is_empty():
            staged = xlist.stage()
            if staged is None:
                blamed = xlist.cycle_nodes()[0]
                error = {
                    "node_id": blamed,
                    "exception_message": "Dependency cycle detected",
                    "exception_type": "graph.DependencyCycleError",
                    "traceback": [],
                    "current_inputs": [],
                }
                await self._error(prompt, pid, executed, error, messages)
                success = False
                break
            nid = staged
            failure = await self._run_node(prompt, pid, extra, nid, keys[nid], executed)
            if failure is not None:
                success = False
                if failure.get("interrupted"):
                    await self._add_message(
                        "execution_interrupted",
                        {
                            "prompt_id": pid,
                            "node_id": nid,
                            "node_type": prompt[nid]["class_type"],
                            "executed": list(executed),
                        },
                        True,
                        messages,
                    )
                else:
                    await self._error(prompt, pid, executed, failure, messages)
                break
            xlist.complete(nid)
        if success:
            if cached:
                await self._reemit_intermediate(prompt, pid, cached)
            await self._add_prompt_message("execution_success", pid, messages)
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for nid in prompt:
            ui = self.ui_cache.get(keys[nid])
            if ui is not None:
                outputs[nid] = self._sent_ui.get(nid, ui["output"])
                meta[nid] = ui["meta"]
        self.last_node_id = None
        self.cancelled.discard(pid)
        status = {
            "status_str": "success" if success else "error",
            "completed": success,
            "messages": messages,
        }
        return outputs, meta, status

    async def _reemit_intermediate(
        self, prompt: dict[str, Any], pid: str, cached: list[str]
    ) -> None:
        """Newer ComfyUI: cached has_intermediate_output nodes send ``executed`` again (with the
        UI re-registered for this prompt) just before execution_success."""
        if not self.gen.rich_executed or self.client_id is None:
            return
        for nid in cached:
            if prompt[nid].get("class_type") not in INTERMEDIATE_OUTPUT:
                continue
            ui = self.ui_cache.get(self._keys.get(nid))
            if ui is None or ui.get("output") is None:
                continue
            shown = self._register(nid, ui["output"])
            await self.hub.send_json(
                "executed",
                {"node": nid, "display_node": nid, "output": shown, "prompt_id": pid},
                self.client_id,
            )

    async def _error(
        self,
        prompt: dict[str, Any],
        pid: str,
        executed: list[str],
        error: dict[str, Any],
        messages: list[list[Any]],
    ) -> None:
        nid = error["node_id"]
        await self._add_message(
            "execution_error",
            {
                "prompt_id": pid,
                "node_id": nid,
                "node_type": prompt[nid]["class_type"],
                "executed": list(executed),
                "exception_message": error["exception_message"],
                "exception_type": error["exception_type"],
                "traceback": error["traceback"],
                "current_inputs": error["current_inputs"],
                "current_outputs": list(prompt),
            },
            False,
            messages,
        )

    def _inputs(self, spec: NodeSpec, node: dict[str, Any], nid: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if is_link(value):
                out = self.out_cache.get(self._keys.get(value[0]))
                slot = int(value[1])
                values[name] = out[slot] if out is not None and slot < len(out) else None
            elif name in spec.required or name in spec.optional:
                values[name] = value
        return values

    @staticmethod
    def _shown(
        spec: NodeSpec,
        values: dict[str, Any],
        nid: str,
        prompt: dict[str, Any],
        extra: dict[str, Any],
    ) -> dict[str, list[Any]]:
        # current_inputs of execution_error; built only when a node fails.
        shown = {name: [format_value(v)] for name, v in values.items()}
        hidden = {"PROMPT": prompt, "EXTRA_PNGINFO": extra.get("extra_pnginfo"), "UNIQUE_ID": nid}
        for name, kind in spec.hidden.items():
            shown[name] = [format_value(hidden.get(kind))]
        return shown

    async def _run_node(
        self,
        prompt: dict[str, Any],
        pid: str,
        extra: dict[str, Any],
        nid: str,
        key: Any,
        executed: list[str],
    ) -> dict[str, Any] | None:
        node = prompt[nid]
        spec = NODES[node["class_type"]]
        cid = self.client_id
        if key in self.out_cache:
            ui = self.ui_cache.get(key) or {}
            shown = self._register(nid, ui.get("output"))
            if cid is not None:
                await self.hub.send_json(
                    "executed",
                    {"node": nid, "display_node": nid, "output": shown, "prompt_id": pid},
                    cid,
                )
            await self._finish(nid)
            return None
        entry = self._entry(nid)
        entry.update(state="running", value=0.0, max=1.0)
        rest = self._progress_post()
        if rest is not None:
            await rest
        values = self._inputs(spec, node, nid)
        if cid is not None:
            self.last_node_id = nid
            rest = self.hub.post(executing_text(nid, pid), cid)
            if rest is not None:
                await rest
        if self.gen.rich_executed and spec.category == "loaders":
            entry["activity"] = "loading"  # newer ComfyUI: a progress_state saying what it does
            await self._progress_send()
            del entry["activity"]
        t = self.timing
        duration = t.node_durations.get(spec.name, t.node_duration)
        ctx = _Ctx(self, nid, pid, duration, prompt, extra)
        try:
            self.check_interrupt()
            fails = self.faults.fail_nodes
            fault = (fails.get(nid) or fails.get(spec.name)) if fails else None
            if fault is not None:
                raise NodeFailure(fault[0], fault[1])
            if not spec.own_progress:
                if t.progress_steps > 0 and spec.slow:
                    for step in range(1, t.progress_steps + 1):
                        await ctx.sleep(duration / t.progress_steps)
                        await ctx.tick(step, t.progress_steps)
                elif duration > 0:
                    await asyncio.sleep(duration)
            outputs, ui_or_none = await spec.run(ctx, values)
        except _Interrupted:
            return {"interrupted": True}
        except NodeFailure as f:
            return {
                "node_id": nid,
                "exception_message": f"{f.message}\n",
                "exception_type": f.exception_type,
                "traceback": _TB_EXECUTE + [_node_frame(spec.name)],
                "current_inputs": self._shown(spec, values, nid, prompt, extra),
            }
        except Exception as ex:  # noqa: BLE001 - any node failure becomes execution_error
            mod = type(ex).__module__
            name = type(ex).__qualname__ if mod == "builtins" else f"{mod}.{type(ex).__qualname__}"
            return {
                "node_id": nid,
                "exception_message": f"{ex}\n",
                "exception_type": name,
                "traceback": _TB_EXECUTE + [_node_frame(spec.name)],
                "current_inputs": self._shown(spec, values, nid, prompt, extra),
            }
        ui = ui_or_none or {}
        if ui:
            self.ui_cache[key] = {
                "meta": {
                    "node_id": nid,
                    "display_node": nid,
                    "parent_node": None,
                    "real_node_id": nid,
                },
                "output": ui,
            }
            shown = self._register(nid, ui)
            if cid is not None:
                await self.hub.send_json(
                    "executed",
                    {"node": nid, "display_node": nid, "output": shown, "prompt_id": pid},
                    cid,
                )
        self.out_cache[key] = outputs
        self._finished(nid)
        rest = self._progress_post()
        if rest is not None:
            await rest
        executed.append(nid)
        return None

    async def _finish(self, nid: str) -> None:
        self._finished(nid)
        await self._progress_send()

    def _finished(self, nid: str) -> None:
        entry = self._entry(nid)
        entry["state"] = "finished"
        entry["value"] = entry["max"]


def executing_text(nid: str | None, pid: str) -> str:
    """json.dumps of {"type": "executing", "data": {"node": nid, "display_node": nid,
    "prompt_id": pid}}, or {"node": null, "prompt_id": pid} once the prompt is done."""
    if nid is None:
        return f'{{"type": "executing", "data": {{"node": null, "prompt_id": {json_str(pid)}}}}}'
    n = json_str(nid)
    return (
        f'{{"type": "executing", "data": {{"node": {n}, "display_node": {n},'
        f' "prompt_id": {json_str(pid)}}}}}'
    )


def prompt_message_text(event: str, pid: str, ts: int, nodes: list[str] | None = None) -> str:
    """json.dumps of {"type": event, "data": {["nodes": nodes,] "prompt_id": pid, "timestamp":
    ts}} (``event`` a plain ASCII name), written directly."""
    tail = f'"prompt_id": {json_str(pid)}, "timestamp": {int(ts)}}}}}'
    if nodes is None:
        return f'{{"type": "{event}", "data": {{' + tail
    listed = ", ".join([json_str(n) for n in nodes])
    return f'{{"type": "{event}", "data": {{"nodes": [{listed}], ' + tail


# The asset scanner's messages after every prompt (newer ComfyUI with assets): always the same.
_SEED_STARTED = '{"type": "assets.seed.started", "data": {"roots": ["output"], "phase": "fast"}}'
_SEED_COMPLETED = (
    '{"type": "assets.seed.completed", "data": {"phase": "fast", "total": 0, "created": 0,'
    ' "enriched": 0, "skipped": 0, "elapsed": 0.0}}'
)


def progress_state_text(pid: str, progress: dict[str, dict[str, Any]]) -> str:
    """The progress_state message of ``progress`` (node id -> state, value, max[, activity])
    as json.dumps writes {"type": "progress_state", "data": {"prompt_id": pid, "nodes": {...}}}
    with nodes not "pending" in insertion order; built by hand because encoding the floats is
    most of the cost of a message sent six times per trivial job."""
    p = json_str(pid)
    parts = []
    for nid, st in progress.items():
        if st["state"] == "pending":
            continue
        n = json_str(nid)
        entry = (
            f'{n}: {{"value": {json_num(st["value"])}, "max": {json_num(st["max"])},'
            f' "state": {json_str(st["state"])}, "node_id": {n}, "prompt_id": {p},'
            f' "display_node_id": {n}, "parent_node_id": null, "real_node_id": {n}'
        )
        if "activity" in st:
            entry += f', "activity": {json_num(st["activity"])}'
        parts.append(entry + "}")
    return (
        f'{{"type": "progress_state", "data": {{"prompt_id": {p}, "nodes": {{'
        + ", ".join(parts)
        + "}}}"
    )


def _node_frame(class_type: str) -> str:
    return (
        f'  File "/opt/ComfyUI/nodes.py", line 1, in {class_type}\n'
        f"    (simulated node {class_type})\n"
    )
