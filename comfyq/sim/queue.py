"""ComfyUI's PromptQueue: a heap of pending items, the running item, and the in-memory history."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

from .ws import Hub

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
QueueItem = list[Any]  # [number, prompt_id, prompt, extra_data, outputs_to_execute]


def status_text(remaining: int) -> str:
    """json.dumps of {"type": "status", "data": {"status": {"exec_info": {"queue_remaining":
    remaining}}}}, written directly."""
    info = f'{{"exec_info": {{"queue_remaining": {int(remaining)}}}}}'
    return f'{{"type": "status", "data": {{"status": {info}}}}}'


class PromptQueue:
    """Pending prompts in heap order, what runs now, and finished prompts' history."""

    def __init__(self, hub: Hub, max_history: int) -> None:
        self.hub = hub
        self.max_history = max(1, max_history)
        # (number, prompt_id, seq, item): same heap order as ComfyUI's tuples while
        # (number, prompt_id) pairs are unique; seq only breaks exact duplicates.
        self.heap: list[tuple[Any, str, int, QueueItem]] = []
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, Any] = {}
        self._task_counter = 0
        self._seq = 0
        self._wakeup = asyncio.Event()

    def remaining(self) -> int:
        """queue_remaining: running plus pending."""
        return len(self.heap) + len(self.running)

    def queue_info(self) -> dict[str, Any]:
        """The `status` payload ({"exec_info": {"queue_remaining": n}})."""
        return {"exec_info": {"queue_remaining": self.remaining()}}

    async def queue_updated(self) -> None:
        """Broadcast `status` to every socket, as ComfyUI does on each queue change."""
        rest = self.hub.post(status_text(self.remaining()))  # three per job
        if rest is not None:
            await rest

    async def put(self, item: QueueItem) -> None:
        """Queue an accepted prompt."""
        self._seq += 1
        heapq.heappush(self.heap, (item[0], item[1], self._seq, item))
        self._wakeup.set()  # before any await: the item must run even if this task dies
        await self.queue_updated()

    async def get(self) -> tuple[QueueItem, int]:
        """Wait for the next item in number order and mark it running."""
        while not self.heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = heapq.heappop(self.heap)[3]
        task_id = self._task_counter
        self.running[task_id] = item
        self._task_counter += 1
        await self.queue_updated()
        return item, task_id

    async def task_done(
        self, task_id: int, outputs: dict[str, Any], meta: dict[str, Any], status: dict[str, Any]
    ) -> None:
        """Move a finished item into history."""
        item = self.running.pop(task_id)
        while len(self.history) >= self.max_history:
            self.history.pop(next(iter(self.history)))
        extra = item[3]
        if isinstance(extra, dict) and any(k in extra for k in SENSITIVE_EXTRA_DATA_KEYS):
            extra = {k: v for k, v in extra.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        self.history[item[1]] = {
            "prompt": [item[0], item[1], item[2], extra, item[4]],
            "outputs": outputs,
            "status": status,
            "meta": meta,
        }
        await self.queue_updated()

    def running_items(self) -> list[QueueItem]:
        """queue_running of GET /queue."""
        return list(self.running.values())

    def pending_items(self) -> list[QueueItem]:
        """queue_pending of GET /queue, in raw heap order like ComfyUI."""
        return [entry[3] for entry in self.heap]

    async def wipe(self) -> None:
        """POST /queue {"clear": true}."""
        self.heap = []
        await self.queue_updated()

    async def delete(self, prompt_id: Any) -> bool:
        """Remove the first pending item with this id; the running one is never touched."""
        for index, entry in enumerate(self.heap):
            if entry[1] == prompt_id:
                if len(self.heap) == 1:
                    await self.wipe()
                else:
                    self.heap.pop(index)
                    heapq.heapify(self.heap)
                await self.queue_updated()
                return True
        return False

    def get_history(
        self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        """GET /history and /history/{id} semantics (oldest first; last N with max_items)."""
        if prompt_id is not None:
            entry = self.history.get(prompt_id)
            return {} if entry is None else {prompt_id: entry}
        out: dict[str, Any] = {}
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        for i, key in enumerate(self.history):
            if i >= offset:
                out[key] = self.history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        return out
