"""Crash safety: ``comfyq serve`` killed with SIGKILL at random moments, restarted on the same file.

Every accepted job must end in exactly one terminal state with attempts <= max_attempts, and the
outputs of completed jobs must be on disk. The simulator runs in its own process so that it
survives comfyq's deaths, as ComfyUI would.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfyq.store import NewJob, open_store


def workflow(n: int) -> dict[str, object]:
    # A different colour per job: ComfyUI would serve identical prompts from its cache at once.
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": n},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "crash"},
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (OSError, http.client.HTTPException):  # not listening yet, or cut off mid-start
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer in {timeout}s")


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "comfyq.sim",
            "--port",
            str(port),
            "--node-duration",
            "0.05",
            "--data-dir",
            str(tmp_path / "sim"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/system_stats", proc=proc)
        yield url
    finally:
        proc.kill()
        proc.wait()


def start_server(tmp_path: Path, sim_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "COMFYQ_DATABASE": str(tmp_path / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(tmp_path / "out"),
        "COMFYQ_CACHE_DIR": str(tmp_path / "cache"),
        "COMFYUI_API_BASE": sim_url,
        "API_PORT": str(port),
        "COMFYQ_LEASE_SECONDS": "3",
        "COMFYQ_CLAIM_POLL_INTERVAL": "0.2",
        "COMFYQ_SHUTDOWN_GRACE": "2",
        "COMFYQ_RETRY_BASE_DELAY": "0.2",
        "COMFYQ_BACKEND_PROBE_INTERVAL": "0.5",
        "COMFYQ_CONFIG": str(tmp_path / "none.toml"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "comfyq", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def submit(db: Path, ids: list[str]) -> None:
    store = open_store(db, owner="test-client")
    await store.open()
    try:
        for job_id in ids:
            n = int.from_bytes(job_id.encode(), "big") % 16_000_000
            await store.create(
                NewJob(
                    id=job_id,
                    payload={"input": {"workflow_json": workflow(n)}},
                    payload_hash=job_id,
                    max_attempts=3,
                ),
                10_000,
            )
    finally:
        await store.close()


@pytest.mark.timeout(240)
def test_kill_9_at_random_moments_loses_nothing(tmp_path: Path, simulator: str) -> None:
    rng = random.Random(1234)
    port = free_port()
    log = tmp_path / "server.log"
    db = tmp_path / "q.db"
    accepted: list[str] = []
    for rnd in range(6):
        proc = start_server(tmp_path, simulator, port, log)
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        ids = [f"r{rnd}-{i}" for i in range(12)]
        asyncio.run(submit(db, ids))
        accepted += ids
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Last start: let everything finish, then a graceful stop must exit 0.
    proc = start_server(tmp_path, simulator, port, log)
    wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    conn = sqlite3.connect(db)
    end = time.monotonic() + 90
    while time.monotonic() < end:
        (left,) = conn.execute(
            "SELECT count(*) FROM jobs WHERE state IN ('pending', 'running')"
        ).fetchone()
        if left == 0:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]

    rows = {r[0]: r[1:] for r in conn.execute("SELECT id, state, attempts, max_attempts FROM jobs")}
    assert sorted(rows) == sorted(accepted), "a job was lost"
    states = {r[0] for r in rows.values()}
    assert states == {"completed"}, {k: v for k, v in rows.items() if v[0] != "completed"}
    assert all(a <= m for _, a, m in rows.values())
    terminal_events = dict(
        conn.execute(
            "SELECT job_id, count(*) FROM job_events WHERE to_state IN ('completed',"
            " 'failed', 'cancelled')"
            " GROUP BY job_id"
        )
    )
    assert terminal_events == {i: 1 for i in accepted}, "a job reached a terminal state twice"
    for job_id, path in conn.execute("SELECT job_id, local_path FROM outputs"):
        assert Path(path).is_file() and Path(path).parent.name == job_id
    (with_output,) = conn.execute("SELECT count(DISTINCT job_id) FROM outputs").fetchone()
    assert with_output == len(accepted)
    # No prompt ran twice without cause: at most one extra prompt per kill (a kill between recording
    # the prompt id and sending it), and every job's recorded prompt is one ComfyUI ran to success.
    import json
    import urllib.request

    with urllib.request.urlopen(f"{simulator}/history?max_items=100000", timeout=10) as r:
        history = json.load(r)
    assert len(accepted) <= len(history) <= len(accepted) + 6
    for (prompt_id,) in conn.execute("SELECT comfy_prompt_id FROM jobs"):
        assert history[prompt_id]["status"]["status_str"] == "success"
    text = log.read_text()
    assert "resumed" in text  # some rounds died with work in flight and the next start picked it up


def test_second_server_on_the_same_file_is_refused(tmp_path: Path, simulator: str) -> None:
    log = tmp_path / "server.log"
    first = start_server(tmp_path, simulator, free_port(), log)
    try:
        for _ in range(400):  # until the first server holds the lock
            lock = tmp_path / "q.db.lock"
            if lock.exists() and lock.read_text().strip():
                break
            time.sleep(0.05)
        second = start_server(tmp_path, simulator, free_port(), tmp_path / "second.log")
        assert second.wait(timeout=30) == 2
        out = (tmp_path / "second.log").read_text()
        assert "another comfyq server" in out and "Application startup failed" in out
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
