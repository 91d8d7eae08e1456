"""``SqliteStore.ping`` (``/health``'s store check) does not queue behind a long write: a busy
writer answers from its progress, an idle one by a round trip through it (issue 19: /health
waited seconds behind the commits of 16 MiB job rows)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from comfyq.store.sqlite import SqliteStore


async def test_ping_answers_while_the_writer_is_busy_and_fails_when_it_is_stuck(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "q.db")
    await store.open()
    try:
        await asyncio.wait_for(store.ping(), 5)  # idle: through the writer
        release = threading.Event()
        started = threading.Event()

        def long_write(conn: sqlite3.Connection) -> int:
            started.set()
            release.wait(10)
            return int(conn.execute("SELECT 1").fetchone()[0])

        write = asyncio.ensure_future(store.writer.run(long_write))
        while not started.is_set():
            await asyncio.sleep(0.01)
        # The writer holds its transaction: ping answers at once instead of waiting behind it.
        await asyncio.wait_for(store.ping(), 1)
        assert store.writer.busy() is not None
        # A group running longer than the limit means a stuck writer: not writable.
        store.ping_busy_limit = 0.05
        await asyncio.sleep(0.1)
        with pytest.raises(sqlite3.OperationalError, match="has run for"):
            await store.ping()
        release.set()
        assert await write == 1
        while store.writer.busy() is not None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(store.ping(), 5)
    finally:
        await store.close()
    with pytest.raises(sqlite3.OperationalError, match="not running"):
        await store.ping()
