"""Streaming over a real server: SSE ids, heartbeats, resume with Last-Event-ID, slow subscribers,
queue-position updates, and the websocket (subscriptions, previews, pings)."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from support.servers import MakeServer, Server, pause, wait_healthy
from support.workflows import workflow

from comfyq.api.context import ApiOptions
from comfyq.config import Settings
from comfyq.sim import Simulator
from comfyq.store.model import Stage, State

_colors = itertools.count(5000)


def body(**extra: Any) -> dict[str, Any]:
    blur = extra.pop("blur", False)
    return {"input": {"workflow_json": workflow(next(_colors), blur=blur), **extra}}


@dataclass
class Sse:
    """What one SSE connection received."""

    events: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    comments: int = 0

    @property
    def final(self) -> dict[str, Any] | None:
        return (
            self.events[-1] if self.events and self.events[-1]["status"] == "final_result" else None
        )

    def state_ids(self) -> list[int]:
        return [int(e["id"]) for e in self.events if e["event"] in ("state", "final_result")]


async def read_sse(resp: aiohttp.ClientResponse, out: Sse, until: Any = None) -> Sse:
    """Read events into ``out`` until the stream ends or ``until(event)`` is true."""
    event_id = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            out.comments += 1
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            ev = json.loads(line[6:])
            assert event_id is not None and ev["id"] == event_id  # every event has an id:
            out.ids.append(event_id)
            out.events.append(ev)
            event_id = None
            if until is not None and until(ev):
                return out
    return out


def slow(sim: Simulator, seconds: float, steps: int = 0) -> None:
    sim.node_durations = {"ImageBlur": seconds}
    sim.progress_steps = steps


async def rows(srv: Server, job_id: str) -> list[int]:
    return [r["id"] for r in await srv.services.store.events(job_id)]


async def test_generate_stream_tells_the_whole_story(server: Server, simulator: Simulator) -> None:
    await wait_healthy(server)
    slow(simulator, 0.3, steps=3)
    async with server.session.post(
        server.u("/generate/stream"), json=body(request_id="story", blur=True)
    ) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache" and r.headers["Location"] == "/result/story"
        got = await read_sse(r, Sse())
    first, final = got.events[0], got.final
    assert (
        first["status"] == "queued" and first["request_id"] == "story" and first["event"] == "state"
    )
    assert (
        final is not None and final["result"]["status"] == "completed" and final["result"]["output"]
    )
    assert got.state_ids() == await rows(
        server, "story"
    )  # one event per stored state change, in order
    progress = [e for e in got.events if e["event"] == "progress" and e["progress"]["max"] == 3]
    assert progress and all(e["status"] == "generating" for e in progress)
    assert [e["progress"]["value"] for e in progress] == sorted(
        e["progress"]["value"] for e in progress
    )
    statuses = [e["status"] for e in got.events if e["event"] == "state"]
    assert statuses.index("generating") < statuses.index("postprocessing")
    waiting = [e for e in got.events if e.get("queue_position")]
    limit = Settings().max_queue_size  # the default, as the server runs with it
    assert waiting and all(e["queue_info"]["max_queue_size"] == limit for e in waiting)


async def test_heartbeat_comments_while_nothing_happens(
    server: Server, simulator: Simulator
) -> None:
    slow(simulator, 1.6)  # no progress steps: 1.6 s of silence, heartbeat every 0.5 s
    await server.session.post(server.u("/generate"), json=body(request_id="quiet", blur=True))
    async with server.session.get(server.u("/jobs/quiet/events")) as r:
        got = await read_sse(r, Sse())
    assert got.comments >= 2 and got.final is not None


async def test_resume_with_last_event_id_misses_no_state_change(
    server: Server, simulator: Simulator
) -> None:
    await wait_healthy(server)
    slow(simulator, 0.8, steps=4)
    await server.session.post(server.u("/generate"), json=body(request_id="resume", blur=True))
    async with server.session.get(server.u("/jobs/resume/events")) as r:
        part1 = await read_sse(r, Sse(), until=lambda e: e["event"] == "progress")
    # Disconnected mid-job (the last id is a live progress id, "<row>.<n>"); the job goes on.
    assert "." in part1.ids[-1]

    async def finished() -> bool:
        job = await server.services.store.get("resume")
        return job is not None and job.terminal

    for _ in range(500):
        if await finished():
            break
        await asyncio.sleep(0.02)
    async with server.session.get(
        server.u("/jobs/resume/events"), headers={"Last-Event-ID": part1.ids[-1]}
    ) as r:
        part2 = await read_sse(r, Sse())
    assert part2.final is not None and part2.final["result"]["status"] == "completed"
    both = part1.state_ids() + part2.state_ids()
    assert both == await rows(server, "resume")  # every state change exactly once, in order
    assert all(
        e["event"] in ("state", "final_result") for e in part2.events
    )  # live-only events are not replayed
    # The same with the query parameter, from a state id.
    mid = str(part1.state_ids()[-1])
    async with server.session.get(server.u(f"/jobs/resume/events?last_event_id={mid}")) as r:
        part3 = await read_sse(r, Sse())
    assert part3.state_ids() == [i for i in await rows(server, "resume") if i > int(mid)]
    # A client that already has the final event is told to stop reconnecting.
    async with server.session.get(
        server.u("/jobs/resume/events"), headers={"Last-Event-ID": part2.ids[-1]}
    ) as r:
        assert r.status == 204
    # An unreadable id replays from the start.
    async with server.session.get(
        server.u("/jobs/resume/events"), headers={"Last-Event-ID": "junk"}
    ) as r:
        assert (await read_sse(r, Sse())).state_ids() == await rows(server, "resume")


async def test_slow_subscriber_loses_progress_not_the_final_and_slows_no_one(
    make_server: MakeServer, simulator: Simulator
) -> None:
    srv = await make_server(options=ApiOptions(heartbeat=5, stream_buffer=4))
    await wait_healthy(srv)
    slow(simulator, 1.0)
    await srv.session.post(srv.u("/generate"), json=body(request_id="busy", blur=True))
    for _ in range(500):
        job = await srv.services.store.get("busy")
        if job is not None and job.stage == Stage.GENERATE and job.state == State.RUNNING:
            break
        await asyncio.sleep(0.01)
    lazy = aiohttp.ClientSession()
    try:
        slow_resp = await lazy.get(srv.u("/jobs/busy/events"))  # connected, but not reading yet
        t0 = time.monotonic()
        burst = 2000
        for i in range(burst):  # one synchronous burst: no subscriber's task can run in between
            srv.services.bus.live(
                "busy", "progress", {"node": "4", "value": i, "max": burst, "percent": 0.0}
            )
        publish_time = time.monotonic() - t0
        async with srv.session.get(srv.u("/jobs/busy/events")) as r:
            fast = await read_sse(r, Sse())
        assert fast.final is not None
        slow_got = await read_sse(slow_resp, Sse())
        slow_resp.release()
    finally:
        await lazy.close()
    assert slow_got.final is not None and slow_got.final["result"]["status"] == "completed"
    burst_seen = [
        e for e in slow_got.events if e["event"] == "progress" and e["progress"]["max"] == burst
    ]
    assert len(burst_seen) <= 4  # the rest was dropped for this subscriber only
    assert slow_got.state_ids() == await rows(srv, "busy")  # state changes are never dropped
    assert publish_time < 5  # guard only: publishing never waits for subscribers


async def test_waiting_job_hears_when_the_queue_moves(server: Server) -> None:
    await wait_healthy(server)
    pause(server, Stage.GENERATE)
    for rid in ("ahead", "behind"):
        await server.session.post(server.u("/generate"), json=body(request_id=rid))
    for _ in range(500):
        job = await server.services.store.get("behind")
        if job is not None and job.stage == Stage.GENERATE and job.state == State.PENDING:
            break
        await asyncio.sleep(0.01)
    async with server.session.get(server.u("/jobs/behind/events")) as r:
        got = await read_sse(
            r, Sse(), until=lambda e: e.get("queue_position", {}).get("position") == 2
        )
        async with server.session.delete(server.u("/jobs/ahead")) as d:
            assert d.status == 200
        got = await read_sse(r, got, until=lambda e: e["event"] == "queue")
    moved = got.events[-1]
    assert moved["queue_position"]["position"] == 1 and moved["queue_position"]["queue_size"] == 1
    assert moved["status"] == "processing" and moved["queue_info"]["generation_queue_size"] == 1


async def test_stream_client_disconnect_does_not_cancel(
    server: Server, simulator: Simulator
) -> None:
    slow(simulator, 0.5)
    async with server.session.post(
        server.u("/generate/stream"), json=body(request_id="left", blur=True)
    ) as r:
        await read_sse(r, Sse(), until=lambda e: True)
    for _ in range(500):
        job = await server.services.store.get("left")
        if job is not None and job.terminal:
            break
        await asyncio.sleep(0.02)
    assert job is not None and job.state == State.COMPLETED


# --- websocket ------------------------------------------------------------------------------------


async def ws_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> dict[str, Any]:
    msg = await ws.receive(timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)  # type: ignore[no-any-return]


async def test_ws_subscribe_to_jobs(server: Server, simulator: Simulator) -> None:
    await wait_healthy(server)
    slow(simulator, 0.4, steps=2)
    await server.session.post(server.u("/generate/sync"), json=body(request_id="w-done"))
    await server.session.post(server.u("/generate"), json=body(request_id="w1", blur=True))
    async with server.session.ws_connect(server.u("/ws")) as ws:
        await ws.send_json({"subscribe": ["w1", "w-done", "w-missing"]})
        first = await ws_json(ws)
        assert first["request_id"] == "w1" and first["event"] == "state" and "id" in first
        done = await ws_json(ws)
        assert done["request_id"] == "w-done" and done["status"] == "final_result"
        assert done["result"]["status"] == "completed"
        missing = await ws_json(ws)
        assert (
            missing["error"]["type"] == "not_found"
            and missing["error"]["details"]["job_id"] == "w-missing"
        )
        events = []
        while True:
            ev = await ws_json(ws)
            events.append(ev)
            if ev["status"] == "final_result":
                break
        assert ev["request_id"] == "w1" and ev["result"]["status"] == "completed"
        assert any(e["event"] == "progress" for e in events)
        await ws.send_str("not json")
        assert (await ws_json(ws))["error"]["type"] == "invalid_request"
        await ws.send_json({"subscribe": 5})
        assert (await ws_json(ws))["error"]["type"] == "invalid_request"


async def test_ws_everything_and_previews(server: Server) -> None:
    await wait_healthy(server)
    async with server.session.ws_connect(server.u("/ws")) as ws:
        await ws.send_json({"subscribe": "*"})
        await asyncio.sleep(0.1)
        await server.session.post(server.u("/generate"), json=body(request_id="w-all"))
        seen = []
        while True:
            ev = await ws_json(ws)
            seen.append(ev)
            if ev["status"] == "final_result":
                break
        assert seen[0]["request_id"] == "w-all" and seen[0]["status"] == "queued"
        assert seen[-1]["result"]["id"] == "w-all"
        # A preview from ComfyUI reaches subscribers as a binary frame tagged with the job id.
        png = b"\x89PNG\r\n\x1a\nfake"
        server.services.bus.live("w-all", "preview", {"node": "4", "mime": "image/png"}, png)
        msg = await ws.receive(10)
        assert msg.type == aiohttp.WSMsgType.BINARY
        (n,) = struct.unpack(">I", msg.data[:4])
        head = json.loads(msg.data[4 : 4 + n])
        assert head["job_id"] == "w-all" and head["mime"] == "image/png" and head["node"] == "4"
        assert msg.data[4 + n :] == png


async def test_ws_is_kept_alive_with_pings(server: Server) -> None:
    async with server.session.ws_connect(server.u("/ws"), autoping=False) as ws:
        msg = await ws.receive(5)  # ws_heartbeat is 1 s in this server
        assert msg.type == aiohttp.WSMsgType.PING
        await ws.pong(msg.data)


async def test_many_subscribers_all_get_a_final_result_that_is_final(
    server: Server, simulator: Simulator
) -> None:
    # 300 streams on 3 running jobs: every final_result must carry the finished Result, read after
    # the commit it announces (a stale read would show the job still post-processing).
    await wait_healthy(server)
    slow(simulator, 0.3, steps=5)
    ids = []
    for _ in range(3):
        async with server.session.post(server.u("/generate"), json=body(blur=True)) as r:
            ids.append((await r.json())["id"])

    async def follow(job_id: str) -> Sse:
        async with server.session.get(server.u(f"/jobs/{job_id}/events")) as r:
            return await read_sse(r, Sse())

    results = await asyncio.gather(*(follow(ids[i % 3]) for i in range(300)))
    for got in results:
        assert got.final is not None and got.final["result"]["status"] == "completed"
        assert (
            got.final["result"]["output"] and got.final["message"] == got.final["result"]["message"]
        )
        assert got.state_ids() == sorted(set(got.state_ids()))
