"""This instance as a member of the cluster: registered, heard, hearing the others.

It registers the instance through the store's link, beats its heart, hands the other instances'
committed state changes to the bus and the stage runners (a job admitted elsewhere wakes an idle
worker here at once) and their live events to the bus, and keeps each backend's count of prompts
the other instances have in flight on it, so that instances sharing a ComfyUI do not flood it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from comfyq import __version__
from comfyq.cluster.link import ClusterLink
from comfyq.cluster.model import Instance
from comfyq.comfy.backends import BackendPool
from comfyq.config import Settings
from comfyq.events import EventBus
from comfyq.netguard import redact_url
from comfyq.store.model import Transition

log = logging.getLogger("comfyq.cluster")

LOAD_INTERVAL = 1.0  # seconds between reads of the other instances' backend load


class Membership:
    """Registry entry, heartbeat and cross-instance delivery of one instance."""

    def __init__(
        self,
        settings: Settings,
        link: ClusterLink,
        *,
        instance_id: str,
        bus: EventBus,
        wake: list[Callable[[list[Transition]], None]],
        pool: BackendPool | None,
        backends: list[str],
        rescue: Callable[[], Awaitable[list[Transition]]] | None = None,
        outbox_rescue: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.settings = settings
        self.link = link
        self.bus = bus
        self.wake = wake
        self.pool = pool
        self.rescue = rescue
        self.outbox_rescue = outbox_rescue  # the outbox's recovery of expired delivery leases
        self.on_outbox: Callable[[], None] = lambda: None  # deliveries queued by another instance
        host = socket.gethostname()
        self.me = Instance(
            id=instance_id,
            name=settings.instance_name or f"{host}:{settings.api_port}",
            url=settings.advertise_url.rstrip("/"),
            roles=sorted(settings.active_roles),
            backends=[redact_url(u) for u in backends],
            host=host,
            pid=os.getpid(),
            version=__version__,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.heartbeat_failures = 0
        self.started = False

    @property
    def shared(self) -> bool:
        return self.link.shared

    async def start(self) -> None:
        await self.link.open(
            self.me, self._remote_transitions, self.bus.receive, self.on_outbox, self.bus.gap
        )
        self.started = True
        if self.link.shared:
            self.bus.transport = self.link
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="cluster-heartbeat"))
        if self.link.shared and self.pool is not None:
            self._tasks.append(asyncio.create_task(self._backend_load(), name="cluster-load"))
        if self.link.shared and self.rescue is not None:
            self._tasks.append(asyncio.create_task(self._rescue(), name="cluster-rescue"))

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.bus.transport = None
        await self.link.close(self.me)

    async def listening_at(self, host: str, port: int) -> None:
        """Learn the bound address once the API listens (port 0 picks one) and tell the others."""
        if self.settings.instance_name == "":
            self.me.name = f"{self.me.host}:{port}"
        if not self.settings.advertise_url:
            shown = self.me.host if host in ("0.0.0.0", "::", "") else host
            if ":" in shown:
                shown = f"[{shown}]"
            self.me.url = f"http://{shown}:{port}"
        if self.started:
            try:
                await self.link.heartbeat(self.me)
            except Exception as exc:  # noqa: BLE001 - the next heartbeat tells them
                log.warning("instance address not registered yet: %s", exc)

    def _remote_transitions(self, trs: list[Transition]) -> None:
        for fn in self.wake:
            fn(trs)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.instance_heartbeat)
            try:
                await self.link.heartbeat(self.me)
                self.heartbeat_failures = 0
            except Exception as exc:  # noqa: BLE001 - the database may be away: keep trying
                self.heartbeat_failures += 1
                log.warning("instance heartbeat failed: %s", exc)

    async def dead_owners(self) -> list[str]:
        """Lease owners that are no live instance (the store's recover() rescues their jobs)."""
        return await self.link.dead_owners(self.me.id, self.settings.instance_heartbeat)

    async def _rescue(self) -> None:
        # A dead instance's jobs go back to their queues as soon as its heartbeat has stopped
        # for three beats, not only when their leases expire (the reaper's job, which also runs).
        assert self.rescue is not None
        while True:
            await asyncio.sleep(self.settings.instance_heartbeat)
            try:
                dead = await self.dead_owners()
                if dead:
                    rescued = await self.rescue()
                    if rescued:
                        log.warning(
                            "rescued %d job(s) of instance(s) that stopped answering",
                            len(rescued),
                        )
                    if self.outbox_rescue is not None and await self.link.expire_deliveries(dead):
                        n = await self.outbox_rescue()
                        if n:
                            log.warning(
                                "requeued %d webhook post(s) of instance(s) that stopped answering",
                                n,
                            )
                            self.on_outbox()
            except Exception as exc:  # noqa: BLE001 - the reaper still rescues by lease expiry
                log.debug("rescue of dead instances' jobs skipped: %s", exc)

    async def _backend_load(self) -> None:
        assert self.pool is not None
        while True:
            try:
                self.pool.set_elsewhere(await self.link.backend_load(self.me.id))
            except Exception as exc:  # noqa: BLE001 - keep the last known load
                log.debug("backend load not read: %s", exc)
            await asyncio.sleep(LOAD_INTERVAL)

    async def instances(self) -> list[dict[str, Any]]:
        """Every registered instance, as /health and ``comfyq instances`` show them."""
        beat = self.settings.instance_heartbeat
        return [
            {**i.as_dict(beat), "self": i.id == self.me.id} for i in await self.link.instances()
        ]

    def health(self) -> dict[str, Any]:
        return {
            "id": self.me.id,
            "name": self.me.name,
            "url": self.me.url,
            "roles": self.me.roles,
            "heartbeat_failures": self.heartbeat_failures,
            **self.link.health(),
        }
