"""A real ``comfyq serve --simulate`` on loopback and Debian's Chromium, for the dashboard tests.

The browser is Playwright's Chromium driver with the system's ``/usr/bin/chromium`` (Playwright's
own browser downloads cannot be fetched here; ``make sysdeps`` installs the Debian package when it
is missing and the user is root). Without a browser the tests skip, unless
``COMFYQ_REQUIRE_BROWSER=1`` (CI) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("COMFYQ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
ROOT = Path(__file__).resolve().parents[2]


def browser_or_skip() -> None:
    """Skip (or, with COMFYQ_REQUIRE_BROWSER=1, fail) when Chromium or Playwright is missing."""
    why = None
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium, or make sysdeps as root)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "playwright (python) is not installed"
    if why is None:
        return
    if os.environ.get("COMFYQ_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (COMFYQ_REQUIRE_BROWSER=1) but {why}")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``python -m comfyq serve --simulate`` as a subprocess with its files under ``root``."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "COMFYQ_CONFIG": str(root / "absent.toml"),
            "COMFYQ_DATABASE": str(root / "q.db"),
            "COMFYQ_OUTPUT_DIR": str(root / "out"),
            "COMFYQ_CACHE_DIR": str(root / "cache"),
            "API_PORT": str(self.port),
            "COMFYQ_SHUTDOWN_GRACE": "0.5",
            "COMFYQ_BACKEND_PROBE_INTERVAL": "0.2",
            "COMFYQ_RETRY_BASE_DELAY": "0.1",
            **env,
        }
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self, timeout: float = 30) -> Serve:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comfyq", "serve", "--simulate"],
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line)
                if "comfyq listening on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or proc.poll() is not None:
            raise AssertionError("comfyq did not start:\n" + "".join(self.lines[-30:]))
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError("comfyq did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def call(
        self, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_final(self, job_id: str, key: str | None = None, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, res = self.call("GET", f"/result/{job_id}", key=key)
            if status == 200 and res["status"] in ("completed", "failed", "cancelled"):
                return str(res["status"])
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish")
