"""comfyq servers on free loopback ports, and their fixtures.

``server`` runs Services + the aiohttp app in the test's event loop (use ``server.session``);
``thread_server`` runs the same in a thread of its own, for blocking clients (requests, sseclient,
schemathesis). Databases and output folders live under ``tmp_path``. comfyq runs on its own
``Runner`` (the one ``comfyq serve`` uses, with ``handler_cancellation=False`` and the slow-client
deadlines), not on aiohttp's TestServer: what the tests exercise is the production setting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from comfyq.api.context import ApiOptions
from comfyq.api.server import Runner
from comfyq.app import create_app
from comfyq.config import Settings
from comfyq.services import Services
from comfyq.sim import Simulator
from comfyq.sim.generation import NEWEST
from comfyq.store.model import Stage

FAST = {
    "backend_probe_interval": 0.2,
    "lease_seconds": 5.0,
    "retry_base_delay": 0.05,
    "retry_max_delay": 0.2,
    "shutdown_grace": 1.0,
    "preprocess_workers": 2,
    "generation_workers": 1,
    "postprocess_workers": 2,
}


def settings_for(root: Path, backend: str, **overrides: Any) -> Settings:
    """Settings for a test server whose files all live under ``root``."""
    values: dict[str, Any] = {
        "database": str(root / "q.db"),
        "output_dir": str(root / "out"),
        "cache_dir": str(root / "cache"),
        "assets_dir": str(root / "assets"),
        "comfyui_api_base": backend,
        **FAST,
        **overrides,
    }
    return Settings(**values)


@dataclass
class Server:
    """A running comfyq: its URL, services, and a client session pointed at it."""

    url: str
    services: Services
    runner: web.AppRunner
    session: aiohttp.ClientSession
    headers: dict[str, str] = field(default_factory=dict)

    def u(self, path: str) -> str:
        return self.url + path

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()


async def start_server(
    settings: Settings, options: ApiOptions | None = None, backends: list[str] | None = None
) -> Server:
    """Start Services and the app on a free loopback port."""
    services = Services(settings, backends=backends)
    # The runner comfyq serve uses: the slow-client deadlines are part of what tests exercise.
    runner = Runner(create_app(services, options), settings, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Server(f"http://127.0.0.1:{port}", services, runner, aiohttp.ClientSession())


MakeServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server(tmp_path: Path, simulator: Simulator) -> AsyncIterator[MakeServer]:
    """``await make_server(options=ApiOptions(...), **settings)``: more servers, each with its own
    files."""
    servers: list[Server] = []

    async def make(*, options: ApiOptions | None = None, **overrides: Any) -> Server:
        root = tmp_path / f"server{len(servers)}"
        srv = await start_server(settings_for(root, simulator.url, **overrides), options)
        servers.append(srv)
        return srv

    yield make
    for srv in reversed(servers):
        await srv.close()


@pytest.fixture
async def server(make_server: MakeServer) -> Server:
    return await make_server(options=ApiOptions(heartbeat=0.5, ws_heartbeat=1.0))


def pause(srv: Server, stage: Stage) -> None:
    """Stop ``stage`` from claiming jobs, so that they wait in its queue."""
    srv.services.pipeline.stages[stage].pause()


def resume(srv: Server, stage: Stage) -> None:
    """Let ``stage`` claim again (its claimer sleeps until a waiter or new work wakes it)."""
    srv.services.pipeline.stages[stage].resume()


async def wait_healthy(srv: Server, timeout: float = 10.0) -> None:
    """Until /health says 200 (a backend answered and every stage has workers)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        async with srv.session.get(srv.u("/health")) as r:
            if r.status == 200:
                return
        if loop.time() > end:
            raise AssertionError("server did not become healthy")
        await asyncio.sleep(0.05)


class ThreadServer:
    """Simulator + comfyq in a thread with its own event loop, for blocking test clients."""

    def __init__(
        self,
        root: Path,
        options: ApiOptions | None = None,
        *,
        comfyui_version: str = NEWEST,
        **overrides: Any,
    ) -> None:
        self.root = root
        self.comfyui_version = comfyui_version
        self.options = options
        self.overrides = overrides
        self.url = ""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="comfyq-test-server", daemon=True
        )
        self._server: Server | None = None
        self._sim: Simulator | None = None

    def run(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def start(self) -> ThreadServer:
        self._thread.start()

        async def up() -> None:
            self._sim = Simulator(
                port=0, data_dir=self.root / "sim", comfyui_version=self.comfyui_version
            )
            await self._sim.start()
            self._server = await start_server(
                settings_for(self.root, self._sim.url, **self.overrides), self.options
            )
            await wait_healthy(self._server)

        self.run(up())
        assert self._server is not None
        self.url = self._server.url
        return self

    @property
    def services(self) -> Services:
        assert self._server is not None
        return self._server.services

    @property
    def sim(self) -> Simulator:
        assert self._sim is not None
        return self._sim

    def stop(self) -> None:
        async def down() -> None:
            if self._server is not None:
                await self._server.close()
            if self._sim is not None:
                await self._sim.stop()

        try:
            self.run(down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def thread_server(tmp_path: Path) -> Iterator[ThreadServer]:
    srv = ThreadServer(tmp_path / "threaded", ApiOptions(heartbeat=0.5)).start()
    try:
        yield srv
    finally:
        srv.stop()
