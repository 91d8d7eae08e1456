"""Several real ``comfyq serve`` processes on one Postgres database, each with its own simulator
process, for the cluster tests, the chaos run and the benchmarks.

Everything is a real process on loopback: a database of its own per run (created and dropped
here), simulators that outlive the comfyq processes they serve (as ComfyUI would), and instances
killed with SIGKILL and started again under the same name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DEFAULT_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
_LISTENING = re.compile(rb"comfyq listening on (http://[0-9.]+:\d+)")
_SIM_READY = re.compile(rb"SIMULATOR_READY (http://[0-9.]+:\d+)")


def admin_url() -> str:
    """A URL of the Postgres server to create test databases on (COMFYQ_TEST_POSTGRES if set)."""
    return os.environ.get("COMFYQ_TEST_POSTGRES") or DEFAULT_ADMIN


def _with_db(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


def create_database(prefix: str = "comfyq_cluster") -> str:
    """A new, empty database on the test server; its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _with_db(admin_url(), name)


def drop_database(url: str) -> None:
    name = url.partition("?")[0].rpartition("/")[2]
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _wait_line(
    log: Path, pattern: re.Pattern[bytes], proc: subprocess.Popen[bytes], since: int, timeout: float
) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        data = log.read_bytes()[since:] if log.exists() else b""
        m = pattern.search(data)
        if m:
            return m.group(1).decode()
        if proc.poll() is not None:
            raise RuntimeError(
                f"{log.name}: exited with {proc.returncode}:\n"
                + data[-3000:].decode(errors="replace")
            )
        time.sleep(0.05)
    raise RuntimeError(f"{log.name}: not ready within {timeout}s")


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    url: str = ""
    starts: int = 0

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Cluster:
    """Simulators and comfyq instances under one folder, on one database."""

    root: Path
    database: str
    env: dict[str, str] = field(default_factory=dict)  # extra settings for every instance
    sims: dict[str, Proc] = field(default_factory=dict)
    instances: dict[str, Proc] = field(default_factory=dict)

    def start_sim(self, name: str, *, node_duration: float = 0.05, progress_steps: int = 3) -> str:
        log = self.root / f"sim-{name}.log"
        argv = [
            sys.executable,
            "-m",
            "comfyq.sim",
            "--port",
            "0",
            "--node-duration",
            str(node_duration),
            "--progress-steps",
            str(progress_steps),
            "--data-dir",
            str(self.root / f"sim-{name}"),
        ]
        p = Proc(name, argv, dict(os.environ), log)
        self.sims[name] = p
        self._spawn(p)
        p.url = _wait_line(log, _SIM_READY, p.popen, 0, 60)  # type: ignore[arg-type]
        return p.url

    def start_instance(self, name: str, backends: list[str], **settings: str) -> str:
        """Start ``comfyq serve`` named ``name``; its base URL once it listens and is healthy."""
        env = {
            **os.environ,
            "COMFYQ_CONFIG": str(self.root / "none.toml"),
            "COMFYQ_DATABASE": self.database,
            "COMFYQ_INSTANCE_NAME": name,
            "COMFYQ_OUTPUT_DIR": str(self.root / name / "outputs"),
            "COMFYQ_CACHE_DIR": str(self.root / name / "cache"),
            "COMFYUI_BACKENDS": ",".join(backends),
            "API_HOST": "127.0.0.1",
            "API_PORT": "0",
            "COMFYQ_LEASE_SECONDS": "3",
            "COMFYQ_CLAIM_POLL_INTERVAL": "60",  # wake-ups must come from the other instances
            "COMFYQ_SHUTDOWN_GRACE": "2",
            "COMFYQ_RETRY_BASE_DELAY": "0.2",
            "COMFYQ_BACKEND_PROBE_INTERVAL": "0.5",
            "COMFYQ_INSTANCE_HEARTBEAT": "1",
            "COMFYQ_URL_ALLOWLIST": "127.0.0.1",
            "MAX_QUEUE_SIZE": "10000",
            **self.env,
            **{k if k.isupper() else "COMFYQ_" + k.upper(): v for k, v in settings.items()},
        }
        (self.root / name).mkdir(parents=True, exist_ok=True)
        p = Proc(name, [sys.executable, "-m", "comfyq", "serve"], env, self.root / f"{name}.log")
        self.instances[name] = p
        return self.restart(name)

    def restart(self, name: str) -> str:
        p = self.instances[name]
        since = p.log.stat().st_size if p.log.exists() else 0
        self._spawn(p, cwd=self.root / name)
        p.url = _wait_line(p.log, _LISTENING, p.popen, since, 120)  # type: ignore[arg-type]
        return p.url

    def _spawn(self, p: Proc, cwd: Path | None = None) -> None:
        p.starts += 1
        p.popen = subprocess.Popen(
            p.argv,
            env=p.env,
            cwd=cwd or self.root,
            stdout=p.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.instances[name]
        if p.popen is not None and p.popen.poll() is None:
            p.popen.send_signal(sig)
            p.popen.wait(timeout=60)

    def stop(self, name: str) -> int:
        """SIGTERM and wait: the exit code."""
        p = self.instances[name]
        assert p.popen is not None
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
        return p.popen.wait(timeout=60)

    def close(self) -> None:
        for p in [*self.instances.values(), *self.sims.values()]:
            if p.popen is not None and p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log.name}\n{p.log.read_text(errors='replace')[-4000:]}"
            for p in self.instances.values()
            if p.log.exists()
        )


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb) that the run may stop and start."""

    def __init__(self, root: Path, *, settings: str = "") -> None:
        self.data = root / "pgdata"
        self.port = free_port()
        self.settings = settings  # extra postgresql.conf lines
        self.log = root / "postgres.log"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def available() -> bool:
        return (PG_BIN / "initdb").exists() and (
            os.geteuid() != 0 or shutil.which("runuser") is not None
        )

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.data.parent, "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\nmax_connections = 200\nfsync = on\n" + self.settings
            )
        self.up()
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def up(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start")

    def down(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def cpu_seconds(self) -> float:
        """CPU time the server has used: the postmaster, its live children, and (reaped into the
        postmaster's counters) the children that have exited."""
        tick = os.sysconf("SC_CLK_TCK")
        head = (self.data / "postmaster.pid").read_text().split()[0]
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            pid, ppid = stat.parent.name, fields[1]
            if pid == head:
                total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
            elif ppid == head:
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.down()
        shutil.rmtree(self.data, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 30.0) -> Any:
    import json

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)
