"""examples/v2_sdk.py runs as written against comfyq, and unchanged against the official
comfy-api-proxy in front of the same simulated ComfyUI (the issue's "done when")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.servers import ThreadServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "v2_sdk.py"
PROXY = Path(sys.executable).with_name("comfy-api-proxy")


def run_example(base_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMFY_BASE_URL": base_url}
    env.pop("COMFY_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(EXAMPLE)],
        check=False,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_example_against_comfyq_and_the_official_proxy(tmp_path: Path) -> None:
    srv = ThreadServer(tmp_path / "srv").start()
    try:
        done = run_example(srv.url, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "status succeeded" in done.stdout and "  output " in done.stdout
        saved = [line for line in done.stdout.splitlines() if line.startswith("saved ")]
        name = Path(saved[0].split()[1]).name
        assert (tmp_path / name).read_bytes() == (srv.sim.data_dir / "output" / name).read_bytes()  # type: ignore[operator]

        port = free_port()
        proxy = subprocess.Popen(
            [
                str(PROXY),
                "run",
                "--comfyui",
                srv.sim.url,
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path / "proxy"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            end = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < end, "the proxy did not start"
                    time.sleep(0.1)
            (tmp_path / "via_proxy").mkdir()
            via = run_example(f"http://127.0.0.1:{port}", tmp_path / "via_proxy")
            assert via.returncode == 0, via.stderr
            assert "status succeeded" in via.stdout
        finally:
            proxy.terminate()
            proxy.wait(10)
    finally:
        srv.stop()
