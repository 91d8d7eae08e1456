"""Warm-up and readiness (issue 15, item 5): the warm-up workflow runs on a backend after every
(re)start before any job does; ``/ready`` is 200 only with a warm backend and room in the queue,
while ``/health`` keeps meaning "alive"."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.servers import Server, pause, resume, settings_for, start_server, wait_healthy
from support.workflows import workflow

from comfyq.api.context import ApiOptions
from comfyq.sim import Simulator
from comfyq.sim.promptlog import read_prompt_log
from comfyq.store.model import Stage

WARMUP = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    },
    # A placeholder is filled per run, as in jobs.
    "2": {
        "class_type": "SaveImage",
        "inputs": {"images": ["1", 0], "filename_prefix": "warmup___RANDOM_INT__"},
    },
}


def _is_warmup(record: dict[str, Any]) -> bool:
    prompt = record["prompt"]
    return any(
        str(n.get("inputs", {}).get("filename_prefix", "")).startswith("warmup_")
        for n in prompt.values()
    )


@pytest.fixture
async def logged_sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    sim = Simulator(port=0, data_dir=tmp_path / "sim", prompt_log=tmp_path / "prompts.jsonl")
    await sim.start()
    yield sim
    await sim.stop()


async def _until(check: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.05)


async def _get(srv: Server, path: str) -> tuple[int, Any]:
    async with srv.session.get(srv.u(path)) as r:
        return r.status, await r.json()


async def test_warmup_runs_before_any_job_after_every_start(
    tmp_path: Path, logged_sim: Simulator
) -> None:
    wf_file = tmp_path / "warmup.json"
    wf_file.write_text(json.dumps(WARMUP))
    # The warm-up's node is slow, so a job sent at once has to wait for it.
    logged_sim.node_durations = {"EmptyImage": 0.3}
    settings = settings_for(tmp_path / "srv", logged_sim.url, comfyui_warmup_workflow=str(wf_file))
    srv = await start_server(settings, ApiOptions(heartbeat=0.5))
    try:
        body = {"input": {"workflow_json": workflow(11), "request_id": "first-job"}}
        async with srv.session.post(srv.u("/generate/sync"), json=body) as r:
            assert r.status == 200, await r.text()
        records = read_prompt_log(tmp_path / "prompts.jsonl")
        assert _is_warmup(records[0]) and not _is_warmup(records[1])
        status, health = await _get(srv, "/health")
        assert status == 200
        backend = health["backends"][0]
        assert backend["warmups"] == 1 and "warmup_error" not in backend
        status, ready = await _get(srv, "/ready")
        assert status == 200 and ready["ready"] is True and ready["backends_warm"] == "1/1"

        # ComfyUI restarts: cold again, warmed again before the next job runs on it.
        await logged_sim.crash()
        await _until(lambda: _cold(srv))
        status, ready = await _get(srv, "/ready")
        assert status == 503 and ready["reason"]
        await logged_sim.restart()
        body = {"input": {"workflow_json": workflow(12), "request_id": "after-restart"}}
        async with srv.session.post(srv.u("/generate/sync"), json=body) as r:
            assert r.status == 200, await r.text()
        records = read_prompt_log(tmp_path / "prompts.jsonl")
        boots = sorted({rec["boot"] for rec in records})
        assert len(boots) == 2
        second = [rec for rec in records if rec["boot"] == boots[1]]
        assert _is_warmup(second[0]) and not _is_warmup(second[-1])
        status, health = await _get(srv, "/health")
        assert health["backends"][0]["warmups"] == 2
    finally:
        await srv.close()


async def _cold(srv: Server) -> bool:
    _, health = await _get(srv, "/health")
    return health["backends"][0].get("warm", True) is False


async def test_a_failing_warmup_still_lets_the_backend_take_jobs(
    tmp_path: Path, logged_sim: Simulator
) -> None:
    wf_file = tmp_path / "warmup.json"
    wf_file.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    settings = settings_for(tmp_path / "srv", logged_sim.url, comfyui_warmup_workflow=str(wf_file))
    srv = await start_server(settings, ApiOptions(heartbeat=0.5))
    try:
        await wait_healthy(srv)
        async with srv.session.post(
            srv.u("/generate/sync"), json={"input": {"workflow_json": workflow(13)}}
        ) as r:
            assert r.status == 200
        _, health = await _get(srv, "/health")
        assert "NoSuchNode" in health["backends"][0]["warmup_error"]
    finally:
        await srv.close()


async def test_ready_is_503_while_the_queue_is_full_and_health_stays_200(
    tmp_path: Path, simulator: Simulator
) -> None:
    srv = await start_server(
        settings_for(tmp_path / "srv", simulator.url, max_queue_size=1), ApiOptions()
    )
    try:
        await wait_healthy(srv)
        assert (await _get(srv, "/ready"))[0] == 200
        pause(srv, Stage.PREPROCESS)
        async with srv.session.post(
            srv.u("/generate"), json={"input": {"workflow_json": workflow(14)}}
        ) as r:
            assert r.status == 202
        status, ready = await _get(srv, "/ready")
        assert status == 503 and "queue is full" in ready["reason"]
        assert ready["queues"]["unfinished"] == 1
        assert (await _get(srv, "/health"))[0] == 200  # alive, just not taking more
        resume(srv, Stage.PREPROCESS)

        async def drained() -> bool:
            return (await _get(srv, "/ready"))[0] == 200

        await _until(drained)
        srv.services.listening = False  # as between `comfyq serve`'s start and its listener
        status, ready = await _get(srv, "/ready")
        assert status == 503 and "listener" in ready["reason"]
    finally:
        await srv.close()


async def test_a_bad_warmup_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    from comfyq.config import ConfigError
    from comfyq.services import Services

    bad = tmp_path / "warmup.json"
    bad.write_text('{"1": {"inputs": {}}}')
    with pytest.raises(ConfigError, match="class_type"):
        Services(settings_for(tmp_path, "http://127.0.0.1:9", comfyui_warmup_workflow=str(bad)))
