"""What the stages read of a job's payload without decoding all of it (issue 19), and the
workflow checks of admission (issue 13)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from comfyq import limits as lim
from comfyq.result import delivery_options, has_webhook, wants_base64
from comfyq.stages.generate import _asks_history
from comfyq.stages.postprocess import _options
from comfyq.store.model import DECODE_IN_PIECES, Job


def _job(payload: Any, prepared: Any = None) -> Job:
    def text(v: Any) -> str | None:
        return None if v is None else json.dumps(v)

    return Job({"id": "j", "payload": text(payload), "prepared": text(prepared)})


def _big_workflow(n: int) -> dict[str, Any]:
    return {
        str(i): {"class_type": "Node", "inputs": {"x": [str(i - 1), 0], "s": "a"}}
        for i in range(1, n + 1)
    }


class _Flag(msgspec.Struct):
    include_comfyui_response: Any = None


class _View(msgspec.Struct):
    input: _Flag | None = None


def test_a_view_reads_only_the_named_fields() -> None:
    job = _job({"input": {"workflow_json": _big_workflow(50), "include_comfyui_response": True}})
    view = job.view("payload", _View)
    assert view == _View(input=_Flag(include_comfyui_response=True))
    assert "payload" not in job._decoded  # not decoded whole on the way
    assert job.view("prepared", _View) is None  # NULL column
    job.payload["input"]["include_comfyui_response"] = False  # decoded whole: the view follows it
    assert job.view("payload", _View) == _View(input=_Flag(include_comfyui_response=False))
    with pytest.raises(msgspec.ValidationError):
        _job({"input": [1, 2]}).view("payload", _View)


@pytest.mark.parametrize(
    ("payload", "asks"),
    [
        ({"input": {"workflow_json": {}, "include_comfyui_response": True}}, True),
        ({"input": {"include_comfyui_response": False}}, False),
        ({"input": {"include_comfyui_response": None}}, False),
        ({"input": {"include_comfyui_response": 1}}, True),
        ({"input": {}}, False),
        ({"input": None}, False),
        ({"v2": True}, False),
        ({"input": "odd"}, False),  # not admission's shape: read whole, falsy
        (None, False),
    ],
)
def test_the_generate_stage_reads_its_flag_as_before(payload: Any, asks: bool) -> None:
    assert _asks_history(_job(payload)) is asks


def test_the_postprocess_stage_reads_convert_and_s3() -> None:
    s3 = {"bucket_name": "b", "endpoint_url": "http://127.0.0.1:9"}
    payload = {
        "input": {"workflow_json": _big_workflow(20), "convert": {"format": "webp"}, "s3": s3}
    }
    assert _options(_job(payload)) == {"convert": {"format": "webp"}, "s3": s3}
    assert _options(_job({"input": {"workflow_json": {}}})) == {"convert": None, "s3": None}
    assert _options(_job({"input": None})) == {}
    assert _options(_job({"input": "odd"})) == {}
    assert _options(_job(None)) == {}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {
                "input": {
                    "workflow_json": _big_workflow(20),
                    "return_outputs_as_base64": True,
                    "webhook": {"url": "http://127.0.0.1:9/h", "timeout": 3},
                }
            },
            (True, {"url": "http://127.0.0.1:9/h", "timeout": 3}),
        ),
        ({"input": {"workflow_json": {}, "webhook": "odd"}}, (False, {})),
        ({"input": {"return_outputs_as_base64": 0}}, (False, {})),
        ({"input": None}, (False, {})),
        ({"input": "odd"}, (False, {})),  # not admission's shape: read whole
        (None, (False, {})),
    ],
)
def test_results_and_webhooks_read_their_two_options_as_before(
    payload: Any, expected: tuple[bool, dict[str, Any]]
) -> None:
    job = _job(payload)
    assert delivery_options(job) == expected
    assert wants_base64(job) is expected[0]
    assert has_webhook(job) is bool(expected[1].get("url"))
    if isinstance(payload, dict) and isinstance(payload.get("input"), dict):
        assert "payload" not in job._decoded  # the workflow was not built on the way


async def test_a_fresh_decode_is_the_callers_own() -> None:
    payload = {"input": {"workflow_json": _big_workflow(10)}}
    job = _job(payload)
    first = await job.decode_fresh("payload")
    assert first == payload
    first["input"]["workflow_json"]["1"]["inputs"]["x"] = "changed"
    assert job.payload == payload  # neither cached nor shared
    assert await job.decode_fresh("payload") == payload
    assert await job.decode_fresh("prepared") is None
    # Over the threshold the decode goes in pieces: the same document (and key order) comes back.
    big = {"input": {"workflow_json": _big_workflow(2000), "pad": "x" * DECODE_IN_PIECES}}
    got = await _job(big).decode_fresh("payload")
    assert got == big
    assert json.dumps(got) == json.dumps(big)  # same key order
    odd = {"a": [_big_workflow(500), [], {}, "x" * 70_000, [[1] * 30_000]], "b": None, "c": 1.5}
    got = await _job(odd).decode_fresh("payload")
    assert json.dumps(got) == json.dumps(odd)


def _naive_cycle(links: dict[str, list[str]]) -> bool:
    """Whether ``links`` has a cycle: repeatedly drop nodes all of whose deps are gone (Kahn's
    peeling, with a count of deps left per node, so a 5000-node chain costs 5000 steps, not
    5000 rounds over every node left)."""
    waiting = {k: sum(1 for d in v if d in links) for k, v in links.items()}
    needed_by: dict[str, list[str]] = {k: [] for k in links}
    for k, v in links.items():
        for d in v:
            if d in links:
                needed_by[d].append(k)
    free = [k for k, n in waiting.items() if n == 0]
    dropped = 0
    while free:
        k = free.pop()
        dropped += 1
        for user in needed_by[k]:
            waiting[user] -= 1
            if waiting[user] == 0:
                free.append(user)
    return dropped < len(links)


@pytest.mark.parametrize(
    "links",
    [
        {},
        {"1": ["1"]},
        {"1": ["2"], "2": ["3"], "3": []},
        {"1": ["2"], "2": ["3"], "3": ["1"]},
        {"1": ["9"], "2": ["1", "9"]},  # dangling references read from nothing
        {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []},  # a diamond
        {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": ["c"]},
        {str(i): [str(i - 1)] for i in range(1, 5001)},  # a long chain
        {**{str(i): [str(i - 1)] for i in range(1, 5001)}, "0": ["5000"]},
    ],
)
def test_find_cycle_finds_a_node_on_a_cycle_or_none(links: dict[str, list[str]]) -> None:
    found = lim.find_cycle(links)
    assert (found is not None) is _naive_cycle(links)
    if found is not None:  # the node it names reaches itself
        seen, todo = set(), list(links[found])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += links.get(n, [])
        assert found in seen


def test_workflow_errors_name_every_bad_part() -> None:
    wf: dict[str, Any] = {
        "1": {"class_type": "A", "inputs": {"filename_prefix": "../x", "v": 1}},
        "2\n": {"class_type": "B", "inputs": {}},
        "3": {"class_type": "C\x00", "inputs": {"a": ["1", 0]}},
        "4": "not a node",
        "5": {"class_type": "D", "inputs": "not inputs"},
    }
    paths = [e["path"] for e in lim.workflow_errors(wf, lim.DEFAULT)]
    assert paths == [
        "$.input.workflow_json['1'].inputs.filename_prefix",
        "$.input.workflow_json",
        "$.input.workflow_json['3'].class_type",
    ]
    unlinked = {str(i): {"class_type": "A", "inputs": {"v": i}} for i in range(100)}
    assert lim.workflow_errors(unlinked, lim.DEFAULT) == []
    looped = {
        "1": {"class_type": "A", "inputs": {"a": ["2", 0]}},
        "2": {"class_type": "B", "inputs": {"b": ["1", 1]}},
    }
    assert [e["path"] for e in lim.workflow_errors(looped, lim.DEFAULT)] in (
        ["$.input.workflow_json['1']"],
        ["$.input.workflow_json['2']"],
    )
