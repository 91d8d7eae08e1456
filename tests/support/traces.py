"""The recorded ComfyUI traffic (shared/comfyui-protocol) for the trace-replay tests.

Imported by those test modules only (not a plugin): without the recordings, importing it skips
the module that asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyq.sim import Simulator
from support.sim import WsRecorder, find_traces, run_workflow
from support.sim import post_prompt as sim_post_prompt

_found = find_traces(Path(__file__).resolve().parent)
if _found is None:  # pragma: no cover - CI has shared/ beside the clone
    pytest.skip("recorded traces (shared/comfyui-protocol) not found", allow_module_level=True)
TRACES: Path = _found


def trace(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((TRACES / name).read_text())
    return loaded


def recorded_types(t: dict[str, Any]) -> list[str]:
    return list(t["ws_message_types_in_order"])


async def run_traced(
    http: aiohttp.ClientSession, sim: Simulator, name: str, first: dict[str, Any] | None = None
) -> tuple[WsRecorder, str, dict[str, Any]]:
    """Run the trace's workflow with our own client id; returns (recorder, prompt_id, trace)."""
    t = trace(name)
    rec, pid = await run_workflow(http, sim.url, t["workflow"], "client-under-test", first)
    return rec, pid, t


async def post_prompt(
    http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any], status: int = 200
) -> dict[str, Any]:
    return await sim_post_prompt(http, sim.url, body, status)
