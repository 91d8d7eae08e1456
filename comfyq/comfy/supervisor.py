"""Supervision of a local ComfyUI: comfyq starts it as a child process and keeps it running.

``COMFYUI_COMMAND`` is the child's argv (split like a shell would, never run through one);
``{port}`` in it is replaced by the backend's port, so one command serves several backends of one
install. Its output goes into comfyq's log, one line per line, prefixed with the backend (and
through the log sanitiser, like everything else: ComfyUI echoes client text). When the child dies
it is started again after a delay that doubles per quick death (capped); a run that lasted
``stable_after`` seconds resets the delay. Jobs in flight are not this module's business: the pool
sees the backend go and come back, and the generate stage reconciles them exactly as after an
external restart.

A child that exits with ``ASSETS_STARTUP_FAILED`` (ComfyUI >= 0.38: another process holds this
install's assets database) is reported as such in /health and retried only at the longest delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shlex
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yarl import URL

from comfyq.backoff import backoff

log = logging.getLogger("comfyq.comfyui")

_ASSETS = re.compile(r"ASSETS_STARTUP_FAILED:?\s*(?P<kind>[A-Za-z_]*)")
_MAX_LINE = 4000
ASSETS_HINT = (
    "another ComfyUI process uses this install's assets database: give each process its own"
    " --database-url (e.g. --database-url sqlite:///user/comfyui-{port}.db) or --disable-assets"
)


def command_for(command: str, url: str) -> list[str]:
    """The argv for the backend at ``url``: ``command`` split, ``{port}``/``{host}`` filled."""
    u = URL(url)
    port = str(u.port or 8188)
    host = u.host or "127.0.0.1"
    return [part.replace("{port}", port).replace("{host}", host) for part in shlex.split(command)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the child gets SIGTERM if comfyq dies (even by SIGKILL), so no orphan keeps the port.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Runs one ComfyUI child for one backend URL and restarts it when it dies."""

    def __init__(
        self,
        url: str,
        argv: list[str],
        *,
        workdir: str | Path | None = None,
        restart_delay: float = 1.0,
        restart_max_delay: float = 60.0,
        stop_timeout: float = 20.0,
        stable_after: float = 30.0,
        env: Mapping[str, str] | None = None,
        label: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("COMFYUI_COMMAND is empty")
        self.url = url
        self.argv = argv
        self.workdir = Path(workdir) if workdir else None
        self.restart_delay = restart_delay
        self.restart_max_delay = restart_max_delay
        self.stop_timeout = stop_timeout
        self.stable_after = stable_after
        self.env = dict(env) if env is not None else None
        self.label = label or URL(url).authority
        self.state = "stopped"  # starting | running | backoff | stopped
        self.pid: int | None = None
        self.starts = 0
        self.restarts = 0
        self.last_exit: str | None = None
        self.reason: str | None = None
        self.next_start_at: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._assets_failure: str | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child (and the loop that restarts it); returns once it is spawned."""
        self._stopping.clear()
        spawned = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(spawned), name=f"supervise {self.label}")
        await asyncio.wait({spawned, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # a spawn error (no such program) surfaces here

    async def stop(self) -> None:
        """Stop restarting; SIGTERM the child (its process group), SIGKILL after the timeout."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._signal(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning(
                    "[comfyui %s] did not stop in %.0fs: SIGKILL", self.label, self.stop_timeout
                )
                self._signal(proc, signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped"

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # the child leads its own group: its children go too

    def snapshot(self) -> dict[str, Any]:
        """What /health and /metrics show about the child."""
        wait = None
        if self.next_start_at is not None:
            wait = round(max(0.0, self.next_start_at - time.monotonic()), 1)
        return {
            "state": self.state,
            "pid": self.pid,
            "starts": self.starts,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "next_start_in": wait,
        }

    # --- the loop -------------------------------------------------------------------------

    async def _run(self, spawned: asyncio.Future[None]) -> None:
        failures = 0
        while not self._stopping.is_set():
            self.state = "starting"
            self._assets_failure = None
            began = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    cwd=self.workdir,
                    env=self.env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                self.last_exit = f"could not start: {exc.strerror or exc}"
                self.reason = f"COMFYUI_COMMAND could not be started: {exc.strerror or exc}"
                log.error("[comfyui %s] %s (%s)", self.label, self.reason, shlex.join(self.argv))
                if not spawned.done():
                    spawned.set_result(None)
                proc = None
            if proc is not None:
                self._proc, self.pid = proc, proc.pid
                self.starts += 1
                self.state = "running"
                log.info(
                    "[comfyui %s] started pid %d: %s", self.label, proc.pid, shlex.join(self.argv)
                )
                if not spawned.done():
                    spawned.set_result(None)
                assert proc.stdout is not None
                await self._pump(proc.stdout)
                code = await proc.wait()
                self.pid = None
                self.last_exit = _describe_exit(code)
                if self._stopping.is_set():
                    log.info("[comfyui %s] stopped (%s)", self.label, self.last_exit)
                    break
                self.reason = self._assets_failure or f"ComfyUI exited ({self.last_exit})"
            ran = time.monotonic() - began
            failures = 1 if ran >= self.stable_after else failures + 1
            delay = backoff(failures, self.restart_delay, self.restart_max_delay, jitter=False)
            if self._assets_failure:
                delay = self.restart_max_delay  # another process holds the lock: no tight loop
            self.restarts += 1
            self.state = "backoff"
            self.next_start_at = time.monotonic() + delay
            log.error(
                "[comfyui %s] %s after %.1fs; restart %d in %.1fs",
                self.label,
                self.reason,
                ran,
                self.restarts,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            self.next_start_at = None
        self.state = "stopped"

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        """Each output line into the log; remembers an ASSETS_STARTUP_FAILED line."""
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._line(raw)
            if len(pending) > _MAX_LINE:
                self._line(pending)
                pending = b""
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")[:_MAX_LINE]
        if not text.strip():
            return
        m = _ASSETS.search(text)
        if m:
            kind = m.group("kind") or "unknown"
            self._assets_failure = f"ASSETS_STARTUP_FAILED ({kind}): " + ASSETS_HINT.replace(
                "{port}", str(URL(self.url).port or 8188)
            )
        log.info("[comfyui %s] %s", self.label, text)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
