"""Uploaded bytes on disk, one file per blake3 hash, written while they arrive.

An upload streams into a temporary file in the blob folder and is hashed chunk by chunk as it is
written, never held whole in memory. Once complete it is flushed to disk and renamed to its hash
(``<root>/<2 hex>/<hex>``): the client's file name never becomes a path. Bytes already held are
not kept twice (the temporary file is dropped).
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blake3 import blake3

from comfyq.fileio import fsync_dir

CHUNK = 256 * 1024
_HEX = re.compile(r"^[0-9a-f]{64}$")


class Chunks(Protocol):
    async def read_chunk(self, size: int = ...) -> bytes: ...


class TooLarge(Exception):
    """The upload passed the size cap; nothing of it is kept."""


@dataclass(frozen=True)
class Received:
    """A complete upload in its temporary file."""

    tmp: Path
    hash: str  # blake3:<hex>
    size: int


def parse_hash(value: str) -> str | None:
    """The hex of a ``blake3:<64 hex>`` string, or None when it is not one."""
    algo, sep, hexdigest = value.strip().partition(":")
    hexdigest = hexdigest.lower()
    if sep and algo.lower() == "blake3" and _HEX.fullmatch(hexdigest):
        return hexdigest
    return None


def _flush(f: object) -> None:
    fileno = getattr(f, "fileno")  # noqa: B009 - a file object
    os.fsync(fileno())


class BlobDir:
    """The folder of uploaded blobs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, hexdigest: str) -> Path:
        if not _HEX.match(hexdigest):
            raise ValueError("not a blake3 hex digest")
        return self.root / hexdigest[:2] / hexdigest

    async def receive(self, source: Chunks, max_bytes: int) -> Received:
        """Stream ``source`` into a temporary file, hashing as it goes; TooLarge past the cap."""
        tmp_dir = self.root / "tmp"
        await asyncio.to_thread(tmp_dir.mkdir, parents=True, exist_ok=True)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        h = blake3()
        size = 0
        f = await asyncio.to_thread(tmp.open, "wb")
        try:
            while chunk := await source.read_chunk(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"the file is larger than {max_bytes} bytes")
                h.update(chunk)
                f.write(chunk)  # into the page cache: microseconds per chunk
            await asyncio.to_thread(_flush, f)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        f.close()
        return Received(tmp, f"blake3:{h.hexdigest()}", size)

    async def keep(self, rec: Received) -> Path:
        """Move a received upload to its place by hash (dropping it when the bytes are held)."""
        final = self.path_for(rec.hash.split(":", 1)[1])

        def move() -> None:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() and final.stat().st_size == rec.size:
                rec.tmp.unlink(missing_ok=True)
            else:
                os.replace(rec.tmp, final)
                fsync_dir(final.parent)

        await asyncio.to_thread(move)
        return final

    @staticmethod
    async def discard(rec: Received) -> None:
        await asyncio.to_thread(rec.tmp.unlink, True)

    async def remove(self, path: str) -> None:
        """Delete a blob file the store no longer lists (only ever one under the root)."""
        p = Path(path)
        if p.parent.parent != self.root:
            return
        await asyncio.to_thread(p.unlink, True)
