"""The chaos run's processes: comfyq, the simulator and the webhook receiver as children that can be
killed with SIGKILL, restarted with the same command line, and stopped gracefully.

Readiness is checked from outside, the way an operator's supervisor would: an HTTP answer (comfyq's
``/health``, any status: it says 503 while ComfyUI is down, and that is still an answer) or a port
that accepts connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


class ChildDied(RuntimeError):
    """A child exited before it was ready."""


class Child:
    """One restartable child process; output appended to ``log`` across incarnations."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        ready: Callable[[], Awaitable[bool]],
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        ready_timeout: float = 60.0,
    ) -> None:
        self.name, self.argv, self.log, self.ready = name, argv, log, ready
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.cwd, self.ready_timeout = cwd, ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.failed_starts: list[str] = []  # log tails of incarnations that died before ready

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        """Start one incarnation without waiting for it."""
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(
                f"\n===== chaos: {self.name} start #{self.starts} at {time.time():.3f} =====\n"
                "".encode()
            )
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def start(self, attempts: int = 3) -> float:
        """Start and wait until ready; a child that dies first is started again. Returns seconds."""
        t0 = time.monotonic()
        for _ in range(attempts):
            self.spawn()
            try:
                await self._wait_ready()
                return time.monotonic() - t0
            except ChildDied as exc:
                self.failed_starts.append(f"{exc}\n{tail(self.log)}")
        raise ChildDied(f"{self.name} did not start in {attempts} tries; log: {self.log}")

    async def _wait_ready(self) -> None:
        end = time.monotonic() + self.ready_timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise ChildDied(
                    f"{self.name} exited with {self.proc.returncode} before it was ready"
                )
            if await self.ready():
                return
            await asyncio.sleep(0.05)
        raise ChildDied(f"{self.name} not ready after {self.ready_timeout:.0f}s")

    async def kill9(self) -> None:
        """SIGKILL and reap."""
        if self.proc is None:
            return
        self.kills += 1
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)

    def freeze(self, on: bool) -> None:
        """SIGSTOP (a hung process: connections stay open, nothing answers) or SIGCONT."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)

    async def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL after ``timeout``. The exit code (None if it was killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            return None


def tail(path: Path, n: int = 4000) -> str:
    """The last ``n`` characters of a text file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return data[-n:].decode(errors="replace")


def http_ready(session: aiohttp.ClientSession, url: str) -> Callable[[], Awaitable[bool]]:
    """Ready when ``url`` gives any HTTP answer."""

    async def check() -> bool:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                await r.read()
                return True
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    return check


def port_ready(port: int) -> Callable[[], Awaitable[bool]]:
    """Ready when 127.0.0.1:``port`` accepts a connection."""

    async def check() -> bool:
        try:
            await asyncio.to_thread(
                lambda: socket.create_connection(("127.0.0.1", port), 0.5).close()
            )
            return True
        except OSError:
            return False

    return check


def python(*args: str) -> list[str]:
    """A command line running this interpreter."""
    return [sys.executable, *args]
