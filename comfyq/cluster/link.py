"""The link between one instance and the others on the same store.

A store adapter that several instances can share (Postgres) comes with a link that carries their
registry, their committed state changes and their live events; SQLite, one instance per file,
has the local link: the registry is this instance alone and nothing needs to travel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from comfyq.cluster.model import Instance
from comfyq.store.model import Transition

OnTransitions = Callable[[list[Transition]], None]
OnLive = Callable[[str, str, str, dict[str, Any]], None]  # job id, kind, event id, data


class ClusterLink(Protocol):
    """What an instance needs from the store to live beside others."""

    shared: bool  # other instances may use the same store

    async def open(
        self,
        me: Instance,
        on_transitions: OnTransitions,
        on_live: OnLive,
        on_outbox: Callable[[], None] = ...,
        on_gap: Callable[[], None] = ...,
    ) -> None:
        """Register ``me`` and start hearing the others' state changes, live events and queued
        webhook deliveries; ``on_gap`` is called when some may have been missed (the listener
        lost its connection), after the listener hears again."""
        ...

    async def heartbeat(self, me: Instance) -> None:
        """Say this instance is alive (and what it advertises)."""
        ...

    async def instances(self) -> list[Instance]:
        """Every registered instance, most recently heard first."""
        ...

    async def backend_load(self, me: str) -> dict[str, int]:
        """Prompts in flight per ComfyUI URL on the other instances (generate jobs they hold)."""
        ...

    async def dead_owners(self, me: str, heartbeat: float) -> list[str]:
        """Lease owners of running jobs that are no live instance (their jobs may be rescued)."""
        ...

    async def expire_deliveries(self, owners: list[str]) -> int:
        """End the leases of webhook posts that dead owners had in flight; how many."""
        ...

    def send_live(self, job_id: str, kind: str, event_id: str, data: dict[str, Any]) -> None:
        """Queue one live event for the other instances."""
        ...

    async def close(self, me: Instance) -> None:
        """Mark ``me`` stopped and stop listening."""
        ...

    def health(self) -> dict[str, Any]:
        """The link's own state for /health and /metrics."""
        ...


class LocalLink:
    """One instance per store (SQLite): the registry is this process, nothing travels."""

    shared = False

    def __init__(self) -> None:
        self._me: Instance | None = None

    async def open(
        self,
        me: Instance,
        on_transitions: OnTransitions,
        on_live: OnLive,
        on_outbox: Callable[[], None] = lambda: None,
        on_gap: Callable[[], None] = lambda: None,
    ) -> None:
        me.started_at = me.heartbeat_at = time.time()
        self._me = me

    async def heartbeat(self, me: Instance) -> None:
        me.heartbeat_at = time.time()

    async def instances(self) -> list[Instance]:
        if self._me is None:
            return []
        self._me.heartbeat_age = max(0.0, time.time() - self._me.heartbeat_at)
        return [self._me]

    async def backend_load(self, me: str) -> dict[str, int]:
        return {}

    async def dead_owners(self, me: str, heartbeat: float) -> list[str]:
        return []  # one process per file: the store's recover() knows every other owner is dead

    async def expire_deliveries(self, owners: list[str]) -> int:
        return 0

    def send_live(self, job_id: str, kind: str, event_id: str, data: dict[str, Any]) -> None:
        return None

    async def close(self, me: Instance) -> None:
        me.stopped_at = time.time()

    def health(self) -> dict[str, Any]:
        return {"shared": False}
