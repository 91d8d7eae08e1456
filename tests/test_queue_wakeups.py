"""Waiting streams and the queue moving (comfyq.api.queue): what each client sees stays correct
and in order (its place only moves up, position 0 when it starts, then its final result) while
one wake-up places every watched job at once; a change that moves no job wakes none of its
streams; the wake-ups thin out as more streams wait, so that n streams draining cost about n
messages, not n squared.

A real server (SQLite file, the simulator), its real store and bus; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import aiohttp
from support.servers import Server, pause, resume, wait_healthy
from support.workflows import workflow

from comfyq.api.context import API
from comfyq.api.queue import FANOUT_PER_S, MAX_INTERVAL, RANK_FROM_WATCHERS
from comfyq.sim import Simulator
from comfyq.store.model import Stage, State

_colors = itertools.count(7000)


def body(**extra: Any) -> dict[str, Any]:
    blur = extra.pop("blur", False)
    return {"input": {"workflow_json": workflow(next(_colors), blur=blur), **extra}}


async def admit(srv: Server, **extra: Any) -> str:
    async with srv.session.post(srv.u("/generate"), json=body(**extra)) as r:
        assert r.status == 202
        return str((await r.json())["id"])


async def waiting_in(srv: Server, stage: Stage, n: int) -> None:
    queue = srv.runner.app[API].queue
    for _ in range(1000):
        if (await queue.counts()).waiting[stage] == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} jobs never waited in {stage}")


async def events_of(resp: aiohttp.ClientResponse, first: asyncio.Event) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for raw in resp.content:
        if raw.startswith(b"data: "):
            out.append(json.loads(raw[6:]))
            first.set()
            if out[-1]["status"] == "final_result":
                break
    return out


async def test_many_waiting_streams_see_their_place_move_up_then_start_then_end(
    server: Server, simulator: Simulator
) -> None:
    await wait_healthy(server)
    n = RANK_FROM_WATCHERS + 8  # enough streams that each wake-up ranks for all of them
    simulator.node_durations = {"ImageBlur": 0.04}  # the queue drains in about a second
    pause(server, Stage.GENERATE)
    ids = [await admit(server, blur=True) for _ in range(n)]
    await waiting_in(server, Stage.GENERATE, n)
    firsts = [asyncio.Event() for _ in ids]
    resps = [await server.session.get(server.u(f"/jobs/{i}/events")) for i in ids]
    reads = [asyncio.create_task(events_of(r, f)) for r, f in zip(resps, firsts, strict=True)]
    await asyncio.gather(*(f.wait() for f in firsts))
    resume(server, Stage.GENERATE)
    streams = await asyncio.wait_for(asyncio.gather(*reads), 60)
    for r in resps:
        r.release()
    queue = server.runner.app[API].queue
    assert queue._moved is not None  # the wake-ups placed the jobs, once for all their streams
    for k, (job_id, evs) in enumerate(zip(ids, streams, strict=True)):
        assert evs[-1]["status"] == "final_result", job_id
        assert evs[-1]["result"]["status"] == "completed"
        started = next(
            i for i, e in enumerate(evs) if e["event"] == "state" and e["status"] == "generating"
        )
        assert evs[started]["queue_position"]["position"] == 0  # running: position 0
        waiting = [
            e["queue_position"]
            for e in evs[:started]
            if e.get("queue_position", {}).get("current_queue") == "generation"
        ]
        assert waiting, job_id  # its place while it waited (the first event at least)
        positions = [q["position"] for q in waiting]
        sizes = [q["queue_size"] for q in waiting]
        assert all(1 <= p <= s for p, s in zip(positions, sizes, strict=True)), waiting
        # Nothing joins the queue meanwhile: a place only moves up, the queue only shrinks.
        assert positions == sorted(positions, reverse=True), (job_id, positions)
        assert sizes == sorted(sizes, reverse=True), (job_id, sizes)
        assert positions[0] == k + 1 and sizes[0] == n  # as it was when its stream opened
        assert not [e for e in evs[started:] if e["event"] == "queue"]  # none once it runs
    moves = [sum(e["event"] == "queue" for e in evs) for evs in streams]
    assert sum(moves) >= n // 2, moves  # they heard the queue move while they waited


async def test_a_change_that_moves_no_job_wakes_none_of_its_streams(server: Server) -> None:
    await wait_healthy(server)
    app = server.runner.app[API]
    queue, bus = app.queue, server.services.bus
    pause(server, Stage.GENERATE)
    ahead, behind = await admit(server), await admit(server)
    await waiting_in(server, Stage.GENERATE, 2)
    pause(server, Stage.PREPROCESS)
    sub = bus.subscribe(behind)
    queue.watch(sub, behind)
    try:
        # A job joins another stage's queue: the next wake-up wakes the stream once, as it is
        # newly watched ...
        other = await admit(server)
        ev = await asyncio.wait_for(sub.get(), 5)
        assert ev is not None and ev.kind == "queue"
        got = await queue.moved(behind, Stage.GENERATE, "workflow", "", None, 0)
        assert got is not None and (got[0].position, got[0].queue_size) == (2, 2)
        assert got[1].generation_queue_size == 2 and got[1].preprocess_queue_size == 1
        # ... and what it sent (its place) is not sent again.
        assert await queue.moved(behind, Stage.GENERATE, "workflow", "", None, 0, (2, 2)) is None
        # More changes elsewhere (one more job waits to be preprocessed, one is cancelled):
        # the job's place is the same, its stream is not woken.
        await admit(server)
        async with server.session.delete(server.u(f"/jobs/{other}")) as r:
            assert r.status == 200
        await asyncio.sleep(3 * queue.interval())
        assert sub.buffered == 0
        # The job ahead leaves: the stream is woken, and is told its new place.
        async with server.session.delete(server.u(f"/jobs/{ahead}")) as r:
            assert r.status == 200
        ev = await asyncio.wait_for(sub.get(), 5)
        assert ev is not None and ev.kind == "queue"
        got = await queue.moved(behind, Stage.GENERATE, "workflow", "", None, 0, (2, 2))
        assert got is not None and (got[0].position, got[0].queue_size) == (1, 1)
        # A stream that has already rendered a newer state of its job than the wake-up saw
        # sends nothing from it (the next wake-up wakes it again).
        assert queue._moved is not None
        assert await queue.moved(behind, Stage.GENERATE, "workflow", "", None, 10**12) is None
    finally:
        queue.unwatch(sub)
        sub.close()
        resume(server, Stage.PREPROCESS)
        resume(server, Stage.GENERATE)
    job = await server.services.store.get(behind)
    assert job is not None and job.state != State.CANCELLED


async def test_wake_ups_thin_out_as_more_streams_wait(server: Server) -> None:
    await wait_healthy(server)
    queue = server.runner.app[API].queue
    bus = server.services.bus
    subs = [bus.subscribe(f"nobody-{i}") for i in range(int(FANOUT_PER_S * 20))]
    try:
        assert queue.interval() == queue.min_interval
        for i, sub in enumerate(subs[: int(FANOUT_PER_S)]):
            queue.watch(sub, f"nobody-{i}")
        assert queue.interval() == max(queue.min_interval, 1.0)  # one wake-up a second
        for i, sub in enumerate(subs):
            queue.watch(sub, f"nobody-{i}")
        assert queue.interval() == MAX_INTERVAL  # never longer
    finally:
        for sub in subs:
            queue.unwatch(sub)
            sub.close()
    assert queue.interval() == queue.min_interval
