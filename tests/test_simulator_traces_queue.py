"""Replays the recorded ComfyUI traces for runtime errors, queue/interrupt/delete, history
endpoints, kill -9 and restart, and reconnects (40, 50, 51, 60, 70, 90)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.sim import (
    Frame,
    WsRecorder,
    data_of,
    shape,
    upload_image,
    wait_history,
)
from support.traces import post_prompt, recorded_types, run_traced, trace

from comfyq.sim import Simulator
from comfyq.sim.generation import OLD


@pytest.fixture
def comfyui_version() -> str:
    """The recorded 0.3.64 traffic is this file's reference (see test_simulator_newer for 0.38)."""
    return OLD


# ---------------------------------------------------------------- runtime error (40)


async def test_execution_error_on_corrupt_image(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    t = trace("40_run_execution_error_corrupt_image.json")
    async with await upload_image(
        http, sim.url, "probe_corrupt_0789ca.png", b"this is not an image!!!!"
    ):
        pass
    rec, pid, _ = await run_traced(http, sim, "40_run_execution_error_corrupt_image.json")
    assert rec.types() == recorded_types(t)
    err = data_of(rec.frames, "execution_error")[0]
    recorded = next(
        m["msg"]["data"] for m in t["ws_messages_in_order"] if m["msg"]["type"] == "execution_error"
    )
    assert shape(err) == shape(recorded)
    for key in (
        "node_id",
        "node_type",
        "executed",
        "exception_type",
        "current_inputs",
        "current_outputs",
    ):
        assert err[key] == recorded[key], key
    path = sim.env.data_dir / "input" / "probe_corrupt_0789ca.png"
    assert err["exception_message"] == f"cannot identify image file '{path}'\n"
    assert all(isinstance(line, str) for line in err["traceback"])
    entry = await wait_history(http, sim.url, pid)
    assert shape(entry) == shape(next(iter(t["history_after"]["response"]["body"].values())))
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    assert entry["outputs"] == {} and entry["meta"] == {}
    assert entry["status"]["messages"][-1][0] == "execution_error"


# ---------------------------------------------------------------- queue, interrupt, delete (50, 51)

SLOW = {"ImageBlur": 0.25}


def non_status(frames: list[Frame], pid: str) -> list[str]:
    """Types of one prompt's messages (status broadcasts removed)."""
    out = []
    for f in frames:
        d = f.data if isinstance(f.data, dict) else {}
        if f.type != "status" and d.get("prompt_id") == pid:
            out.append(f.type)
    return out


async def test_queue_delete_front_and_interrupt(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    t = trace("50_queue_interrupt_delete.json")
    ex = t["exchanges"]
    async with Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        rec = await WsRecorder(http, sim.url, "cid-50").connect()
        await rec.wait_for(lambda fs: len(fs) >= 1)

        def body(key: str) -> dict[str, Any]:
            return {**ex[key]["request"]["json"], "client_id": "cid-50"}

        slow = await post_prompt(http, sim, body("post_slow_running"))
        await rec.wait_for(
            lambda fs: any(f.type == "executing" and f.data.get("node") == "100" for f in fs)
        )
        pend = [await post_prompt(http, sim, body(f"post_pending_{i}")) for i in range(3)]
        front = await post_prompt(http, sim, body("post_pending_front_true"))
        numbers = [p["number"] for p in pend]
        assert numbers == [slow["number"] + 1 + i for i in range(3)]
        assert front["number"] == -(slow["number"] + 4)
        async with http.get(sim.url + "/queue") as r:
            queue = await r.json()
        assert shape(queue) == shape(ex["get_queue_while_running_and_pending"]["response"]["body"])
        assert [q[1] for q in queue["queue_running"]] == [slow["prompt_id"]]
        n = slow["number"]
        assert [q[0] for q in queue["queue_pending"]] == [-(n + 4), n + 1, n + 3, n + 2]  # heap
        async with http.get(sim.url + "/prompt") as r:
            assert await r.json() == {"exec_info": {"queue_remaining": 5}}
        for ids in ([pend[0]["prompt_id"]], [slow["prompt_id"]], ["nope-not-an-id"]):
            async with http.post(sim.url + "/queue", json={"delete": ids}) as r:
                assert r.status == 200 and await r.read() == b""
        async with http.get(sim.url + "/queue") as r:
            queue = await r.json()
        assert [q[0] for q in queue["queue_pending"]] == [-(n + 4), n + 3, n + 2]
        assert len(queue["queue_running"]) == 1
        async with http.post(sim.url + "/interrupt", json={"prompt_id": pend[1]["prompt_id"]}):
            pass  # not running: ignored
        async with http.post(sim.url + "/interrupt", json={"prompt_id": slow["prompt_id"]}) as r:
            assert r.status == 200 and await r.read() == b""
        await rec.wait_done(slow["prompt_id"])
        interrupted = data_of(rec.frames, "execution_interrupted")[0]
        recorded = ex["history_interrupted"]["response"]["body"]
        assert interrupted["node_id"] == "101" and sorted(interrupted["executed"]) == ["1", "100"]
        assert non_status(rec.frames, slow["prompt_id"])[-3:] == [
            "executing",
            "execution_interrupted",
            "executing",
        ]
        h = await wait_history(http, sim.url, slow["prompt_id"])
        assert shape(h) == shape(next(iter(recorded.values())))
        assert h["status"]["messages"][-1][0] == "execution_interrupted"
        assert (h["status"]["status_str"], h["outputs"]) == ("error", {})
        for p in (front, pend[1], pend[2]):
            await rec.wait_done(p["prompt_id"])
        order = [d["prompt_id"] for d in data_of(rec.frames, "execution_start")]
        assert order == [
            slow["prompt_id"],
            front["prompt_id"],
            pend[1]["prompt_id"],
            pend[2]["prompt_id"],
        ]  # strictly one at a time, in number order
        async with http.get(f"{sim.url}/history/{pend[0]['prompt_id']}") as r:
            assert await r.json() == {}
        assert (await wait_history(http, sim.url, front["prompt_id"]))["status"]["completed"]

        # The global interrupt below must land while the slow node runs, after three more requests:
        # give it time to spare on a loaded machine.
        sim.node_durations = {"ImageBlur": 1.0}
        slow2 = await post_prompt(http, sim, body("post_slow_2"))
        await rec.wait_for(
            lambda fs: any(
                f.type == "executing"
                and f.data.get("node") == "100"
                and f.data.get("prompt_id") == slow2["prompt_id"]
                for f in fs
            )
        )
        cleared = await post_prompt(http, sim, body("post_pending_for_clear"))
        async with http.post(sim.url + "/queue", json={"clear": True}) as r:
            assert r.status == 200 and await r.read() == b""
        async with http.get(sim.url + "/queue") as r:
            queue = await r.json()
        assert queue["queue_pending"] == [] and len(queue["queue_running"]) == 1
        async with http.post(sim.url + "/interrupt") as r:  # no body: global
            assert r.status == 200
        await rec.wait_done(slow2["prompt_id"])
        h2 = await wait_history(http, sim.url, slow2["prompt_id"])
        assert h2["status"]["messages"][-1][1]["node_id"] == "101"
        async with http.get(f"{sim.url}/history/{cleared['prompt_id']}") as r:
            assert await r.json() == {}
        async with http.post(sim.url + "/interrupt", json={}) as r:  # idle: no effect
            assert r.status == 200
        again = await post_prompt(http, sim, body("post_pending_0"))
        assert (await wait_history(http, sim.url, again["prompt_id"]))["status"]["completed"]
        await rec.close()


@pytest.mark.parametrize("case", ["case1_with_client_id_A", "case2_without_client_id"])
async def test_interrupt_routing(case: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("51_interrupt_who_receives.json")[case]
    async with Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        a = await WsRecorder(http, sim.url, "client-a").connect()
        b = await WsRecorder(http, sim.url, "client-b").connect()
        await a.wait_for(lambda fs: len(fs) >= 1)
        await b.wait_for(lambda fs: len(fs) >= 1)
        req = dict(t["post_prompt"]["request"]["json"])
        if "client_id" in req:
            req["client_id"] = "client-a"
        p = await post_prompt(http, sim, req)
        await a.wait_for(lambda fs: sum(f.type == "progress_state" for f in fs) >= 3)
        async with http.post(sim.url + "/interrupt") as r:
            assert r.status == 200
        await wait_history(http, sim.url, p["prompt_id"])
        for rec, key in ((a, "A_types"), (b, "B_types")):
            want = 1 + len(t[key])

            def enough(fs: list[Frame], want: int = want) -> bool:
                return len(fs) >= want

            await rec.wait_for(enough)
            assert rec.types()[1:] == t[key], key
        await a.close()
        await b.close()


# ---------------------------------------------------------------- history endpoints (60)


async def test_history_endpoints(sim: Simulator, http: aiohttp.ClientSession) -> None:
    good = trace("30_prompt_error_k_client_supplied_prompt_id.json")["request"]["json"]["prompt"]
    ids = []
    for i in range(3):
        body = await post_prompt(http, sim, {"prompt": good, "prompt_id": f"p{i}"})
        ids.append(body["prompt_id"])
        await wait_history(http, sim.url, body["prompt_id"])
    async with http.get(sim.url + "/history?max_items=2") as r:
        assert list(await r.json()) == ["p1", "p2"]
    async with http.get(sim.url + "/history?max_items=1&offset=0") as r:
        assert list(await r.json()) == ["p0"]
    async with http.post(sim.url + "/history", json={"delete": ["p1"]}) as r:
        assert r.status == 200 and await r.read() == b""
    for pid in ("p1", "00000000-0000-0000-0000-000000000000"):
        async with http.get(f"{sim.url}/history/{pid}") as r:
            assert await r.json() == {}
    async with http.get(sim.url + "/history") as r:
        assert list(await r.json()) == ["p0", "p2"]
    async with http.post(sim.url + "/history", json={"clear": True}) as r:
        assert r.status == 200
    async with http.get(sim.url + "/history") as r:
        assert await r.json() == {}
    async with http.get(sim.url + "/history?max_items=abc") as r:
        assert r.status == 500


# ---------------------------------------------------------------- kill -9 and restart (70)


async def test_crash_and_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("70_kill9_restart.json")
    async with Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        url = sim.url
        a = await WsRecorder(http, url, "client-A").connect()
        b = await WsRecorder(http, url, "observer-B").connect()
        await a.wait_for(lambda fs: len(fs) >= 1)
        done_req = {**t["post_pending_0"]["request"]["json"], "client_id": "client-A"}
        done_req["prompt"]["3"]["inputs"]["filename_prefix"] = "probe_prekill"
        done = await post_prompt(http, sim, done_req)
        await a.wait_done(done["prompt_id"])
        slow = await post_prompt(
            http, sim, {**t["post_slow"]["request"]["json"], "client_id": "client-A"}
        )
        pending = [
            await post_prompt(http, sim, {**t[k]["request"]["json"], "client_id": "client-A"})
            for k in ("post_pending_0", "post_pending_1")
        ]
        await a.wait_for(
            lambda fs: any(f.type == "executing" and f.data.get("node") == "100" for f in fs)
        )
        (sim.env.data_dir / "temp" / "scratch.png").write_bytes(b"x")
        await sim.crash()
        for rec in (a, b):
            closing = await rec.wait_closed()
            assert closing.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert a.frames[-1].type != "execution_interrupted"
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(url + "/system_stats"):
                pass
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.ws_connect(url + "/ws?clientId=client-A")
        await sim.restart()
        assert sim.url == url
        after = t["after_restart"]
        async with http.get(url + "/queue") as r:
            assert await r.json() == after["get_queue"]["response"]["body"]
        async with http.get(url + "/prompt") as r:
            assert await r.json() == after["get_prompt"]["response"]["body"]
        async with http.get(url + "/history") as r:
            assert await r.json() == {}
        for pid in [done["prompt_id"], slow["prompt_id"]] + [p["prompt_id"] for p in pending]:
            async with http.get(f"{url}/history/{pid}") as r:
                assert await r.json() == {}
        async with http.get(url + "/view?filename=probe_prekill_00001_.png&type=output") as r:
            assert r.status == 200
        assert not (sim.env.data_dir / "temp" / "scratch.png").exists()
        again = await WsRecorder(http, url, "client-A").connect()
        await again.wait_for(lambda fs: len(fs) >= 1)
        recorded = [m["msg"] for m in after["reconnect_same_clientId_messages"]]
        assert [f.type for f in again.frames] == [m["type"] for m in recorded] == ["status"]
        assert again.frames[0].data == {**recorded[0]["data"], "sid": "client-A"}
        req = {
            **after["post_prompt_after_restart_number_resets"]["request"]["json"],
            "client_id": "client-A",
        }
        body = await post_prompt(http, sim, req)
        assert body["number"] == 0
        await again.wait_done(body["prompt_id"])
        assert again.types() == after["first_run_after_restart_ws_types"]
        assert sim.prompts_received[-1] == body["prompt_id"]
        for rec in (a, b, again):
            await rec.close()


# ---------------------------------------------------------------- reconnect and corners (90)


async def test_reconnect_mid_run_and_corners(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    t = trace("90_extra_reconnect_and_corners.json")
    async with Simulator(comfyui_version=OLD, data_dir=tmp_path / "c", node_durations=SLOW) as sim:
        anon = await WsRecorder(http, sim.url).connect()
        await anon.wait_for(lambda fs: len(fs) >= 1)
        assert re.fullmatch(r"[0-9a-f]{32}", anon.frames[0].data["sid"])
        assert shape(anon.frames[0].data) == shape(t["ws_without_clientId_first_message"]["data"])
        a = await WsRecorder(http, sim.url, "reconnect-1").connect()
        await a.wait_for(lambda fs: len(fs) >= 1)
        slow = await post_prompt(
            http, sim, t["post_slow"]["request"]["json"] | {"client_id": "reconnect-1"}
        )
        nxt = await post_prompt(
            http,
            sim,
            t["post_with_unconnected_client_id"]["request"]["json"] | {"client_id": "reconnect-1"},
        )
        await a.wait_for(
            lambda fs: any(f.type == "executing" and f.data.get("node") == "100" for f in fs)
        )
        for pid in (slow["prompt_id"], nxt["prompt_id"]):
            async with http.get(f"{sim.url}/history/{pid}") as r:
                assert await r.json() == {}
        await a.close()
        b = await WsRecorder(http, sim.url, "reconnect-1").connect()
        await b.wait_done(nxt["prompt_id"])
        recorded_b = [m["msg"] for m in t["socket_B_same_clientId_reconnected_mid_run_messages"]]
        assert b.frames[1].data == {"node": "100"} == recorded_b[1]["data"]
        assert b.types() == [m["type"] for m in recorded_b]
        nobody = await post_prompt(
            http, sim, t["post_with_unconnected_client_id"]["request"]["json"]
        )
        assert (await wait_history(http, sim.url, nobody["prompt_id"]))["prompt"][3] == {
            "client_id": "nobody-listens"
        }
        numbered = await post_prompt(http, sim, t["post_with_explicit_number"]["request"]["json"])
        assert numbered["number"] == 5.0 and isinstance(numbered["number"], float)
        async with http.get(sim.url + "/api/queue") as r:
            assert shape(await r.json()) == shape(t["api_prefix_queue"]["response"]["body"])
        api = await post_prompt(http, sim, t["api_prefix_prompt_post"]["request"]["json"])
        assert api["number"] == nobody["number"] + 1  # explicit numbers do not advance it
        async with http.get(sim.url + "/features") as r:
            assert await r.json() == t["features"]["response"]["body"]
        async with http.post(sim.url + "/free", json=t["post_free"]["request"]["json"]) as r:
            assert r.status == 200 and await r.read() == b""
        for rec in (anon, b):
            await rec.close()
