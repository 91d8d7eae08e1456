"""kill -9 of ``comfyq serve`` during a Comfy API v2 job whose event stream is open: the stream
breaks without ever reporting a terminal status, and after the restart the job succeeds, its
output downloads, its Idempotency-Key is still spent, and /result agrees with /api/v2."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from support.v2 import check, parse_sse
from test_crash import free_port, start_server, wait_http

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


@pytest.fixture
def slow_sim(tmp_path: Path) -> Any:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "comfyq.sim",
            "--port",
            str(port),
            "--node-durations",
            "ImageBlur=2.0",
            "--progress-steps",
            "10",
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


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 60, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.timeout(180)
def test_kill_9_with_a_v2_stream_open(tmp_path: Path, slow_sim: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = start_server(tmp_path, slow_sim, port, log)
    try:
        wait_http(base + "/health", proc=proc)
        r = requests.post(
            base + "/api/v2/assets",
            files={"file": ("in.png", png(), "image/png")},
            data={"content_type": "image/png", "file_path": "in.png"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        asset = check("Asset", r.json())
        ref = {"__type": "core/ASSET", "info": {"id": asset["id"]}}
        wf: dict[str, Any] = {
            "1": {"class_type": "LoadImage", "inputs": {"image": ref}},
            "4": {
                "class_type": "ImageBlur",
                "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
            },
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": "k9"},
            },
        }
        r = requests.post(
            base + "/api/v2/jobs",
            json={"workflow": wf},
            headers={"Idempotency-Key": "k9"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        job = check("Job", r.json())

        frames: list[tuple[str, dict[str, Any]]] = []
        running = threading.Event()
        ended = threading.Event()

        def read_stream() -> None:
            buf = ""
            try:
                with requests.get(base + job["urls"]["events"], stream=True, timeout=30) as s:
                    for chunk in s.iter_content(chunk_size=None, decode_unicode=True):
                        buf += chunk if isinstance(chunk, str) else chunk.decode()
                        *done, buf = buf.split("\n\n")
                        for f in parse_sse("\n\n".join(done) + "\n\n"):
                            frames.append(f)
                            if f[0] == "progress" and f[1].get("steps"):
                                running.set()  # the sampler-like node is stepping
            except (requests.RequestException, OSError):
                pass  # the server died under the stream: expected
            finally:
                ended.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert running.wait(60), frames
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert ended.wait(30)
        statuses = [d["status"] for e, d in frames if e == "status"]
        assert "running" in statuses and not TERMINAL & set(statuses), statuses

        proc = start_server(tmp_path, slow_sim, port, log)
        wait_http(base + "/health", proc=proc)
        with requests.get(base + job["urls"]["events"], stream=True, timeout=60) as s:
            after = parse_sse(s.text)
        assert after[-1][0] == "status" and after[-1][1]["status"] == "succeeded", after
        final = check("Job", requests.get(base + job["urls"]["self"], timeout=10).json())
        assert final["status"] == "succeeded"
        (out,) = final["outputs"]
        data = requests.get(out["url"], timeout=10).content
        assert len(data) == out["size_bytes"] and data[:4] == b"\x89PNG"
        assert data == (tmp_path / "sim" / "output" / out["name"]).read_bytes()
        res = requests.get(f"{base}/result/{job['id']}", timeout=10).json()
        assert res["status"] == "completed" and [o["filename"] for o in res["output"]] == [
            out["name"]
        ]
        again = requests.post(
            base + "/api/v2/jobs",
            json={"workflow": wf},
            headers={"Idempotency-Key": "k9"},
            timeout=10,
        )
        assert again.status_code == 422
        assert json.loads(again.text)["error"]["code"] == "idempotency_key_reuse"
    finally:
        proc.kill()
        proc.wait()
