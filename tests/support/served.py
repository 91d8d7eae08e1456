"""A real ``comfyq serve --simulate`` in a subprocess on an ephemeral loopback port, with its log
captured to a file, for the fuzz and hostile-input tests.

"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfyq.logs import WATCHED_TOKENS

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"comfyq listening on http://127\.0\.0\.1:(\d+)")
_TOKEN = re.compile("|".join(re.escape(t) for t in WATCHED_TOKENS), re.IGNORECASE)
# comfyq's own signal lines: the token starts the message of a comfyq logger.
_SIGNAL = re.compile(
    r"^\S+ \S+ (?:INFO|WARNING|ERROR|CRITICAL)\s+comfyq[\w.]*: "
    r"(?:BACKENDS_READY(?:_TIMEOUT)?|BACKEND_UNRECOVERABLE|Application startup failed):"
)


@dataclass
class Served:
    """A running ``comfyq serve --simulate``."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    root: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def forged_lines(self) -> list[str]:
        """Log lines carrying a watched token that are not comfyq's own signal lines."""
        return [
            line
            for line in self.log().splitlines()
            if _TOKEN.search(line) and not _SIGNAL.match(line)
        ]

    def signal_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if _SIGNAL.match(line)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_serve(root: Path, *, api_key: str | None = None, **env: Any) -> Served:
    """Start the server with its files under ``root``; returns once BACKENDS_READY is logged."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "serve.log"
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "PYTHONPATH": str(ROOT),
        "COMFYQ_CONFIG": str(root / "none.toml"),
        "COMFYQ_DATABASE": str(root / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(root / "outputs"),
        "COMFYQ_CACHE_DIR": str(root / "cache"),
        "API_HOST": "127.0.0.1",
        "API_PORT": "0",
        "MAX_QUEUE_SIZE": "100000",
        "COMFYQ_SHUTDOWN_GRACE": "2",
    }
    if api_key:
        environ["COMFYQ_API_KEYS"] = api_key
    environ.update({k: str(v) for k, v in env.items()})
    out = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "comfyq", "serve", "--simulate"],
        cwd=root,
        env=environ,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    deadline = time.monotonic() + 60
    url = None
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = _LISTENING.search(text)
        if m:
            url = f"http://127.0.0.1:{m.group(1)}"
        if url and "BACKENDS_READY:" in text:
            return Served(proc, url, log_path, root, api_key)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"comfyq serve did not start:\n{log_path.read_text(errors='replace')}")
