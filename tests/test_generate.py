"""The generate stage end to end through Services, with the simulator as ComfyUI over real sockets:
errors kept whole, ComfyUI restarts, cancel, deadlines, several backends, all backends down."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.sim import wait_history

from comfyq.config import Settings
from comfyq.services import Services
from comfyq.sim import Simulator
from comfyq.sim.generation import OLD, VERSIONS
from comfyq.store import Job, NewJob
from comfyq.store.model import State


@pytest.fixture(params=VERSIONS)
def comfyui_version(request: pytest.FixtureRequest) -> str:
    """Every test here runs against both ComfyUI generations (the conftest ``sim`` uses this)."""
    return str(request.param)


def wf(color: int, *, blur: bool = False) -> dict[str, Any]:
    w: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": f"g{color}"},
        },
    }
    if blur:
        w["4"] = {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        }
        w["2"]["inputs"]["image"] = ["4", 0]
    return w


def make(root: Path, urls: list[str], **kw: Any) -> Services:
    s = Settings(
        database=str(root / "q.db"),
        output_dir=str(root / "out"),
        cache_dir=str(root / "cache"),
        backend_probe_interval=0.2,
        lease_seconds=5.0,
        retry_base_delay=0.05,
        retry_max_delay=0.2,
        shutdown_grace=1.0,
        generation_workers=1,
        comfyui_ws_quiet_timeout=1.0,
        **kw,
    )
    return Services(s, backends=urls)


async def submit(svc: Services, job_id: str, workflow: dict[str, Any], **kw: Any) -> None:
    await svc.store.create(
        NewJob(
            id=job_id, payload={"input": {"workflow_json": workflow}}, payload_hash=job_id, **kw
        ),
        100,
    )


async def final(svc: Services, job_id: str, timeout: float = 20) -> Job:
    sub = svc.bus.subscribe(job_id)
    try:
        async with asyncio.timeout(timeout):
            while True:
                job = await svc.store.get(job_id)
                assert job is not None
                if job.terminal:
                    return job
                await sub.get(1.0)
    finally:
        sub.close()


async def started(svc: Services, job_id: str, sim: Simulator, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            job = await svc.store.get(job_id)
            if (
                job is not None
                and job.comfy_prompt_id
                and job.comfy_prompt_id in sim.prompts_received
            ):
                return
            await asyncio.sleep(0.02)


async def test_success_records_outputs_and_progress(tmp_path: Path, sim: Simulator) -> None:
    sim.node_durations = {"ImageBlur": 0.2}
    sim.progress_steps = 3
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        sub = svc.bus.subscribe("a")
        await submit(svc, "a", wf(1, blur=True))
        job = await final(svc, "a")
        assert job.state == State.COMPLETED and job.attempts == 1
        kinds = []
        while (ev := await sub.get(0)) is not None:
            kinds.append((ev.kind, ev.data.get("node_type")))
        assert ("progress", "ImageBlur") in kinds
        (out,) = await svc.store.outputs("a")
        assert (
            out["mimetype"] == "image/png"
            and Path(out["local_path"]).read_bytes()[:4] == b"\x89PNG"
        )
        # Same workflow again: ComfyUI answers from its cache with the old file name; we get it.
        await submit(svc, "b", wf(1, blur=True))
        assert (await final(svc, "b")).state == State.COMPLETED
        (out_b,) = await svc.store.outputs("b")
        assert out_b["sha256"] == out["sha256"]
        job_b = await svc.store.get("b")
        assert job_b is not None and job_b.result is not None and job_b.result["cached_nodes"]
    finally:
        await svc.stop()


async def test_the_hand_off_stores_the_prompt_id_before_submission(
    tmp_path: Path, sim: Simulator
) -> None:
    """With a generate worker idle, the preprocess -> generate hand-off stores the prompt id and
    backend in its commit: the stage submits under them without a write of its own, and the
    prompt ComfyUI ran is the one stored."""
    svc = make(tmp_path, [sim.url])
    await svc.start()
    seen: list[str] = []
    conn = svc.store.writer._conn  # type: ignore[attr-defined]
    try:
        await svc.pool.wait_ready(5)
        await asyncio.sleep(0.05)  # every worker waiting
        conn.set_trace_callback(seen.append)
        await submit(svc, "h", wf(2))
        job = await final(svc, "h")
        conn.set_trace_callback(None)
        assert job.state == State.COMPLETED and job.attempts == 1
        assert job.comfy_prompt_id in sim.prompts_received and len(sim.prompts_received) == 1
        assert job.comfy_backend == sim.url
        assert job.result is not None and job.result["prompt_id"] == job.comfy_prompt_id
        # No UPDATE of the job outside a transition (``update``: the old write before submitting).
        assert not [q for q in seen if q.startswith("UPDATE jobs SET updated_at")], seen
        hand_off = [e for e in await svc.store.events("h") if e["message"] == "Waiting for ComfyUI"]
        assert len(hand_off) == 1
    finally:
        conn.set_trace_callback(None)
        await svc.stop()


async def test_a_queued_job_gets_its_prompt_id_from_the_claim(
    tmp_path: Path, sim: Simulator
) -> None:
    """A job that waited for the generate worker is claimed with its prompt id and backend in the
    claim's commit: submitted under them, no write of the stage's own; and a job left with a
    prompt id that may have reached ComfyUI keeps it (looked up, never overwritten)."""
    sim.node_durations = {"ImageBlur": 0.3}
    svc = make(tmp_path, [sim.url])
    await svc.start()
    seen: list[str] = []
    conn = svc.store.writer._conn  # type: ignore[attr-defined]
    try:
        await svc.pool.wait_ready(5)
        await asyncio.sleep(0.05)
        conn.set_trace_callback(seen.append)
        await submit(svc, "q1", wf(21, blur=True))  # holds the one generate worker
        await submit(svc, "q2", wf(22))  # waits in generate, then claimed by the claimer
        jobs = [await final(svc, "q1"), await final(svc, "q2")]
        conn.set_trace_callback(None)
        for job in jobs:
            assert job.state == State.COMPLETED and job.attempts == 1
            assert job.comfy_prompt_id in sim.prompts_received and job.comfy_backend == sim.url
        assert len(sim.prompts_received) == 2
        claims = [e for e in await svc.store.events("q2") if e["message"] == "Waiting for ComfyUI"]
        assert len(claims) == 1
        assert not [q for q in seen if q.startswith("UPDATE jobs SET updated_at")], seen
    finally:
        conn.set_trace_callback(None)
        await svc.stop()


async def test_validation_error_is_kept_whole(tmp_path: Path, sim: Simulator) -> None:
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        bad = wf(2)
        bad["1"]["inputs"]["width"] = "abc"
        await submit(svc, "v", bad)
        job = await final(svc, "v")
        assert job.state == State.FAILED and job.attempts == 1
        assert job.error is not None and job.error["type"] == "validation_error"
        details = job.error["details"]
        assert details["error"]["type"] == "prompt_outputs_failed_validation"
        assert details["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"
    finally:
        await svc.stop()


async def test_runtime_error_names_the_node(tmp_path: Path, sim: Simulator) -> None:
    sim.fail_nodes = {"ImageInvert": ("PIL.UnidentifiedImageError", "cannot identify image file")}
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await submit(svc, "e", wf(3))
        job = await final(svc, "e")
        assert job.state == State.FAILED and job.attempts == 1
        err = job.error
        assert err is not None
        assert (err["type"], err["node_id"], err["node_type"]) == ("node_error", "2", "ImageInvert")
        assert err["details"]["exception_type"] == "PIL.UnidentifiedImageError"
        assert err["details"]["traceback"]
    finally:
        await svc.stop()


async def test_comfyui_restart_mid_job_resubmits_and_completes(
    tmp_path: Path, sim: Simulator
) -> None:
    sim.node_durations = {"ImageBlur": 1.0}
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await submit(svc, "r", wf(4, blur=True))
        await started(svc, "r", sim)
        await sim.crash()
        await asyncio.sleep(0.5)
        await sim.restart()
        job = await final(svc, "r", timeout=30)
        assert job.state == State.COMPLETED and job.attempts == 2
        assert len(sim.prompts_received) == 2  # the lost prompt, and its one resubmission
        msgs = [e["message"] for e in await svc.store.events("r")]
        assert any("prompt_lost" in m or "comfyui" in m.lower() for m in msgs)
    finally:
        await svc.stop()


async def test_failed_submission_costs_one_attempt_not_two(tmp_path: Path, sim: Simulator) -> None:
    # A POST /prompt that fails (HTTP 500 here; a timeout in real life) may or may not have got in,
    # so its prompt id stays stored and the next attempt looks it up. Not finding it must lead to a
    # fresh submission in that same attempt, not to a second charged failure (prompt_lost).
    sim.reject_next = [(500, "500 Internal Server Error\n\nServer got itself in trouble")]
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await submit(svc, "f", wf(5))
        job = await final(svc, "f")
        assert job.state == State.COMPLETED and job.attempts == 2
        assert len(sim.prompts_received) == 1
        msgs = [e["message"] for e in await svc.store.events("f")]
        assert not any("prompt_lost" in m for m in msgs), msgs
    finally:
        await svc.stop()


async def test_cancel_running_interrupts_that_prompt_only(tmp_path: Path, sim: Simulator) -> None:
    sim.node_durations = {"ImageBlur": 2.0}
    svc = make(
        tmp_path,
        [sim.url],
    )
    await svc.start()
    try:
        await submit(svc, "c", wf(5, blur=True))
        await started(svc, "c", sim)
        await svc.pipeline.cancel("c")
        job = await final(svc, "c")
        assert job.state == State.CANCELLED and (job.error or {}).get("type") == "cancelled"
        # The next job runs at once: the interrupt stopped ComfyUI's work on the cancelled prompt.
        await submit(svc, "d", wf(6))
        assert (await final(svc, "d", timeout=5)).state == State.COMPLETED
    finally:
        await svc.stop()


async def test_deadline_fails_with_timeout_and_stops_the_prompt(
    tmp_path: Path, sim: Simulator
) -> None:
    sim.node_durations = {"ImageBlur": 3.0}
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await submit(svc, "t", wf(7, blur=True), timeout=1.0)
        job = await final(svc, "t")
        assert job.state == State.FAILED and (job.error or {}).get("type") == "timeout"
    finally:
        await svc.stop()


async def test_two_backends_one_dies(tmp_path: Path, sim: Simulator) -> None:
    other = Simulator(port=0, data_dir=tmp_path / "sim2", comfyui_version=sim.comfyui_version)
    await other.start()
    svc = make(tmp_path, [sim.url, other.url])
    await svc.start()
    try:
        await svc.pool.wait_ready(5)
        await sim.crash()
        for i in range(4):
            await submit(svc, f"m{i}", wf(10 + i))
        jobs = [await final(svc, f"m{i}") for i in range(4)]
        assert {j.state for j in jobs} == {"completed"}
        assert {j.comfy_backend for j in jobs} == {other.url}
        await sim.restart()
    finally:
        await svc.stop()
        await other.stop()


async def test_all_backends_down_jobs_wait_then_run(tmp_path: Path, sim: Simulator) -> None:
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await svc.pool.wait_ready(5)
        await sim.crash()
        await submit(svc, "w", wf(20))
        await asyncio.sleep(1.0)
        job = await svc.store.get("w")
        assert job is not None and not job.terminal  # waiting, not failed
        assert not svc.pool.any_healthy()
        await sim.restart()
        assert (await final(svc, "w")).state == State.COMPLETED
    finally:
        await svc.stop()


async def _restarted(tmp_path: Path, svc: Services, sim: Simulator) -> Services:
    await svc.stop()  # a shutdown leaves ComfyUI's prompt alone; the next start reconciles it
    svc = make(tmp_path, [sim.url])
    await svc.start()
    return svc


async def test_comfyq_restart_follows_a_prompt_still_running(
    tmp_path: Path, sim: Simulator
) -> None:
    # The prompt is taken off ComfyUI's queue and held there (running) while comfyq restarts;
    # the new comfyq asks where it is (the jobs API on the newer generation, /queue + /history
    # on 0.3.64), finds it running and follows it instead of submitting it again.
    sim.hold_starts()
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await submit(svc, "k", wf(30))
        await started(svc, "k", sim)
        async with asyncio.timeout(10):
            while not sim.held:
                await asyncio.sleep(0.01)
        svc = await _restarted(tmp_path, svc, sim)
        backend = svc.pool.get(sim.url)
        assert backend is not None
        async with asyncio.timeout(10):  # the new comfyq follows it (it watches its messages)
            while sim.held[0] not in backend.client._feed.watches:
                await asyncio.sleep(0.01)
        sim.release_starts()
        job = await final(svc, "k")
        assert job.state == State.COMPLETED and job.attempts == 1
        assert len(sim.prompts_received) == 1  # followed, never submitted again
        assert job.result is not None and job.result["outputs"]["3"]["images"]
        timing = job.result["comfy_timing"]
        assert timing["ended_at"] >= timing["started_at"]
    finally:
        await svc.stop()


async def test_comfyq_restart_takes_a_finished_prompts_outcome(
    tmp_path: Path, sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.hold_starts()
    svc = make(tmp_path, [sim.url])
    await svc.start()
    try:
        await submit(svc, "h", wf(31))
        await started(svc, "h", sim)
        await svc.stop()
        sim.release_starts()  # it finishes while comfyq is down
        pid = sim.prompts_received[0]
        await wait_history(http, sim.url, pid)
        svc = make(tmp_path, [sim.url])
        await svc.start()
        job = await final(svc, "h")
        assert job.state == State.COMPLETED and job.attempts == 1
        assert len(sim.prompts_received) == 1
        timing = job.result["comfy_timing"]  # type: ignore[index]
        assert timing["ended_at"] >= timing["started_at"]
        if sim.comfyui_version != OLD:  # the server's create_time (jobs API / history)
            assert timing["started_at"] >= timing["queued_at"]
        else:
            assert "queued_at" not in timing
    finally:
        await svc.stop()
