"""Files written from the event loop with few thread hops.

aiofiles made one hop to a thread per call, so a 64 KiB chunk cost a hop. Here a hop does a whole
file operation: :class:`BatchedWriter` collects chunks in memory and hands them to a thread a batch
at a time (opening the file is part of its first hop, closing part of its last), and the one-shot
helpers do a file's whole job in one hop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

BATCH = 1 << 20  # bytes collected before a hop: 16 chunks of 64 KiB


class BatchedWriter:
    """Write a file (creating its folder) from async code: ``await w.write(chunk)`` stores the
    chunk, and every ``batch`` bytes one thread hop writes them (and feeds ``digest``, when given).
    Use it as ``async with``; leaving the block writes the rest and closes the file in one hop."""

    def __init__(
        self, path: Path, *, batch: int = BATCH, digest: hashlib._Hash | None = None
    ) -> None:
        self.path = path
        self.batch = batch
        self.digest = digest
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._file: BinaryIO | None = None
        # A hop whose awaiting task was cancelled goes on in its thread; closing waits for it.
        self._lock = threading.Lock()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self._hop(close=True)
        elif self._file is not None:
            # The write failed or was cancelled: close without writing what is left. Shielded,
            # so a second cancellation cannot leak the descriptor.
            await asyncio.shield(asyncio.to_thread(self._close))

    async def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.size += len(data)
        if self._pending_bytes >= self.batch:
            await self._hop(close=False)

    async def _hop(self, *, close: bool) -> None:
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        await asyncio.to_thread(self._write, chunks, close)

    def _write(self, chunks: list[bytes], close: bool) -> None:
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "wb")  # noqa: SIM115 - closed by the last hop
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if data:
                self._file.write(data)
                if self.digest is not None:
                    self.digest.update(data)
            if close:
                self._file.close()

    def _close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def write_file(path: Path, data: bytes, *, replace: Path | None = None) -> None:
    """Write ``data`` to ``path`` (creating its folder), then move it to ``replace`` if given.
    Blocking: one ``asyncio.to_thread`` call does it all. The folder is created only when the
    file cannot be (a job's outputs after its first one go to a folder already there)."""
    try:
        fd = os.open(path, _CREATE, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, _CREATE, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    if replace is not None:
        os.replace(path, replace)


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` durable (a file created or renamed there survives a crash)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_present(path: Path) -> None:
    """Remove a file that may already be gone (blocking)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_range(path: Path, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes of ``path`` from ``offset`` (blocking; open, read and close together,
    so no file handle stays open across awaits)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
