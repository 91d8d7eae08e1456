"""The stepped scans of a JSON body (``comfyq.limits.count`` / ``contains``) give the answers of
the one-call ``bytes.count`` / ``in`` they replace, whatever the step boundaries cut."""

from __future__ import annotations

import os

import pytest

from comfyq import limits as lim


@pytest.mark.parametrize("size", [0, 1, lim.SCAN_STEP - 1, lim.SCAN_STEP, 3 * lim.SCAN_STEP + 5])
def test_count_and_contains_match_the_single_pass(size: int) -> None:
    body = bytes(b % 96 + 32 for b in os.urandom(size))  # printable, with , : { [ and friends
    assert lim.count(body, b",", b":") == body.count(b",") + body.count(b":")
    for needle in (b"://", b":\\/", b"\\u", b"~~~~~~~"):
        assert lim.contains(body, needle) == (needle in body)


def test_a_needle_across_a_step_boundary_is_found_and_count_stops_early() -> None:
    for cut in (1, 2):
        body = b"x" * (lim.SCAN_STEP - cut) + b"://" + b"y" * 10
        assert lim.contains(body, b"://")
    body = b"{" * (2 * lim.SCAN_STEP)
    assert lim.count(body, b"{", over=10) == lim.SCAN_STEP  # the first step was enough
