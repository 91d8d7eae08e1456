"""A protocol-faithful ComfyUI simulator (HTTP + websocket), built from recorded ComfyUI traffic.

Run standalone: python -m comfyq.sim --host 127.0.0.1 --port 8188
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from aiohttp import web

from .env import SimEnv
from .exec import Faults, Timing
from .generation import NEWEST, VERSIONS, Generation, generation
from .http import build_app
from .process import SimProcess
from .promptlog import PromptLog

__all__ = ["Simulator", "main"]


class Simulator:
    """ComfyUI stand-in: real HTTP/websocket server, simulated nodes, fault injection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_dir: Path | None = None,
        node_duration: float = 0.0,
        node_durations: dict[str, float] | None = None,
        progress_steps: int = 0,
        max_history: int = 10000,
        prompt_log: Path | None = None,
        comfyui_version: str = NEWEST,
        assets: bool = True,
        replacements: dict[str, Any] | None = None,
    ) -> None:
        # Which ComfyUI to speak (generation.py): "0.3.64" or "0.38"; a restart keeps it, and
        # ``comfyui_version`` may be changed between a stop and a start (an upgrade).
        self.generation: Generation = generation(comfyui_version, assets=assets)
        self.replacements = dict(replacements or {})
        self.host = host
        self.port = port
        self.url = ""
        self.data_dir: Path | None = Path(data_dir) if data_dir is not None else None
        self._own_data_dir = data_dir is None
        self.timing = Timing(node_duration, dict(node_durations or {}), progress_steps)
        self.max_history = max_history
        self.faults = Faults()
        self.prompts_received: list[str] = []
        self.prompt_log = PromptLog(prompt_log) if prompt_log is not None else None
        self._proc: SimProcess | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._worker: asyncio.Task[None] | None = None

    # Fault injection: plain attributes backed by the shared Faults record.
    @property
    def stall_ws(self) -> bool:
        """When True no websocket message reaches anyone (they are dropped, not delayed)."""
        return self.faults.stall_ws

    @stall_ws.setter
    def stall_ws(self, value: bool) -> None:
        self.faults.stall_ws = value

    @property
    def reject_next(self) -> list[tuple[int, str | dict[str, Any]]]:
        """Answers (status, body) for the next POST /prompt calls, consumed in order."""
        return self.faults.reject_next

    @reject_next.setter
    def reject_next(self, value: list[tuple[int, str | dict[str, Any]]]) -> None:
        self.faults.reject_next = list(value)

    @property
    def view_delay(self) -> float:
        """Seconds every GET /view waits before answering."""
        return self.faults.view_delay

    @view_delay.setter
    def view_delay(self, value: float) -> None:
        self.faults.view_delay = value

    @property
    def fail_nodes(self) -> dict[str, tuple[str, str]]:
        """class_type or node id -> (exception_type, message) raised when that node runs."""
        return self.faults.fail_nodes

    @fail_nodes.setter
    def fail_nodes(self, value: dict[str, tuple[str, str]]) -> None:
        self.faults.fail_nodes = dict(value)

    @property
    def node_duration(self) -> float:
        """Default seconds each node takes."""
        return self.timing.node_duration

    @node_duration.setter
    def node_duration(self, value: float) -> None:
        self.timing.node_duration = value

    @property
    def node_durations(self) -> dict[str, float]:
        """Per class_type node durations."""
        return self.timing.node_durations

    @node_durations.setter
    def node_durations(self, value: dict[str, float]) -> None:
        self.timing.node_durations = dict(value)

    @property
    def progress_steps(self) -> int:
        """Progress ticks reported by slow nodes (0: none)."""
        return self.timing.progress_steps

    @progress_steps.setter
    def progress_steps(self, value: int) -> None:
        self.timing.progress_steps = value

    @property
    def running(self) -> bool:
        """True while the simulated server listens."""
        return self._server is not None

    @property
    def env(self) -> SimEnv:
        """Folders of the simulated installation (valid after start)."""
        if self._proc is None:
            raise RuntimeError("simulator is not running")
        return self._proc.env

    async def start(self) -> None:
        """Bind and serve; sets .port and .url."""
        if self._server is not None:
            raise RuntimeError("simulator already running")
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="comfyq-sim-"))
        env = SimEnv(self.data_dir)
        env.wipe_temp()
        if self.prompt_log is not None:
            self.prompt_log.open()
        proc = SimProcess(
            env,
            self.faults,
            self.timing,
            self.max_history,
            self.prompts_received,
            self.host,
            self.port,
            self.prompt_log,
            self.generation,
            self.replacements,
        )
        runner = web.AppRunner(build_app(proc), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        loop = asyncio.get_running_loop()
        try:
            assert runner.server is not None  # set by setup()
            server = await loop.create_server(
                runner.server, self.host, self.port, reuse_address=True
            )
        except BaseException:
            await runner.cleanup()
            if self.prompt_log is not None:
                self.prompt_log.close()
            raise
        self.port = server.sockets[0].getsockname()[1]
        proc.port = self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        self._proc, self._runner, self._server = proc, runner, server
        self._worker = asyncio.create_task(proc.executor.run_forever())

    async def _halt(self, graceful: bool) -> None:
        server, runner, proc, worker = self._server, self._runner, self._proc, self._worker
        self._server = self._runner = self._proc = self._worker = None
        if server is None or runner is None or proc is None:
            return
        proc.alive = False
        server.close()
        if graceful:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.hub.close_all(), 2.0)
        # Cut whatever is still connected (all of it for a crash): no close frame, no FIN dance.
        proc.hub.abort_all()
        for handler in runner.server.connections if runner.server else []:
            transport = handler.transport
            if transport is not None:
                transport.abort()
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        await asyncio.sleep(0)
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        if self.prompt_log is not None:
            self.prompt_log.close()

    async def stop(self) -> None:
        """Graceful shutdown; a temp data_dir made by start() is removed."""
        await self._halt(graceful=True)
        if self._own_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    async def crash(self) -> None:
        """Like kill -9: connections cut without close frames, listener gone, memory lost."""
        await self._halt(graceful=False)

    async def restart(self) -> None:
        """Serve again on the same port with fresh memory (files in input/ and output/ kept)."""
        if self._server is not None:
            await self._halt(graceful=True)
        await self.start()

    @property
    def comfyui_version(self) -> str:
        """The generation spoken: "0.3.64" or "0.38"."""
        return self.generation.name

    def switch_version(self, name: str, *, assets: bool = True) -> None:
        """Speak another generation from the next start (restart to "upgrade" ComfyUI)."""
        self.generation = generation(name, assets=assets)

    def hold_starts(self) -> None:
        """From now on a prompt taken off the queue (so already "running") waits before it
        executes, until ``release_starts``; ``held`` lists the prompt ids that got there."""
        self.faults.start_gate = asyncio.Event()

    def release_starts(self) -> None:
        gate, self.faults.start_gate = self.faults.start_gate, None
        if gate is not None:
            gate.set()

    @property
    def held(self) -> list[str]:
        return self.faults.held

    @property
    def requests(self) -> list[str]:
        """ "METHOD /path" of the requests served (the latest 10000), oldest first."""
        return list(self.faults.requests)

    def drop_websockets(self) -> None:
        """Cut every websocket connection abruptly; the server stays up."""
        if self._proc is not None:
            self._proc.hub.abort_all()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m comfyq.sim", description="Simulated ComfyUI server"
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--node-duration", type=float, default=0.0)
    ap.add_argument(
        "--node-durations", default="", help="per class_type seconds, e.g. KSampler=2,ImageBlur=0.5"
    )
    ap.add_argument("--progress-steps", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--max-history", type=int, default=10000)
    ap.add_argument(
        "--comfyui-version",
        choices=VERSIONS,
        # The environment lets a harness that starts simulators (bench) pick one unchanged.
        default=os.environ.get("COMFYQ_SIM_COMFYUI_VERSION") or NEWEST,
        help="which ComfyUI protocol to speak (default: $COMFYQ_SIM_COMFYUI_VERSION, else the"
        " newest, %(default)s)",
    )
    ap.add_argument(
        "--disable-assets",
        action="store_true",
        help="newest generation only: run without the assets system"
        " (no asset ids, no blake3: views)",
    )
    ap.add_argument(
        "--prompt-log",
        type=Path,
        default=None,
        help="append one JSON line per accepted POST /prompt to this file (survives crashes)",
    )
    return ap.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    durations: dict[str, float] = {}
    for part in filter(None, args.node_durations.split(",")):
        name, _, value = part.partition("=")
        durations[name.strip()] = float(value)
    sim = Simulator(
        args.host,
        args.port,
        data_dir=args.data_dir,
        node_duration=args.node_duration,
        node_durations=durations,
        progress_steps=args.progress_steps,
        max_history=args.max_history,
        prompt_log=args.prompt_log,
        comfyui_version=args.comfyui_version,
        assets=not args.disable_assets,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await sim.start()
    # Everything built so far (modules, routes, node tables) lives as long as the process: out
    # of the collector's way, so its full collections walk only what jobs allocate. Jobs make
    # few reference cycles: a young generation of 10,000 objects (not 700) lets most of what a
    # job allocates die before the collector ever walks it.
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    print(f"SIMULATOR_READY {sim.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM."""
    asyncio.run(_serve(_parse(argv)))
    return 0
