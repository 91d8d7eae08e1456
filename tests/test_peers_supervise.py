"""Supervision of a local ComfyUI (issue 15, item 4; issue 20, item 5): the simulator runs as the
supervised child, is killed with SIGKILL mid-job and restarted, and the job completes; a command
that dies at once is retried with backoff and /health says why; ASSETS_STARTUP_FAILED is named
and not retried in a tight loop; the child stops after comfyq's own shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from support.servers import Server, settings_for, start_server
from support.workflows import workflow

from comfyq.api.context import ApiOptions

ROOT = Path(__file__).resolve().parent.parent
PY = shlex.quote(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _health(srv: Server) -> tuple[int, dict[str, Any]]:
    async with srv.session.get(srv.u("/health")) as r:
        return r.status, await r.json()


async def _until(check: Any, timeout: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = await check()
        if got:
            return got
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.05)


async def _start(tmp_path: Path, command: str, **overrides: Any) -> tuple[Server, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    values: dict[str, Any] = {
        "comfyui_command": command,
        "comfyui_workdir": str(ROOT),
        "comfyui_restart_delay": 0.2,
        "comfyui_restart_max_delay": 30.0,
        **overrides,
    }
    settings = settings_for(tmp_path / "srv", url, **values)
    return await start_server(settings, ApiOptions(heartbeat=0.5)), url


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_simulator_killed_mid_job_is_restarted_and_the_job_completes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfyq.comfyui")
    command = (
        f"{PY} -m comfyq.sim --host 127.0.0.1 --port {{port}} --node-durations ImageBlur=1.5"
        f" --progress-steps 10 --data-dir {shlex.quote(str(tmp_path / 'comfy'))}"
    )
    srv, url = await _start(tmp_path, command)
    label = url.removeprefix("http://")
    try:

        async def healthy() -> bool:
            return (await _health(srv))[0] == 200

        await _until(healthy)
        _, body = await _health(srv)
        first_pid = body["backends"][0]["process"]["pid"]
        assert body["backends"][0]["process"]["state"] == "running"
        # The child's output is in comfyq's log, prefixed with the backend.
        assert any(
            r.getMessage().startswith(f"[comfyui {label}] SIMULATOR_READY") for r in caplog.records
        )

        job = {"input": {"workflow_json": workflow(21, blur=True), "request_id": "survivor"}}
        async with srv.session.post(srv.u("/generate"), json=job) as r:
            assert r.status == 202

        async def running() -> bool:
            async with srv.session.get(srv.u("/result/survivor")) as r:
                res = await r.json()
            return res["status"] == "generating" and bool(res.get("progress"))

        await _until(running)
        os.kill(first_pid, signal.SIGKILL)  # mid-job

        async def done() -> Any:
            async with srv.session.get(srv.u("/result/survivor")) as r:
                res = await r.json()
            return res if res["status"] in ("completed", "failed", "cancelled") else None

        res = await _until(done, 120)
        assert res["status"] == "completed", res
        assert res["output"] and res["output"][0]["mimetype"] == "image/png"

        _, body = await _health(srv)
        proc = body["backends"][0]["process"]
        assert proc["restarts"] == 1 and proc["starts"] == 2
        assert proc["last_exit"] == "killed by SIGKILL"
        assert proc["state"] == "running" and proc["pid"] != first_pid
        async with srv.session.get(srv.u("/metrics")) as r:
            metrics = await r.text()
        assert f'comfyq_comfyui_restarts_total{{backend="{url}"}} 1.0' in metrics
        assert f'comfyq_comfyui_process_running{{backend="{url}"}} 1.0' in metrics
        second_pid = proc["pid"]
    finally:
        await srv.close()
    # Stopped after comfyq's own graceful shutdown, and reaped.
    assert _gone(second_pid)
    assert any("stopped (" in r.getMessage() for r in caplog.records)


async def test_a_command_that_exits_at_once_is_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="comfyq.comfyui")
    command = f"{PY} -c \"import sys; print('no GPU here'); sys.exit(3)\""
    srv, _ = await _start(tmp_path, command, comfyui_restart_max_delay=0.8)
    try:

        async def restarted_four_times() -> Any:
            status, body = await _health(srv)
            proc = body["backends"][0]["process"]
            return (status, body, proc) if proc["restarts"] >= 4 else None

        status, body, proc = await _until(restarted_four_times)
        assert status == 503
        assert proc["last_exit"] == "exit code 3"
        assert "ComfyUI exited (exit code 3)" in proc["reason"]
        assert "exit code 3" in body["reason"]  # /health says why
        delays = [
            float(m.group(1))
            for r in caplog.records
            if (m := re.search(r"restart \d+ in ([0-9.]+)s", r.getMessage()))
        ]
        assert delays[:4] == [0.2, 0.4, 0.8, 0.8]  # doubling, capped
        assert any(r.getMessage().endswith("] no GPU here") for r in caplog.records)
    finally:
        await srv.close()


async def test_assets_startup_failed_is_reported_and_not_retried_in_a_tight_loop(
    tmp_path: Path,
) -> None:
    # What ComfyUI >= 0.38 does when another process holds the install's assets database.
    command = (
        f"{PY} -c \"import sys; print('ASSETS_STARTUP_FAILED: in_use (database is locked)');"
        ' sys.exit(1)"'
    )
    srv, _ = await _start(tmp_path, command)
    try:

        async def failed() -> Any:
            _, body = await _health(srv)
            proc = body["backends"][0]["process"]
            return body if proc["state"] == "backoff" else None

        body = await _until(failed)
        proc = body["backends"][0]["process"]
        assert proc["reason"].startswith("ASSETS_STARTUP_FAILED (in_use)")
        assert "--database-url" in proc["reason"] and "--disable-assets" in proc["reason"]
        assert "ASSETS_STARTUP_FAILED" in body["reason"]
        # Retried only at the longest delay (30 s here), not at the first one (0.2 s).
        assert proc["restarts"] == 1 and proc["next_start_in"] > 10
    finally:
        await srv.close()


async def test_several_local_backends_need_a_port_placeholder(tmp_path: Path) -> None:
    from comfyq.config import ConfigError
    from comfyq.services import Services

    settings = settings_for(
        tmp_path,
        "",
        comfyui_backends=["http://127.0.0.1:8188", "http://127.0.0.1:8189"],
        comfyui_command="python main.py --port 8188",
    )
    with pytest.raises(ConfigError, match=r"\{port\}"):
        Services(settings)
    settings = settings_for(
        tmp_path,
        "",
        comfyui_backends=["http://127.0.0.1:8188", "http://127.0.0.1:8189"],
        comfyui_command="python main.py --port {port} --database-url sqlite:///user/c-{port}.db",
    )
    argvs = [s.argv for s in Services(settings).supervisors]
    assert argvs == [
        ["python", "main.py", "--port", "8188", "--database-url", "sqlite:///user/c-8188.db"],
        ["python", "main.py", "--port", "8189", "--database-url", "sqlite:///user/c-8189.db"],
    ]
