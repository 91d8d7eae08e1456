"""One simulated ComfyUI process: what a real ComfyUI keeps in memory (a crash throws it away)."""

from __future__ import annotations

from typing import Any

from .env import SimEnv
from .exec import Executor, Faults, Timing
from .generation import Generation, generation
from .promptlog import PromptLog
from .queue import PromptQueue
from .ws import Hub

__all__ = ["SimProcess"]


class SimProcess:
    """Everything a real ComfyUI process keeps in memory; a crash throws it away."""

    def __init__(
        self,
        env: SimEnv,
        faults: Faults,
        timing: Timing,
        max_history: int,
        prompts_received: list[str],
        host: str,
        port: int,
        prompt_log: PromptLog | None = None,
        gen: Generation | None = None,
        replacements: dict[str, Any] | None = None,
    ) -> None:
        self.env, self.faults, self.host, self.port = env, faults, host, port
        self.gen = gen or generation()
        # GET /node_replacements of the newer generation: old class -> its replacements.
        self.replacements = dict(replacements or {})
        self.prompts_received = prompts_received
        self.prompt_log = prompt_log  # outlives this process's memory (see sim_promptlog)
        self.hub = Hub(faults, self.gen.features)
        self.queue = PromptQueue(self.hub, max_history)
        self.executor = Executor(self.queue, self.hub, env, faults, timing, self.gen)
        self.number = 0
        self.alive = True  # False once stopped or crashed: late handlers must not count prompts

    async def on_ws_connect(self, sid: str) -> None:
        """First messages of a socket: status with sid; the running node if it is its prompt."""
        await self.hub.send_json("status", {"status": self.queue.queue_info(), "sid": sid}, sid)
        ex = self.executor
        if ex.client_id == sid and ex.last_node_id is not None:
            await self.hub.send_json("executing", {"node": ex.last_node_id}, sid)

    async def cancel_job(self, prompt_id: str) -> bool:
        """The newer ``POST /api/jobs/{id}/cancel``: interrupt it if it is the running prompt,
        else remove it if pending; check and act with no await in between (atomic)."""
        if any(item[1] == prompt_id for item in self.queue.running_items()):
            self.executor.cancel(prompt_id)
            return True
        return await self.queue.delete(prompt_id)
