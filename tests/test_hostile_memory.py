"""What a large body leaves behind once its job has ended (issue 19: RSS back near idle after a
burst of large bodies). Not timings: each case checks with tracemalloc or a weak reference, with
the garbage collector off, that the objects a large workflow decodes into are freed when the job
(or the request) is done, and that the stages do not decode what they need not.

The RSS figures are ``bench_hostile``'s."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import tracemalloc
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from comfyq import admission
from comfyq.comfy.client import ComfyClient
from comfyq.errors import NodeError, ValidationError
from comfyq.events import EventBus
from comfyq.inputs import Downloader
from comfyq.inputs.prepare import payload_for_preprocess, prepare_job
from comfyq.netguard import AddressGuard
from comfyq.stages.generate import _prepared
from comfyq.stages.runner import JobContext, Pipeline, RunnerConfig, StageDone
from comfyq.store import Job, JobStore, NewJob, open_store
from comfyq.store.model import STAGES, Stage, State, dumps
from modifiers import ModifierRegistry

NODES = 5_000
JSON = {"Content-Type": "application/json"}


def chain(n: int = NODES, tag: str = "") -> dict[str, Any]:
    """The bench's node-count workflow: ``n`` nodes, each linked to the one before."""
    return {
        f"{tag}{i}": {"class_type": "BenchNode", "inputs": {"x": [f"{tag}{i - 1}", 0], "s": "a"}}
        for i in range(1, n + 1)
    }


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees anything: a cycle would keep what it holds."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def blocks() -> int:
    """Memory blocks allocated since tracemalloc started and still held."""
    return sum(stat.count for stat in tracemalloc.take_snapshot().statistics("filename"))


class Sentinel:
    """A weakly referenceable stand-in for what a stage's frame holds."""


async def submit(workflow: dict[str, Any]) -> None:
    """A backend that refuses the workflow (as the simulator refuses an unknown node type)."""
    await asyncio.sleep(0)
    raise NodeError(f"no node type ({len(workflow)} nodes)", node_id="1")


class FailingGenerate:
    """A generate stage as the real one fails on a refused workflow: it decodes the job's
    workflow, submits it, and the submission raises."""

    def __init__(self) -> None:
        self.held: list[weakref.ref[Sentinel]] = []

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        payload = await job.decode_fresh("payload")
        workflow = payload["input"]["workflow_json"]
        marker = Sentinel()
        self.held.append(weakref.ref(marker))
        await submit(workflow)
        return StageDone(f"unreachable {marker}")


class Pass:
    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        return StageDone("done")


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[tuple[JobStore, EventBus, FailingGenerate]]:
    store = open_store(tmp_path / "q.db")
    await store.open()
    bus = EventBus()
    store.listen(bus.on_transitions)
    generate = FailingGenerate()
    handlers: dict[Stage, Any] = {s: Pass() for s in STAGES}
    handlers[Stage.GENERATE] = generate
    pipe = Pipeline(store, bus, handlers, {s: 1 for s in STAGES}, RunnerConfig(idle_poll=30.0))
    await pipe.start()
    yield store, bus, generate
    await pipe.stop(grace=1)
    await store.close()


async def wait_final(bus: EventBus, store: JobStore, job_id: str) -> Job:
    sub = bus.subscribe(job_id)
    try:
        j = await store.get(job_id)
        while j is not None and not j.terminal:
            assert await sub.get(10) is not None, f"{job_id} did not finish"
            j = await store.get(job_id)
        assert j is not None
        return j
    finally:
        sub.close()


async def test_a_failed_job_frees_what_its_stage_decoded(
    pipeline: tuple[JobStore, EventBus, FailingGenerate], no_gc: None
) -> None:
    store, bus, generate = pipeline
    payload = {"input": {"workflow_json": chain()}}
    tracemalloc.start()
    try:
        await store.create(NewJob(id="big", payload=payload, payload_hash="h"), 10)
        del payload
        base = blocks()
        job = await wait_final(bus, store, "big")
        state, message = job.state, job.message
        del job
        for _ in range(5):  # the worker's own step after recording the outcome
            await asyncio.sleep(0)
        left = blocks() - base
    finally:
        tracemalloc.stop()
    assert state == State.FAILED and "no node type" in message
    # The stage's frames (the decoded workflow, the marker) were held by a cycle: the exception's
    # traceback starts in the runner's frame, whose locals held the task holding the exception.
    assert generate.held and generate.held[0]() is None
    # Counted in blocks, not bytes: what fragments the heap is the ~35k small objects of the
    # decoded workflow, not a row's text (one block) that a store may keep for a while.
    assert left < 2_000, f"{left} more blocks held after the job ended (the workflow: ~35k)"


