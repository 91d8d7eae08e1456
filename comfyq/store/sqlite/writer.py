"""The one writer: a thread that owns the only write connection and commits in groups.

Every write is a function ``fn(conn) -> T`` run inside its own SAVEPOINT. The thread takes every
write that is waiting, runs them all in one ``BEGIN IMMEDIATE`` transaction and commits once, so
at ``synchronous=FULL`` many concurrent transitions share one fsync. A write that raises is rolled
back to its savepoint alone; the others in the group still commit. Results reach the event loop
through futures, resolved only after the commit, so a caller never acts on an uncommitted write.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from comfyq.limits import name_os_thread

T = TypeVar("T")
log = logging.getLogger("comfyq.store")
WRITER_THREAD = "comfyq-writer"

MAX_GROUP = 512


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with comfyq's pragmas: WAL, FULL sync, foreign keys, a busy timeout."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    # SQLite's default page cache (2 MB) is smaller than the hot part of a busy queue; past a few
    # thousand unfinished jobs every transition would read pages back from the OS. Grows on use.
    conn.execute("PRAGMA cache_size = -65536")
    return conn


class _Op:
    __slots__ = ("args", "fn", "future", "loop", "txn")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        txn: bool = True,
    ) -> None:
        self.txn = txn
        self.fn = fn
        self.args = args
        self.future = future
        self.loop = loop


Results = list[tuple[asyncio.Future[Any], bool, Any]]


def _settle(results: Results) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class _Outbox:
    """Results on their way to one event loop. The writer thread wakes the loop (a
    ``call_soon_threadsafe``: a self-pipe write, a selector wake-up and a callback) only when
    nothing is on its way there yet; a group committed while the loop has not yet taken the
    previous one's results joins them, and one callback settles both."""

    __slots__ = ("lock", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: Results | None = None

    def send(self, results: Results) -> None:
        """(writer thread) Deliver ``results`` after the ones already on their way."""
        with self.lock:
            if self.pending is not None:
                self.pending.extend(results)
                return
            self.pending = results
        try:
            self.loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:
            pass  # the loop closed; nobody is waiting any more

    def deliver(self) -> None:
        """(the loop) Settle every result that has arrived."""
        with self.lock:
            results, self.pending = self.pending, None
        if results:
            _settle(results)


class Writer:
    """Owns the write connection; ``await writer.run(fn, *args)`` commits ``fn(conn, *args)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        # Writes asked for during one turn of an event loop, handed to the thread together: one
        # wake-up of the thread (a futex call, often a context switch) per turn, not per write.
        self._turn: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}  # writer thread only
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.commits = 0
        self.ops = 0
        # For /health without queueing behind large writes (see ``busy``): when the running group
        # began (monotonic; None between groups) and why the last group failed to commit.
        self.group_started: float | None = None
        self.failure: str | None = None

    def start(self) -> None:
        self._conn = connect(self.path)
        self._thread = threading.Thread(target=self._loop, name=WRITER_THREAD, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in the next group transaction; return its result after commit."""
        if self._thread is None:
            raise RuntimeError("writer not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._submit(loop, _Op(fn, args, fut, loop))
        return await fut

    async def run_outside(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` alone, outside any transaction (checkpoints, VACUUM)."""
        if self._thread is None:
            raise RuntimeError("writer not started")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._submit(loop, _Op(fn, args, fut, loop, txn=False))
        return await fut

    def _submit(self, loop: asyncio.AbstractEventLoop, op: _Op) -> None:
        ops = self._turn.get(loop)
        if ops is None:
            self._turn[loop] = [op]
            loop.call_soon(self._hand_over, loop)
        else:
            ops.append(op)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def busy(self) -> float | None:
        """Seconds the writer has been working on its current group, 0.0 when writes wait for
        it, None when it is idle."""
        started = self.group_started
        if started is not None:
            return max(0.0, time.monotonic() - started)
        return 0.0 if self._queue.qsize() else None

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        ops = self._turn.pop(loop, None)
        if ops:
            self._queue.put(ops)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a write directly (only before start or after stop, e.g. migrations, CLI)."""
        conn = self._conn or connect(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn, *args)
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if conn is not self._conn:
                conn.close()

    async def stop(self) -> None:
        """Finish every queued write, then close the connection."""
        if self._thread is None:
            return
        self._hand_over(asyncio.get_running_loop())
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _loop(self) -> None:
        name_os_thread(WRITER_THREAD)  # its CPU apart from the loop's in /proc (bench_floor)
        assert self._conn is not None
        conn = self._conn
        backlog: deque[_Op] = deque()
        stopping = False
        while backlog or not stopping:
            if not backlog:
                ops = self._queue.get()
                if ops is None:
                    break
                backlog.extend(ops)
            while not stopping:  # everything queued by now joins this group
                try:
                    ops = self._queue.get_nowait()
                except queue.Empty:
                    break
                if ops is None:
                    stopping = True
                else:
                    backlog.extend(ops)
            self.group_started = time.monotonic()
            try:
                if not backlog[0].txn:
                    self._run_alone(conn, backlog.popleft())
                    continue
                batch: list[_Op] = []
                while backlog and backlog[0].txn and len(batch) < MAX_GROUP:
                    batch.append(backlog.popleft())
                self._commit_group(conn, batch)
            finally:
                self.group_started = None

    def _run_group(
        self, conn: sqlite3.Connection, batch: list[_Op], *, isolate: bool
    ) -> list[tuple[_Op, bool, Any]] | None:
        outcomes: list[tuple[_Op, bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if not isolate:
                    try:
                        outcomes.append((op, True, op.fn(conn, *op.args)))
                    except BaseException:  # noqa: BLE001 - retried below, isolated
                        conn.execute("ROLLBACK")
                        return None
                    continue
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn, *op.args)
                except BaseException as exc:  # noqa: BLE001 - reported to the caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((op, False, exc))
                else:
                    conn.execute("RELEASE op")
                    outcomes.append((op, True, value))
            conn.execute("COMMIT")
            self.commits += 1
            self.ops += len(batch)
            self.failure = None
        except sqlite3.Error as exc:
            log.error("group commit failed: %s", exc)
            self.failure = f"{type(exc).__name__}: {exc}"
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [(op, False, exc) for op in batch]
        return outcomes

    def _run_alone(self, conn: sqlite3.Connection, op: _Op) -> None:
        try:
            result: tuple[asyncio.Future[Any], bool, Any] = (op.future, True, op.fn(conn, *op.args))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            result = (op.future, False, exc)
        self._outbox(op.loop).send([result])

    def _outbox(self, loop: asyncio.AbstractEventLoop) -> _Outbox:
        box = self._outboxes.get(loop)
        if box is None:
            if len(self._outboxes) > 16:  # loops come and go in tests and CLI runs
                self._outboxes = {k: v for k, v in self._outboxes.items() if not k.is_closed()}
            box = self._outboxes[loop] = _Outbox(loop)
        return box

    def _commit_group(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        # Optimistic first: no savepoints. If any write raises, the whole group is rolled back and
        # run again with a savepoint per write, so the failing one is undone alone.
        outcomes = self._run_group(conn, batch, isolate=False)
        if outcomes is None:
            outcomes = self._run_group(conn, batch, isolate=True) or []
        by_loop: dict[asyncio.AbstractEventLoop, Results] = {}
        for op, ok, value in outcomes:
            by_loop.setdefault(op.loop, []).append((op.future, ok, value))
        for loop, results in by_loop.items():
            self._outbox(loop).send(results)
