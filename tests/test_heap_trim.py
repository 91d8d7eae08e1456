"""``HeapTrim`` (issue 19): after large bodies, the heap's free pages are given back to the
system once, a while after the last one, off the event loop."""

from __future__ import annotations

import asyncio
import ctypes.util

import pytest

from comfyq.limits import HeapTrim

GLIBC = bool(ctypes.util.find_library("c"))


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
async def test_a_burst_of_large_bodies_gets_one_trim_after_the_last() -> None:
    trim = HeapTrim(delay=0.2)
    for _ in range(5):  # a burst: each body pushes the trim on
        trim.soon()
        await asyncio.sleep(0.05)
    assert trim.trims == 0
    async with asyncio.timeout(10):  # hang guard only
        while trim.trims == 0:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert trim.trims == 1
    assert trim.trim() is True and trim.trims == 2
