"""Files written from the event loop: batched hops keep every byte, in order, and the digest."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfyq.fileio import BatchedWriter, read_range, remove_if_present, write_file


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.binary(max_size=700), max_size=40),
    batch=st.integers(min_value=1, max_value=4096),
)
def test_every_chunk_reaches_the_file_and_the_digest(
    tmp_path: Path, chunks: list[bytes], batch: int
) -> None:
    path = tmp_path / "sub" / f"f{batch}-{len(chunks)}.bin"
    digest = hashlib.sha256()

    async def main() -> int:
        async with BatchedWriter(path, batch=batch, digest=digest) as w:
            for c in chunks:
                await w.write(c)
        return w.size

    size = asyncio.run(main())
    whole = b"".join(chunks)
    assert path.read_bytes() == whole and size == len(whole)
    assert digest.hexdigest() == hashlib.sha256(whole).hexdigest()


async def test_chunks_wait_in_memory_until_a_batch_is_full(tmp_path: Path) -> None:
    path = tmp_path / "out" / "f.bin"
    async with BatchedWriter(path, batch=100) as w:
        await w.write(b"a" * 60)
        assert not path.exists()  # no hop yet: not even the open
        await w.write(b"b" * 60)
        assert path.exists()  # the batch is full: one hop opened the file and wrote both
        await w.write(b"c" * 10)
    assert path.read_bytes() == b"a" * 60 + b"b" * 60 + b"c" * 10  # the last hop: rest, close


async def test_a_failure_inside_the_block_closes_without_writing_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        async with BatchedWriter(path, batch=4) as w:
            await w.write(b"1234")
            await w.write(b"56")
            raise RuntimeError("network gone")
    assert path.read_bytes() == b"1234"
    remove_if_present(path)
    remove_if_present(path)  # already gone: no error
    assert not path.exists()


def test_one_shot_helpers(tmp_path: Path) -> None:
    part, final = tmp_path / "a" / "x.part", tmp_path / "a" / "x"
    write_file(part, b"0123456789", replace=final)
    assert not part.exists() and final.read_bytes() == b"0123456789"
    assert read_range(final, 3, 4) == b"3456" and read_range(final, 8, 4) == b"89"
    assert read_range(final, 10, 4) == b""
    # Into the folder made by the first write, over an older file of the same name.
    write_file(part, b"abc", replace=final)
    assert not part.exists() and final.read_bytes() == b"abc"