def test_admission_keeps_no_node_id_of_a_large_body() -> None:
    admission.parse(json.dumps({"input": {"workflow_json": chain(tag="w")}}).encode(), JSON)
    body = json.dumps({"input": {"workflow_json": chain(tag="n")}}).encode()
    gc.collect()
    tracemalloc.start()
    try:
        inp, raw = admission.parse(body, JSON)
        assert len(raw["workflow_json"]) == NODES and raw["workflow_json"]["n7"]["inputs"]["x"]
        assert inp.workflow_json is raw["workflow_json"]  # one decoded copy, not two
        del inp, raw
        left = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # msgspec keeps recent dict keys in a cache (512 slots): node ids allocated in the middle of
    # the decode (~27 KB of them, 514 blocks) pinned heap arenas after the workflow was freed.
    # What remains is CPython's free lists of dicts and lists (bounded: ~22 KB here).
    assert left < 32_000, f"{left} bytes kept after the parsed body was dropped"


def test_admission_errors_are_those_of_a_whole_decode() -> None:
    for body, message in [
        (b'{"input": {"priority": 1e999999}}', "Number out of range"),
        (b'{"input": {"workflow_json": [1]}}', "Expected `object`"),
        (b'{"input": 5}', "Expected `object`"),
        (b"[1, 2]", "must be an object"),
        (b'{"input": {"workflow_json": {"1": {"inputs": {}}}}}', "class_type"),
    ]:
        with pytest.raises(Exception) as err:
            admission.parse(body, JSON)
        assert message in str(getattr(err.value, "fields", None) or err.value), body


def test_a_plain_workflow_is_passed_through_preprocess_undecoded() -> None:
    workflow = chain(3)
    workflow["1"]["_meta"] = {"title": "kept"}
    stored = dumps({"input": {"request_id": "r", "workflow_json": workflow, "priority": 2}})
    payload = payload_for_preprocess(stored)
    assert payload is not None
    job_input = payload["input"]
    assert job_input["request_id"] == "r" and job_input["priority"] == 2
    raw = job_input["workflow_json"]
    assert isinstance(raw, msgspec.Raw) and msgspec.json.decode(raw) == workflow


@pytest.mark.parametrize(
    "job_input",
    [
        {"workflow_json": {"1": {"class_type": "L", "inputs": {"image": "https://h.example/a"}}}},
        {"workflow_json": {"1": {"class_type": "L", "inputs": {"image": "HTTP://h.example/a"}}}},
        {"workflow_json": {"1": {"class_type": "K", "inputs": {"seed": "__RANDOM_INT__"}}}},
        {"workflow_json": {"1": {"class_type": "K", "inputs": {"t": "a __RANDOM_INT__ b"}}}},
        {"workflow_json": chain(2), "images": [{"name": "a.png", "image": "ref"}]},
        {"modifier": "ImageEffects", "modifications": {"width": 8}},
    ],
)
def test_a_workflow_preprocess_changes_is_decoded_whole(job_input: dict[str, Any]) -> None:
    assert payload_for_preprocess(dumps({"input": job_input})) is None


def test_other_payload_shapes_are_decoded_whole() -> None:
    assert payload_for_preprocess(dumps({"input": {"workflow_json": {}}, "v2": {"a": 1}})) is None
    assert payload_for_preprocess(dumps({"workflow_json": chain(2)})) is None
    assert payload_for_preprocess("[1]") is None


