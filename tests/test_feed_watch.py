"""A prompt's watch (one lazily moved timer, not one per wait) and lazily decoded text frames."""

from __future__ import annotations

import asyncio
import json

import pytest

from comfyq.comfy.feed import Item, StoredWorkflow, Watch
from comfyq.comfy.protocol import Executing, ProtocolError, Status, parse_text_frame


async def test_a_wait_times_out_at_its_own_deadline_not_an_earlier_ones() -> None:
    loop = asyncio.get_running_loop()
    w = Watch("p", None, gap=False)
    w.push(Item("poke"))
    assert (await w.get(0.05)).kind == "poke"  # type: ignore[union-attr]
    # The timer armed for the first wait (0.05 s) must not end this longer one early.
    getter = asyncio.ensure_future(w.get(0.05))
    await asyncio.sleep(0)
    w.push(Item("poke"))
    assert (await getter).kind == "poke"  # type: ignore[union-attr]
    t0 = loop.time()
    assert await asyncio.wait_for(w.get(0.3), 5) is None
    assert loop.time() - t0 >= 0.29


async def test_a_shorter_wait_after_a_longer_one_times_out_at_once() -> None:
    w = Watch("p", None, gap=False)
    getter = asyncio.ensure_future(w.get(30))
    await asyncio.sleep(0)
    w.push(Item("ws_up"))
    assert (await getter).kind == "ws_up"  # type: ignore[union-attr]
    assert await asyncio.wait_for(w.get(0.01), 5) is None  # not the 30 s timer still armed
    assert await asyncio.wait_for(w.get(0), 5) is None


async def test_items_pushed_while_nobody_waits_are_kept_in_order_and_close_drops_the_timer() -> (
    None
):
    w = Watch("p", None, gap=False)
    assert await w.get(0.01) is None
    getter = asyncio.ensure_future(w.get(30))
    await asyncio.sleep(0)
    for kind in ("ws_down", "ws_up", "poke"):
        w.push(Item(kind))
    got = [await getter, await w.get(1), await w.get(1)]
    assert [i.kind for i in got if i is not None] == ["ws_down", "ws_up", "poke"] and w.gap
    assert w._timer is not None  # still armed for the 30 s wait: moved, not re-created
    w.close()
    assert w._timer is None


async def test_a_cancelled_wait_leaves_the_watch_usable() -> None:
    w = Watch("p", None, gap=False)
    getter = asyncio.ensure_future(w.get(30))
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    w.push(Item("poke"))
    assert (await w.get(1)).kind == "poke"  # type: ignore[union-attr]


def test_text_frames_decode_into_their_type_and_data_on_demand() -> None:
    data = {"node": "3", "display_node": "3", "prompt_id": "abc", "extra": [1, {"x": None}]}
    msg = parse_text_frame(json.dumps({"type": "executing", "data": data}))
    assert isinstance(msg.parsed, Executing) and msg.parsed.node == "3"
    assert msg.prompt_id == "abc"
    assert msg.data == data  # unknown keys kept, as ComfyUI sent them
    status = parse_text_frame(
        b'{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 2}},'
        b' "sid": "s1"}}'
    )
    assert (
        isinstance(status.parsed, Status)
        and status.parsed.queue_remaining == 2
        and status.prompt_id is None
    )
    other = parse_text_frame('{"type": "crystools.monitor", "data": {"prompt_id": "p9", "cpu": 1}}')
    assert other.parsed is None and other.prompt_id == "p9" and other.data["cpu"] == 1
    assert parse_text_frame('{"type": "execution_start"}').data == {}
    # Routed by its prompt id alone; the per-node states (every node of the workflow) are
    # decoded only when read, as sent.
    nodes = {str(i): {"value": 1.0, "max": 1.0, "state": "finished"} for i in range(50)}
    state = parse_text_frame(
        json.dumps({"type": "progress_state", "data": {"prompt_id": "p1", "nodes": nodes}})
    )
    assert state.type == "progress_state" and state.prompt_id == "p1"
    assert state.data == {"prompt_id": "p1", "nodes": nodes}


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "executing", "data": 5}',
        '{"type": "executing", "data": {"node": 5}}',
        '{"type": "crystools.monitor", "data": [1]}',
        '{"data": {}}',
        '{"type": "executing", "data": {"node": "1"}',
    ],
)
def test_bad_text_frames_are_protocol_errors(raw: str) -> None:
    with pytest.raises(ProtocolError):
        parse_text_frame(raw)


async def test_a_consumer_takes_items_only_while_the_reader_waits_with_nothing_buffered() -> None:
    w = Watch("p", None, gap=False)
    taken: list[str] = []

    def consumer(item: Item) -> bool:
        if item.kind == "poke":
            return False  # left to the reader
        taken.append(item.kind)
        return True

    w.consumer = consumer
    w.push(Item("event"))  # nobody waits: buffered, not taken
    assert taken == []
    assert (await w.get(1)).kind == "event"  # type: ignore[union-attr]
    getter = asyncio.ensure_future(w.get(30))
    await asyncio.sleep(0)
    w.push(Item("event"))  # the reader waits: taken at once, the reader stays asleep
    assert taken == ["event"] and not getter.done()
    w.push(Item("poke"))  # refused: wakes the reader
    w.push(Item("event"))  # behind a buffered item: kept in order for the reader
    assert (await getter).kind == "poke"  # type: ignore[union-attr]
    assert (await w.get(1)).kind == "event"  # type: ignore[union-attr]
    assert taken == ["event"]


@pytest.mark.parametrize(
    "workflow",
    [
        {
            "1": {"class_type": "KSampler", "inputs": {"seed": 1}},
            "2": {"class_type": "KSampler", "inputs": {}},
            "3": {"inputs": {}},  # no class_type
            "4": {"class_type": 7},  # not a string
            'q"\\5': {"class_type": "Quoted", "inputs": {}},
        },
        {  # a node that is not an object: the narrow read gives way to a whole one
            "1": {"class_type": "KSampler"},
            "2": ["not", "a", "node"],
            "3": None,
        },
        {},
    ],
)
def test_a_stored_workflow_names_node_types_as_its_dict(workflow: dict[str, object]) -> None:
    stored = StoredWorkflow(json.dumps(workflow).encode())
    by_dict = Watch("p", workflow, gap=False)
    by_text = Watch("p", stored, gap=False)
    for node in [*workflow, "absent", None]:
        assert by_text.node_type(node) == by_dict.node_type(node), node
    # Read one node at a time (a rejection naming one), the whole node as in the dict.
    for node, spec in workflow.items():
        assert stored[node] == spec and stored.get(node) == spec
    assert stored.get("absent") is None and "absent" not in stored
    assert bool(stored) == bool(workflow) and list(stored) == list(workflow)
    assert len(stored) == len(workflow)
    assert not StoredWorkflow(b" { } ") and StoredWorkflow(b'{"1": {}}')
