"""The simulator's prompt log: every accepted POST /prompt on file, across crashes and kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyq.sim import Simulator
from comfyq.sim.generation import OLD
from comfyq.sim.promptlog import read_prompt_log


@pytest.fixture
def comfyui_version() -> str:
    """The recorded 0.3.64 traffic is this file's reference (see test_simulator_newer for 0.38)."""
    return OLD


def invert(prefix: str, color: int) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/prompt", json=body) as r:
        return r.status, await r.json()


async def test_accepted_prompts_are_logged_across_a_crash(tmp_path: Path) -> None:
    log = tmp_path / "prompts.jsonl"
    sim = Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", prompt_log=log)
    await sim.start()
    try:
        async with aiohttp.ClientSession() as http:
            s1, b1 = await post(
                http, sim.url, {"prompt": invert("a", 1), "client_id": "cid", "prompt_id": "p-1"}
            )
            bad = invert("b", 2)
            bad["3"]["inputs"]["images"] = ["9", 0]  # a link to a missing node: 400, not accepted
            s_bad, _ = await post(http, sim.url, {"prompt": bad})
            await sim.crash()
            await sim.start()
            s2, b2 = await post(http, sim.url, {"prompt": invert("c", 3)})
    finally:
        await sim.stop()
    assert (s1, s_bad, s2) == (200, 400, 200)
    records = read_prompt_log(log)
    assert [r["prompt_id"] for r in records] == ["p-1", b2["prompt_id"]]
    assert records[0]["client_id"] == "cid" and records[1]["client_id"] is None
    assert records[0]["prompt"]["3"]["inputs"]["filename_prefix"] == "a"
    assert records[0]["number"] == b1["number"] and records[1]["number"] == b2["number"]
    assert records[0]["boot"] != records[1]["boot"]  # two incarnations of the simulated process
    assert sim.prompts_received == ["p-1", b2["prompt_id"]]


async def test_no_log_without_the_option(tmp_path: Path) -> None:
    async with (
        Simulator(comfyui_version=OLD, data_dir=tmp_path / "c") as sim,
        aiohttp.ClientSession() as http,
    ):
        status, _ = await post(http, sim.url, {"prompt": invert("a", 1)})
    assert status == 200
    assert not list(tmp_path.rglob("*.jsonl"))


async def test_cli_prompt_log_survives_kill_9(tmp_path: Path) -> None:
    log = tmp_path / "sim" / "prompts.jsonl"
    root = Path(__file__).resolve().parents[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyq.sim",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "sim"),
        "--node-duration",
        "30",
        "--prompt-log",
        str(log),
        stdout=asyncio.subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        url = line.split()[1]
        async with aiohttp.ClientSession() as http:
            ids = [
                (await post(http, url, {"prompt": invert("k", n)}))[1]["prompt_id"]
                for n in range(3)
            ]
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-prompt (30 s nodes): nothing gets to flush or close
        await asyncio.wait_for(proc.wait(), 30)
    assert [r["prompt_id"] for r in read_prompt_log(log)] == ids
    assert len({r["pid"] for r in read_prompt_log(log)}) == 1