async def test_prepare_job_submits_a_passed_through_workflow_as_stored(tmp_path: Path) -> None:
    workflow = chain(3)
    payload = payload_for_preprocess(dumps({"input": {"workflow_json": workflow}}))
    assert payload is not None
    downloader = Downloader(tmp_path / "cache", AddressGuard())
    prepared = await prepare_job(
        payload["input"],
        "job-1",
        registry=ModifierRegistry(),
        downloader=downloader,
        owned=True,
    )
    assert isinstance(prepared.workflow, msgspec.Raw) and prepared.inputs == []
    # What the store writes for the stage's result is the workflow itself.
    stored = json.loads(dumps({"prepared": {"workflow": prepared.workflow, "inputs": []}}))
    assert stored["prepared"]["workflow"] == workflow


@pytest.fixture
async def refusing_comfyui() -> AsyncIterator[tuple[str, list[bytes], list[str]]]:
    """A loopback server answering ``POST /prompt`` as ComfyUI 0.3.64 does for an unknown node
    class (the bench's node-count body). It keeps the first body whole and of the others only a
    digest, read in chunks, so that what the test's process holds is the client's own doing."""
    bodies: list[bytes] = []
    digests: list[str] = []

    async def prompt(request: web.Request) -> web.Response:
        if not bodies:
            bodies.append(await request.read())
            digests.append(hashlib.sha256(bodies[0]).hexdigest())
        else:
            h = hashlib.sha256()
            async for chunk in request.content.iter_chunked(16 * 1024):
                h.update(chunk)
            digests.append(h.hexdigest())
        error = {
            "type": "invalid_prompt",
            "message": "Cannot execute because node BenchNode does not exist.",
            "details": "Node ID '#7'",
            "extra_info": {},
        }
        return web.json_response({"error": error, "node_errors": {}}, status=400)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/prompt", prompt)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", bodies, digests
    finally:
        await runner.cleanup()


async def test_the_generate_stage_submits_a_large_workflow_undecoded(
    refusing_comfyui: tuple[str, list[bytes], list[str]],
) -> None:
    """The generate stage's part of a job (its prepared workflow read, submitted, refused) peaks
    far below a whole decode of that workflow: it is sent as the stored text, and the rejection
    reads only the node it names."""
    url, bodies, digests = refusing_comfyui
    workflow = chain()
    prepared_text = dumps({"workflow": workflow, "inputs": []})
    prompt_id = str(uuid.uuid4())
    client = ComfyClient(url, client_id="c")
    peaks, held = [], []
    try:
        # Three times, the first of them outside the figures: the session, the connection and
        # aiohttp's lazy imports are made then.
        for _ in range(3):
            job = Job({"id": "big", "prepared": prepared_text})
            gc.collect()
            tracemalloc.start()
            try:
                stored, inputs = await _prepared(job)
                with pytest.raises(ValidationError) as err:
                    await client.submit(stored, prompt_id)
                peaks.append(tracemalloc.get_traced_memory()[1])
                held.append(blocks())  # with the stage's workflow still referenced
            finally:
                tracemalloc.stop()
            del job, stored
        # What the stage did before: the prepared column decoded whole.
        gc.collect()
        tracemalloc.start()
        try:
            whole = msgspec.json.decode(prepared_text)
            decode_peak = tracemalloc.get_traced_memory()[1]
            decode_blocks = blocks()
            del whole
        finally:
            tracemalloc.stop()
    finally:
        await client.close()
    assert inputs == []
    # The rejection names the node as it did with the workflow decoded (that node read alone).
    assert (err.value.node_id, err.value.node_type) == ("7", "BenchNode")
    assert err.value.details["kind"] == "unknown_node"
    # ComfyUI got the workflow itself, with the same fields around it, the same bytes each time.
    body = json.loads(bodies[0])
    assert body == {"prompt": workflow, "client_id": "c", "prompt_id": prompt_id}
    assert len(digests) == 3 and len(set(digests)) == 1
    # Counted in blocks (what fragments the heap): the decoded tree is ~35k of them.
    assert max(held[1:]) * 20 < decode_blocks, f"{held} blocks held, a whole decode {decode_blocks}"
    # In bytes, the request body (~0.4 MB, encoded, then copied into the socket's buffer), not
    # the ~3.5 MB object tree.
    peak = max(peaks[1:])
    assert peak * 2 < decode_peak, f"submit peaked at {peak} bytes, a whole decode at {decode_peak}"
