"""Queue counts and positions kept from the store's transitions (comfyq.api.queue): they agree
with the store's own counts and indexed positions after jobs are admitted, claimed, cancelled,
run and finished, without a count read per change; a write this process did not make (another
process on the same file, like the CLI) and a job left running before the counts were kept are
caught up by reading the counts again.

A real server (SQLite file, the simulator), its real store; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from support.servers import Server, pause, resume, wait_healthy
from support.workflows import workflow

from comfyq.api.context import API
from comfyq.api.queue import QueueView
from comfyq.store import open_store
from comfyq.store.model import STAGES, Stage, State

_colors = itertools.count(9000)


def body(**extra: Any) -> dict[str, Any]:
    return {"input": {"workflow_json": workflow(next(_colors)), **extra}}


async def post(srv: Server, path: str, payload: Any) -> tuple[int, Any]:
    async with srv.session.post(srv.u(path), json=payload) as r:
        return r.status, await r.json()


async def stored(srv: Server) -> tuple[dict[Stage, int], dict[Stage, int]]:
    raw = await srv.services.store.counts()
    return (
        {s: raw[s]["waiting"] for s in STAGES},
        {s: raw[s]["running"] for s in STAGES},
    )


async def kept(queue: QueueView) -> tuple[dict[Stage, int], dict[Stage, int]]:
    c = await queue.counts()
    return dict(c.waiting), dict(c.running)


async def positions_agree(srv: Server, queue: QueueView, ids: list[str]) -> int:
    """Every waiting job's kept place equals the store's indexed count; how many were placed
    from the kept keys."""
    from_keys = 0
    for job_id in ids:
        job = await srv.services.store.get(job_id)
        assert job is not None
        if job.state != State.PENDING:
            continue
        if queue._kept_place(job.id, job.stage) is not None:
            from_keys += 1
        placed = await queue.position(job)
        assert placed is not None
        assert (placed.position, placed.queue_size) == await srv.services.store.position(job), (
            job_id
        )
    return from_keys


async def until_idle(srv: Server, timeout: float = 20.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while True:
        waiting, running = await stored(srv)
        if not any(waiting.values()) and not any(running.values()):
            return
        assert asyncio.get_running_loop().time() < end, (waiting, running)
        await asyncio.sleep(0.05)


async def test_counts_and_positions_are_kept_from_transitions(server: Server) -> None:
    await wait_healthy(server)
    queue = server.runner.app[API].queue
    assert queue.keeps  # SQLite: one server owns the file
    queue.recount_every = 3600.0  # no periodic read in the way of counting them
    pause(server, Stage.PREPROCESS)
    ids = []
    for i in range(45):
        status, res = await post(server, "/generate", body(priority=i % 3))
        assert status == 202
        ids.append(res["id"])
    assert await kept(queue) == await stored(server)
    recounts = queue.recounts
    assert await positions_agree(server, queue, ids) == 45  # all from the kept keys
    # Cancel some in the middle of the queue: they leave it, the rest move up.
    for job_id in ids[3:12:2]:
        async with server.session.post(server.u(f"/cancel/{job_id}")) as r:
            assert r.status == 200
    assert await kept(queue) == await stored(server)
    assert await positions_agree(server, queue, ids) == 40
    # A job no longer waiting (a stream renders an event from before): placed as the indexed
    # count places it, by its claim order among those that wait.
    gone = await server.services.store.get(ids[5])
    assert gone is not None and gone.state == State.CANCELLED
    order = (gone.priority, gone.created_at)
    placed = queue._kept_place(gone.id, gone.stage, order)
    assert placed == await server.services.store.position(gone)
    # Many streams waiting: one ranking shared by all, same answers.
    subs = [server.services.bus.subscribe(job_id) for job_id in ids[:40]]
    for sub in subs:
        queue.watch(sub, next(iter(sub.keys)))
    try:
        assert await positions_agree(server, queue, ids) == 40
        assert queue._ranked[Stage.PREPROCESS] is not None
    finally:
        for sub in subs:
            queue.unwatch(sub)
            sub.close()
    resume(server, Stage.PREPROCESS)
    await until_idle(server)
    assert await kept(queue) == await stored(server)
    assert queue.recounts == recounts  # every change kept, not one count read since
    # More jobs through every stage, sync ones among them, and the counts still agree.
    results = await asyncio.gather(*(post(server, "/generate/sync", body()) for _ in range(8)))
    assert all(status == 200 for status, _ in results)
    await until_idle(server)
    assert await kept(queue) == await stored(server)
    assert queue.recounts == recounts


async def test_a_write_of_another_process_is_caught_up(server: Server) -> None:
    """The CLI cancels and retries jobs on the same file: this server sees no transition; the
    counts are read again after ``recount_every`` and the known keys are dropped."""
    await wait_healthy(server)
    queue = server.runner.app[API].queue
    queue.recount_every = 0.2
    pause(server, Stage.PREPROCESS)
    ids = [(await post(server, "/generate", body()))[1]["id"] for _ in range(6)]
    assert await kept(queue) == await stored(server)
    other = open_store(server.services.settings.database)  # as `comfyq jobs cancel` does
    await other.open()
    try:
        _, tr = await other.request_cancel(ids[1])
        assert tr is not None and tr.to_state == State.CANCELLED
    finally:
        await other.close()
    await asyncio.sleep(0.25)
    assert await kept(queue) == await stored(server)
    assert (await kept(queue))[0][Stage.PREPROCESS] == 5
    await positions_agree(server, queue, ids)  # the keys are dropped (one too many)
    assert not queue._keys[Stage.PREPROCESS]
    more = [(await post(server, "/generate", body()))[1]["id"] for _ in range(2)]
    await positions_agree(server, queue, ids + more)
    # The next count read finds jobs it does not know and reads their keys: from memory again.
    loads = queue.key_loads
    await asyncio.sleep(0.25)
    assert await kept(queue) == await stored(server)
    assert queue.key_loads == loads + 1
    assert await positions_agree(server, queue, ids + more) == 7
    resume(server, Stage.PREPROCESS)
    await until_idle(server)


async def test_a_job_running_before_the_counts_were_kept(server: Server) -> None:
    """A view that starts while a job runs does not know which stage it ran in: when that job
    waits again, the counts are read again instead of guessed."""
    await wait_healthy(server)
    api = server.runner.app[API]
    pause(server, Stage.GENERATE)
    _, res = await post(server, "/generate", body())
    job_id = res["id"]
    end = asyncio.get_running_loop().time() + 10
    while (await stored(server))[0][Stage.GENERATE] != 1:
        assert asyncio.get_running_loop().time() < end
        await asyncio.sleep(0.02)
    # Claim it by hand (as a generate worker would), then start a fresh view.
    store = server.services.store
    (claimed,) = await store.claim(Stage.GENERATE, 1, 60.0, "held by the test")
    assert claimed.id == job_id
    view = QueueView(store, api.reads, server.services.pipeline, max_queue_size=100)
    assert await kept(view) == await stored(server)
    before = view.recounts
    await store.release(job_id, "given back")  # running -> pending, stage unknown to the view
    assert view._stale
    assert await kept(view) == await stored(server)
    assert view.recounts == before + 1
    resume(server, Stage.GENERATE)
    await until_idle(server)
    assert await kept(view) == await stored(server)


async def test_jobs_waiting_before_the_view_started_are_read_once(server: Server) -> None:
    """Jobs queued before the counts were kept (a restart with a queue) are unknown: the
    first count read also reads their claim keys, and they are placed from memory."""
    await wait_healthy(server)
    api = server.runner.app[API]
    pause(server, Stage.PREPROCESS)
    ids = [(await post(server, "/generate", body(priority=i % 2)))[1]["id"] for i in range(12)]
    view = QueueView(server.services.store, api.reads, server.services.pipeline, max_queue_size=100)
    assert not view._keys[Stage.PREPROCESS]
    assert await kept(view) == await stored(server)
    assert view.key_loads == 1
    assert await positions_agree(server, view, ids) == 12
    more = [(await post(server, "/generate", body()))[1]["id"] for _ in range(3)]
    assert await positions_agree(server, view, ids + more) == 15
    assert view.key_loads == 1
    resume(server, Stage.PREPROCESS)
    await until_idle(server)
    assert await kept(view) == await stored(server)
