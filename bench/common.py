"""Helpers shared by the benchmarks: ports, quantiles, the --json option, and the subprocesses
(simulator, ``comfyq serve``) that the over-HTTP benchmarks talk to."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/n of latencies given in seconds, in milliseconds."""
    n = len(seconds)
    return {
        "n": n,
        "p50": pct(seconds, 0.5) * 1000,
        "p90": pct(seconds, 0.9) * 1000,
        "p99": pct(seconds, 0.99) * 1000,
        "mean": sum(seconds) / n * 1000 if n else math.nan,
    }


def add_json_arg(ap: argparse.ArgumentParser) -> None:
    """The ``--json PATH`` option every benchmark offers for ``python -m bench``."""
    ap.add_argument(
        "--json", metavar="PATH", help="also write the figures to PATH as a JSON object"
    )


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    """Write ``figures`` to ``path`` (when given); NaN becomes null so any JSON reader takes it."""
    if not path:
        return

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".part")
    tmp.write_text(json.dumps(clean(figures), indent=1))
    tmp.replace(path)


def rss_mb(pid: int) -> float:
    """Resident memory of one process (all its threads), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by a process (this one when ``pid`` is None)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Block until ``url`` answers 200, or exit if ``proc`` dies first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout}s")


# The process id of each running simulator() by its base URL (for CPU accounting).
SIM_PIDS: dict[str, int] = {}


@contextmanager
def simulator(root: Path, durations: str = "", steps: int = 0) -> Iterator[str]:
    """A ComfyUI simulator in a process of its own; yields its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "comfyq.sim",
        "--port",
        str(port),
        "--data-dir",
        str(root / "sim"),
    ]
    if durations:
        cmd += ["--node-durations", durations]
    if steps:
        cmd += ["--progress-steps", str(steps)]
    with http_process(cmd, port, "/system_stats") as (url, pid):
        SIM_PIDS[url] = pid
        try:
            yield url
        finally:
            SIM_PIDS.pop(url, None)


@contextmanager
def http_process(cmd: list[str], port: int, probe: str) -> Iterator[tuple[str, int]]:
    """A quiet HTTP server in a process of its own, listening on ``port``: yields (base URL,
    pid) once ``probe`` answers 200; stopped on exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + probe, proc)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def server(
    root: Path, backend: str, argv: list[str] | None = None, **env: str
) -> Iterator[tuple[str, int]]:
    """``comfyq serve`` in a subprocess with its files under ``root``; yields (URL, pid).

    ``argv`` replaces the command (e.g. the profiling launcher); the environment is the same."""
    port = free_port()
    full = {
        **os.environ,
        "COMFYQ_CONFIG": str(root / "none.toml"),
        "COMFYQ_DATABASE": str(root / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(root / "out"),
        "COMFYQ_CACHE_DIR": str(root / "cache"),
        "COMFYUI_API_BASE": backend,
        "API_PORT": str(port),
        "API_LOG_LEVEL": "warning",
        "MAX_QUEUE_SIZE": "1000000",
        **env,
    }
    log = (root / "server.log").open("ab")
    proc = subprocess.Popen(
        argv or [sys.executable, "-m", "comfyq", "serve"],
        env=full,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/queue-info", proc)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
