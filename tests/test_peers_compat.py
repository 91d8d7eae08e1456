"""Compatibility fixes found with Vast.ai's serverless worker (issue 15, item 7): output entries
always carry every documented field, ``comfyui_response`` is opt-in as in the original wrapper,
and BACKENDS_READY is logged only once the listener accepts connections."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from support.servers import MakeServer, wait_healthy
from support.workflows import INVERT_WORKFLOW

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = {
    "filename",
    "local_path",
    "url",
    "type",
    "subfolder",
    "node_id",
    "output_type",
    "mimetype",
    "size",
}


async def _sync(srv: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    async with srv.session.post(srv.u("/generate/sync"), json=body, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_output_entries_always_carry_every_documented_field(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    res = await _sync(srv, {"input": {"workflow_json": INVERT_WORKFLOW}})
    assert res["output"], res
    for entry in res["output"]:
        assert DOCUMENTED <= set(entry), sorted(DOCUMENTED - set(entry))
        assert entry["subfolder"] == ""  # present although empty, as CONTRACT.md shows it
    # The same entries through the read endpoints.
    async with srv.session.get(srv.u(f"/result/{res['id']}")) as r:
        again = await r.json()
    assert all(DOCUMENTED <= set(e) for e in again["output"])
    async with srv.session.get(srv.u("/jobs")) as r:
        listed = (await r.json())["jobs"]
    assert all(DOCUMENTED <= set(e) for j in listed for e in j["output"])


async def test_comfyui_response_is_opt_in_by_header(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    plain = await _sync(srv, {"input": {"workflow_json": INVERT_WORKFLOW}})
    assert plain["comfyui_response"] == {}
    body = {"input": {"workflow_json": {**INVERT_WORKFLOW, "9": INVERT_WORKFLOW["3"]}}}
    full = await _sync(srv, body, {"X-Include-ComfyUI-Response": "true"})
    resp = full["comfyui_response"]
    # ComfyUI's /history entry for the prompt, plus execution_details.
    assert set(resp) >= {"prompt", "outputs", "status", "execution_details"}
    details = resp["execution_details"]
    assert details["completed"] is True
    assert details["prompt_id"] == resp["prompt"][1]
    assert "3" in resp["outputs"]
    # It stays on the job for later reads.
    async with srv.session.get(srv.u(f"/result/{full['id']}")) as r:
        assert (await r.json())["comfyui_response"] == resp


async def test_comfyui_response_setting_default_and_header_opt_out(
    make_server: MakeServer,
) -> None:
    srv = await make_server(include_comfyui_response=True)
    await wait_healthy(srv)
    wf = {**INVERT_WORKFLOW}
    wf["1"] = {**wf["1"], "inputs": {**wf["1"]["inputs"], "color": 7}}
    on = await _sync(srv, {"input": {"workflow_json": wf}})
    assert on["comfyui_response"]["execution_details"]["completed"] is True
    wf["1"]["inputs"]["color"] = 8
    # Any value but a true one opts out, even with the operator default on.
    off = await _sync(srv, {"input": {"workflow_json": wf}}, {"X-Include-ComfyUI-Response": "0"})
    assert off["comfyui_response"] == {}


# --- BACKENDS_READY ordering, as Vast's worker sees it ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_and_connect_at_ready(tmp: Path) -> tuple[int, str]:
    """Start ``comfyq serve --simulate``; the moment BACKENDS_READY is logged, send the warm-up
    request Vast's worker sends. Returns (status of that request, the lines read)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMFYQ_CONFIG": str(tmp / "none.toml")}
    for name in list(env):
        if name.startswith("COMFYQ_") and name != "COMFYQ_CONFIG":
            del env[name]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "comfyq",
            "--database",
            str(tmp / "q.db"),
            "--set",
            f"output_dir={tmp / 'out'}",
            "--set",
            f"cache_dir={tmp / 'cache'}",
            "--set",
            "backend_probe_interval=0.05",
            "serve",
            "--simulate",
            "--port",
            str(port),
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "BACKENDS_READY" in line:
                break
        else:
            raise AssertionError("comfyq exited before BACKENDS_READY:\n" + "".join(seen))
        body = {"input": {"workflow_json": INVERT_WORKFLOW}}
        r = requests.post(f"http://127.0.0.1:{port}/generate/sync", json=body, timeout=60)
        return r.status_code, "".join(seen)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("run", range(20))
def test_backends_ready_only_once_the_listener_accepts(tmp_path: Path, run: int) -> None:
    """Started 20 times, comfyq answers a request sent the instant BACKENDS_READY appears."""
    status, lines = _start_and_connect_at_ready(tmp_path)
    assert status == 200, lines
    # The listening line comes first; the signal line is the last one read.
    listening = lines.index("comfyq listening on")
    assert listening < lines.index("BACKENDS_READY"), lines
