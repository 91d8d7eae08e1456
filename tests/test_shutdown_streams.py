"""``comfyq serve`` stops promptly while clients hold event streams open.

A real ``comfyq serve --simulate`` subprocess with an SSE stream (``GET /jobs/{id}/events``), a
``POST /generate/stream``, a ``/ws`` and a v2 stream (``GET /api/v2/jobs/{id}/events``) open on
jobs that are still running or waiting. SIGTERM ends every stream (the SSE ones end their
response, the websocket is closed with 1001 going away) and the process exits at once, not after
aiohttp's shutdown timeout; the jobs admitted before the stop complete after a restart.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.dashboard import Serve

SLOW = {
    "COMFYQ_SIMULATE_NODE_DURATION": "0.5",
    "COMFYQ_SIMULATE_PROGRESS_STEPS": "5",
    "COMFYQ_LEASE_SECONDS": "3",
    "COMFYQ_SHUTDOWN_GRACE": "0.5",
}


def long_workflow(color: int, blurs: int = 5) -> dict[str, Any]:
    """EmptyImage -> ImageBlur x ``blurs`` -> SaveImage: a few seconds on the slow simulator."""
    wf: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": color},
        }
    }
    prev = "1"
    for i in range(blurs):
        node = str(10 + i)
        wf[node] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [prev, 0], "blur_radius": 1, "sigma": 1.0},
        }
        prev = node
    wf["2"] = {"class_type": "SaveImage", "inputs": {"images": [prev, 0], "filename_prefix": "s"}}
    return wf


async def first_bytes(resp: aiohttp.ClientResponse) -> bytes:
    """The stream's first chunk: it is open and has said something."""
    assert resp.status == 200, await resp.text()
    chunk = await asyncio.wait_for(resp.content.readany(), 20)
    assert chunk, "the stream ended before its first event"
    return chunk


async def rest(resp: aiohttp.ClientResponse) -> bytes:
    """Everything until the server ends the stream (EOF)."""
    return await asyncio.wait_for(resp.content.read(), 10)


async def ws_until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[Any]:
    msgs: list[Any] = []
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return msgs
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            msgs.append(json.loads(msg.data))


async def open_streams_and_stop(srv: Serve) -> tuple[str, str, str]:
    assert srv.proc is not None
    async with aiohttp.ClientSession(srv.url) as http:
        async with http.post("/generate", json={"input": {"workflow_json": long_workflow(1)}}) as r:
            assert r.status == 202, await r.text()
            running = (await r.json())["id"]
        async with http.post("/api/v2/jobs", json={"workflow": long_workflow(2)}) as r:
            assert r.status == 201, await r.text()
            queued = (await r.json())["id"]
        sse = await http.get(f"/jobs/{running}/events")
        v2 = await http.get(f"/api/v2/jobs/{queued}/events")
        gen = await http.post(
            "/generate/stream", json={"input": {"workflow_json": long_workflow(3)}}
        )
        ws = await http.ws_connect("/ws", protocols=("comfyq",))
        try:
            head = await first_bytes(sse)
            assert b"data: " in head
            assert b"event: status" in await first_bytes(v2)
            assert b"data: " in await first_bytes(gen)
            streamed = gen.headers["Location"].rsplit("/", 1)[-1]
            await ws.send_json({"subscribe": [running, queued]})
            async with asyncio.timeout(20):  # each job's current state, at once
                seen = {(await ws.receive_json())["request_id"] for _ in range(2)}
            assert seen == {running, queued}

            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            ends = await asyncio.gather(rest(sse), rest(v2), rest(gen), ws_until_closed(ws))
            code = await asyncio.to_thread(srv.proc.wait, 30)
            took = time.monotonic() - t0
        finally:
            for resp in (sse, v2, gen):
                resp.release()
            await ws.close()
    assert code == 0, "".join(srv.lines[-30:])
    # A hang check, not a benchmark: without the streams ending, aiohttp waited for them until
    # its shutdown timeout (about 10 s per stop).
    assert took < 4, f"stopped in {took:.1f}s with streams open:\n" + "".join(srv.lines[-30:])
    # The streams ended cleanly, without their job's end (it had not come): a client resumes with
    # Last-Event-ID after the restart.
    assert b"final_result" not in ends[0] and b"final_result" not in ends[2]
    assert ws.close_code == 1001
    assert not any("Traceback" in line for line in srv.lines), "".join(srv.lines)
    return running, queued, streamed


@pytest.mark.timeout(120)
def test_sigterm_ends_open_streams_and_jobs_complete_after_restart(tmp_path: Path) -> None:
    srv = Serve(tmp_path, **SLOW).start()
    try:
        running, queued, streamed = asyncio.run(open_streams_and_stop(srv))
        srv.start()  # the same database and port
        for job_id in (running, streamed):
            assert srv.wait_final(job_id, timeout=60) == "completed"
        end = time.monotonic() + 60
        while True:
            status, job = srv.call("GET", f"/api/v2/jobs/{queued}")
            assert status == 200, job
            if job["status"] == "succeeded":
                break
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < end, job
            time.sleep(0.1)
    finally:
        srv.stop()


async def test_stop_streams_wakes_every_waiting_reader() -> None:
    from comfyq.events import Event, EventBus

    bus = EventBus()
    loop = asyncio.get_running_loop()
    plain = bus.subscribe("a")
    keyless = bus.subscribe()  # a websocket before its first subscribe message
    held = bus.subscribe("*")
    buffered = bus.subscribe("b")
    sock: asyncio.Future[None] = loop.create_future()
    waits = [
        asyncio.ensure_future(plain.get()),
        asyncio.ensure_future(keyless.get(also=sock)),
        asyncio.ensure_future(held.get(deadline=loop.time() + 60, hold=30)),
    ]
    await asyncio.sleep(0.01)  # every reader waits
    bus.publish(Event("b", "1", "state", {"state": "running"}))  # held: not woken for
    await asyncio.sleep(0.01)
    assert [w.done() for w in waits] == [False, False, False]
    bus.stop_streams()
    async with asyncio.timeout(1):
        got = await asyncio.gather(*waits)
    assert got[:2] == [None, None]
    assert got[2] is not None and got[2].job_id == "b"  # what it held comes out at once
    assert await held.get(deadline=loop.time() + 60) is None
    assert plain.stopping and keyless.stopping
    # What was buffered still comes first; then no read waits any more.
    ev = await buffered.get()
    assert ev is not None and ev.job_id == "b"
    late = bus.subscribe("c")
    async with asyncio.timeout(1):
        assert await buffered.get() is None
        assert await late.get(urgent=True, timeout=60) is None
        assert [e async for e in late] == []
    for sub in (plain, keyless, held, buffered, late):
        sub.close()
    assert not bus._open
