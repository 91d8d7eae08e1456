"""BackendPool against simulators over real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from comfyq.comfy.backends import Backend, BackendPool
from comfyq.errors import ComfyUIUnreachable
from comfyq.sim import Simulator

GUARD = 15.0  # hang guard only
FAST = {"request_timeout": 5.0, "poll_interval": 0.05, "reconnect_min": 0.02, "reconnect_max": 0.2}
LOGGER = "comfyq.test.backends"

MakeSim = Callable[..., Awaitable[Simulator]]
MakePool = Callable[..., Awaitable[BackendPool]]


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def make_sim(tmp_path: Path) -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def make(**kw: Any) -> Simulator:
        sim = Simulator(
            port=0, data_dir=tmp_path / f"sim{len(sims)}", node_duration=0.0, progress_steps=0, **kw
        )
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    pools: list[BackendPool] = []

    async def make(urls: list[str], **kw: Any) -> BackendPool:
        kw.setdefault("slots_per_backend", 1)
        kw.setdefault("probe_interval", 0.1)
        kw.setdefault("ready_timeout", 10.0)
        kw.setdefault("client_kwargs", FAST)
        kw.setdefault("logger", logging.getLogger(LOGGER))
        pool = BackendPool(urls, **kw)
        pools.append(pool)
        await pool.start()
        return pool

    yield make
    for pool in pools:
        await pool.close()


class Holder:
    """Takes a slot in a task and keeps it until released."""

    def __init__(self, pool: BackendPool, **kw: Any) -> None:
        self.got: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._release = asyncio.Event()
        self.task = asyncio.create_task(self._hold(pool, kw))

    async def _hold(self, pool: BackendPool, kw: dict[str, Any]) -> None:
        async with pool.slot(**kw) as backend:
            self.got.set_result(backend)
            await self._release.wait()

    async def release(self) -> None:
        self._release.set()
        await asyncio.wait_for(self.task, GUARD)


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD):
        while not cond():
            await asyncio.sleep(0.01)


async def test_slots_spread_and_wait_for_release(make_sim: MakeSim, make_pool: MakePool) -> None:
    a, b = await make_sim(), await make_sim()
    pool = await make_pool([a.url, b.url + "/"])
    assert await pool.wait_ready(GUARD)
    async with pool.slot() as first, pool.slot() as second:
        assert {first.url, second.url} == {a.url, b.url}
        assert first.in_flight == second.in_flight == 1
        third = Holder(pool)
        done, _ = await asyncio.wait([third.got], timeout=0.1)
        assert not done  # both backends are full
    got = await asyncio.wait_for(third.got, GUARD)
    assert got.in_flight == 1
    await third.release()
    async with pool.slot(prefer=b.url) as chosen:
        assert chosen.url == b.url
    async with pool.slot(prefer=b.url, exclude=[b.url]) as chosen:
        assert chosen.url == a.url
    async with pool.slot(exclude=[a.url, b.url]) as chosen:  # excluding all = no preference
        assert chosen.url in {a.url, b.url}
    assert [s["in_flight"] for s in pool.snapshot()] == [0, 0]


async def test_crashed_backend_gets_no_new_slots(make_sim: MakeSim, make_pool: MakePool) -> None:
    a, b = await make_sim(), await make_sim()
    pool = await make_pool([a.url, b.url], slots_per_backend=4)
    assert await pool.wait_ready(GUARD)
    await a.crash()
    backend_a = pool.get(a.url)
    assert backend_a is not None
    await until(lambda: not backend_a.healthy)
    for _ in range(3):
        async with pool.slot() as chosen:
            assert chosen.url == b.url
    snap = {s["url"]: s for s in pool.snapshot()}
    assert snap[a.url]["healthy"] is False and snap[a.url]["last_error"]
    assert snap[b.url]["healthy"] is True and snap[b.url]["websocket_ok"] is True
    await a.restart()
    await until(lambda: backend_a.healthy)
    assert pool.snapshot()[0]["last_error"] is None


async def test_slot_waits_while_all_down_then_proceeds(
    make_sim: MakeSim, make_pool: MakePool
) -> None:
    a, b = await make_sim(), await make_sim()
    pool = await make_pool([a.url, b.url])
    assert await pool.wait_ready(GUARD)
    await a.crash()
    await b.crash()
    await until(lambda: not pool.any_healthy())
    waiter = Holder(pool)
    done, _ = await asyncio.wait([waiter.got], timeout=0.3)
    assert not done
    await b.restart()
    got = await asyncio.wait_for(waiter.got, GUARD)
    assert got.url == b.url and got.healthy
    await waiter.release()


async def test_backends_ready_logged_once(
    make_sim: MakeSim, make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    a, b = await make_sim(), await make_sim()
    pool = await make_pool([a.url, b.url])
    assert await pool.wait_ready(GUARD)  # the line is written the moment all are healthy
    await asyncio.sleep(0.3)  # several more probe rounds: still one line
    await a.crash()
    await a.restart()
    assert await pool.wait_ready(GUARD)  # healthy again, but READY is not repeated
    lines = [r.getMessage() for r in caplog.records if "BACKENDS_READY" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("BACKENDS_READY: 2 backend(s) reachable")


async def test_backends_ready_timeout_logged(
    make_sim: MakeSim, make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    a = await make_sim()
    dead = closed_port_url()
    pool = await make_pool([a.url, dead], ready_timeout=0.5)
    await until(lambda: any("BACKENDS_READY" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "BACKENDS_READY" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("BACKENDS_READY_TIMEOUT")
    assert "1/2" in lines[0] and dead in lines[0]
    assert pool.any_healthy() and not await pool.wait_ready(0.05)


async def test_no_ready_line_when_closed_early(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pool = await make_pool([closed_port_url()], ready_timeout=30.0)
    await asyncio.sleep(0.1)
    await pool.close()
    assert not any("BACKENDS_READY" in r.getMessage() for r in caplog.records)
    with pytest.raises(ComfyUIUnreachable):
        async with pool.slot():
            pass


async def test_snapshot_hides_credentials(make_sim: MakeSim, make_pool: MakePool) -> None:
    a = await make_sim()
    secret_url = a.url.replace("http://", "http://user:s3cret@")
    pool = await make_pool([secret_url])
    assert await pool.wait_ready(GUARD)
    snap = pool.snapshot()
    assert snap[0]["url"] == a.url and "s3cret" not in repr(snap)
    assert set(snap[0]) >= {
        "url",
        "healthy",
        "http_ok",
        "websocket_ok",
        "in_flight",
        "slots",
        "last_error",
    }
