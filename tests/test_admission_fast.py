"""The admission path's per-request shortcuts give the answers of the general code."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

from comfyq import admission
from comfyq import limits as lim


def test_job_ids_from_batches_are_unique_and_well_formed() -> None:
    ids = [admission.new_job_id() for _ in range(3 * admission._RANDOM_IDS + 7)]  # 3 refills
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[12:] for i in ids}) == len(ids)  # the random parts differ, not only the times
    assert ids == sorted(ids, key=lambda i: i[:12])  # minted in time order


def test_a_cleared_batch_is_read_again() -> None:
    admission._id_random.clear()  # what a forked child does
    assert re.fullmatch(r"[0-9a-f]{32}", admission.new_job_id())


@pytest.mark.parametrize(
    "body",
    [
        b'{"input": {"workflow_json": {"1": {"class_type": "X", "inputs": {}}}}}',
        b'{"input": {"webhook": {"url": "https://example.com/h"}}}',
        b'{"input": {"webhook": {"url": "https:\\/\\/example.com"}}}',
        b'{"input": {"images": [{"name": "a", "image": "\\u0068ttp"}]}}',
        b"",
    ],
)
def test_url_and_bracket_shortcuts_match_the_chunked_scans(body: bytes) -> None:
    chunked = (
        lim.contains(body, b"://") or lim.contains(body, b":\\/") or lim.contains(body, b"\\u")
    )
    assert admission.may_hold_urls(body) is chunked
    assert admission._brackets(body) == lim.count(body, b"{", b"[")


def test_a_large_body_still_takes_the_chunked_scans() -> None:
    body = b"[" * (lim.SCAN_STEP + 10) + b'"://"'
    assert admission.may_hold_urls(body)
    assert admission._brackets(body) > admission.MAX_DEPTH


def test_limits_follow_the_settings_values() -> None:
    def settings(items: int) -> SimpleNamespace:
        return SimpleNamespace(
            max_body_bytes=1 << 30,
            max_json_bytes=1 << 20,
            max_json_items=items,
            max_workflow_nodes=50,
        )

    a, b = admission._limits(settings(10)), admission._limits(settings(20))
    assert (a.json_items, b.json_items) == (10, 20)
    assert admission._limits(settings(10)) is a
    assert a == lim.BodyLimits.from_settings(settings(10))


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("ok/name", None),
        ("a..b", None),
        ("../x", "inside"),
        ("a/../b", "inside"),
        ("a\\..\\b", "inside"),
        ("/abs", "inside"),
        ("bad\nname", "control"),
    ],
)
def test_output_paths_in_a_workflow(prefix: str, why: str | None) -> None:
    wf = {
        "1": {"class_type": "A", "inputs": {"n": 1}},
        "2": {"class_type": "S", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
    errors = lim.workflow_errors(wf, lim.DEFAULT)
    if why is None:
        assert errors == []
    else:
        assert [e["path"] for e in errors] == ["$.input.workflow_json['2'].inputs.filename_prefix"]
        assert why in errors[0]["message"]


def test_links_still_find_a_cycle() -> None:
    wf: dict[str, Any] = {
        "1": {"class_type": "A", "inputs": {"x": ["3", 0], "s": "text", "l": [1, 2, 3]}},
        "2": {"class_type": "B", "inputs": {"x": ["1", 0]}},
        "3": {"class_type": "C", "inputs": {"x": ["2", 1]}},
    }
    errors = lim.workflow_errors(wf, lim.DEFAULT)
    assert len(errors) == 1 and "cycle" in errors[0]["message"]
    wf["1"]["inputs"]["x"] = ["9", 0]  # reads from a node that reads nothing: no cycle
    assert lim.workflow_errors(wf, lim.DEFAULT) == []
