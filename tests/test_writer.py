"""The SQLite writer thread: results of groups committed while the event loop is busy reach it
together, in commit order, with one wake-up of the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from comfyq.store.sqlite.writer import WRITER_THREAD, Writer


def _insert(conn: sqlite3.Connection, value: str, gate: threading.Event | None = None) -> int:
    if gate is not None:
        assert gate.wait(10)
    cur = conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
    assert cur.lastrowid is not None
    return cur.lastrowid


async def test_groups_committed_while_the_loop_is_busy_wake_it_once(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    writer = Writer(db)
    writer.run_sync(lambda conn: conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
    writer.start()
    loop = asyncio.get_running_loop()
    wakes: list[Any] = []
    threadsafe = loop.call_soon_threadsafe

    def counting(cb: Any, *args: Any, **kw: Any) -> Any:
        wakes.append(cb)
        return threadsafe(cb, *args, **kw)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
    try:
        gate = threading.Event()
        settled: list[str] = []
        first = asyncio.ensure_future(writer.run(_insert, "a", gate))
        first.add_done_callback(lambda _: settled.append("a"))
        while writer.busy() is None:  # the first group is in the writer's hands, held by gate
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(writer.run(_insert, "b"))
        second.add_done_callback(lambda _: settled.append("b"))
        await asyncio.sleep(0)  # the second write is asked for
        await asyncio.sleep(0)  # and handed to the thread: the next group
        commits = writer.commits
        gate.set()
        deadline = time.monotonic() + 10
        while writer.commits < commits + 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # noqa: ASYNC251 - the loop is busy while both groups commit
        assert writer.commits == commits + 2
        assert await first == 1 and second.done()  # settled by the same callback
        assert await second == 2
        await asyncio.sleep(0)
        assert settled == ["a", "b"]
        assert len(wakes) == 1  # both groups' results came with one call
        # Once the loop has taken them, the next group wakes it again.
        assert await writer.run(_insert, "c") == 3 and len(wakes) == 2
    finally:
        loop.call_soon_threadsafe = threadsafe  # type: ignore[method-assign]
        await writer.stop()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT v FROM t ORDER BY id").fetchall() == [("a",), ("b",), ("c",)]
    finally:
        conn.close()


async def test_the_writer_thread_carries_its_name_for_the_kernel(tmp_path: Path) -> None:
    """/proc shows the writer thread by name, so its CPU can be told from the loop's (top -H,
    py-spy, bench_floor's split by thread)."""
    writer = Writer(tmp_path / "n.db")
    writer.start()
    try:
        await writer.run(lambda conn: conn.execute("SELECT 1").fetchone())
        tid = writer._thread.native_id if writer._thread is not None else None
        assert tid is not None
        comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        assert comm == WRITER_THREAD
    finally:
        await writer.stop()
