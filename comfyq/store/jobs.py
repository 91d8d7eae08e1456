"""JobStore: the async face of the store. Writes go through the one writer; reads use their own
connection. After each commit the store tells its listeners (event bus, stage wake-ups) what
changed, so nothing downstream ever sees a change that is not durable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

from comfyq.clock import Clock, iso
from comfyq.store import migrate, ops
from comfyq.store.model import STAGES, Job, NewJob, Stage, State, Transition, loads
from comfyq.store.writer import Writer, connect

log = logging.getLogger("comfyq.store")

Listener = Callable[[list[Transition]], None]


class DatabaseLocked(Exception):
    """Another comfyq server holds this database file."""


class FileLock:
    """An exclusive advisory lock beside the database: one server per file."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseLocked(
                f"another comfyq server (pid {holder})"
                f" is already using {self.path.with_suffix('')};"
                " stop it first or point COMFYQ_DATABASE at another file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def open_migrated(path: str | Path, clock: Clock | None = None) -> list[int]:
    """Create the file if needed and apply pending migrations; return versions applied."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        return migrate.apply(conn, clock=clock)
    finally:
        conn.close()


class JobStore:
    """Jobs, events and outputs in one SQLite file."""

    def __init__(self, path: str | Path, *, clock: Clock | None = None, owner: str = "") -> None:
        self.path = Path(path)
        self.clock = clock or Clock()
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self.writer = Writer(self.path)
        self._reader: aiosqlite.Connection | None = None
        self._listeners: list[Listener] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate, start the writer, open the read connection."""
        open_migrated(self.path, self.clock)
        self.writer.start()
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        await self._reader.execute("PRAGMA busy_timeout = 10000")
        await self._reader.execute("PRAGMA foreign_keys = ON")

    async def close(self) -> None:
        await self.writer.stop()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None

    def listen(self, fn: Listener) -> None:
        """Call ``fn(transitions)`` after every commit that changed job states."""
        self._listeners.append(fn)

    def _notify(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        for fn in self._listeners:
            try:
                fn(transitions)
            except Exception:  # a listener bug must not undo a committed write
                log.exception("store listener failed")

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.writer.run(fn, *args)

    # --- writes ------------------------------------------------------------------------------

    async def create(self, new: NewJob, max_queue: int) -> tuple[Job, bool]:
        """Insert a job durably; ``(job, False)`` when an identical request already exists."""
        job, tr = await self._write(ops.create, new, self.clock.now(), max_queue)
        if tr is not None:
            self._notify([tr])
        return job, tr is not None

    async def claim(self, stage: Stage, n: int, lease: float, message: str) -> list[Job]:
        """Claim up to ``n`` jobs of ``stage`` for this process."""
        trs: list[Transition] = await self._write(
            ops.claim, stage, self.owner, n, self.clock.now(), lease, message
        )
        self._notify(trs)
        return [t.job for t in trs if t.job is not None]

    async def _one(self, fn: Callable[..., Transition], *args: Any) -> Transition:
        tr: Transition = await self._write(fn, *args)
        self._notify([tr])
        return tr

    async def advance(
        self,
        job_id: str,
        message: str,
        fields: dict[str, Any] | None = None,
        outputs: list[dict[str, Any]] | None = None,
    ) -> Transition:
        """Finish this process's stage of a job: next stage, or completed after postprocess."""
        return await self._one(
            ops.advance, job_id, self.owner, self.clock.now(), message, fields, outputs
        )

    async def advance_and_claim(
        self,
        job_id: str,
        message: str,
        fields: dict[str, Any] | None,
        lease: float,
        claim_message: str,
        outputs: list[dict[str, Any]] | None = None,
    ) -> list[Transition]:
        """Advance a job and claim it for its next stage in one commit (ops.advance_and_claim)."""
        trs: list[Transition] = await self._write(
            ops.advance_and_claim,
            job_id,
            self.owner,
            self.clock.now(),
            message,
            fields,
            lease,
            claim_message,
            outputs,
        )
        self._notify(trs)
        return trs

    async def finish(
        self,
        job_id: str,
        state: State,
        message: str,
        *,
        error: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> Transition:
        """End a job this process holds as completed, failed or cancelled."""
        return await self._one(
            lambda c: ops.finish(
                c, job_id, self.owner, self.clock.now(), state, message, error=error, fields=fields
            )
        )

    async def retry_later(self, job_id: str, delay: float, error: dict[str, Any]) -> Transition:
        return await self._one(ops.retry_later, job_id, self.owner, self.clock.now(), delay, error)

    async def release(self, job_id: str, message: str) -> Transition:
        return await self._one(ops.release, job_id, self.owner, self.clock.now(), message)

    async def update(self, job_id: str, fields: dict[str, Any]) -> Job:
        """Set columns of a job this process holds, e.g. the ComfyUI prompt id before submitting."""
        job: Job = await self._write(ops.update, job_id, self.owner, self.clock.now(), fields)
        return job

    async def renew(self, lease: float) -> int:
        n: int = await self._write(ops.renew, self.owner, self.clock.now(), lease)
        return n

    async def request_cancel(self, job_id: str) -> tuple[Job, Transition | None]:
        job, tr = await self._write(ops.request_cancel, job_id, self.clock.now())
        if tr is not None:
            self._notify([tr])
            job = tr.job or job
        return job, tr

    async def reap(self, grace: float) -> list[Transition]:
        trs: list[Transition] = await self._write(ops.reap, self.clock.now(), self.owner, grace)
        self._notify(trs)
        return trs

    async def recover(self) -> list[Transition]:
        trs: list[Transition] = await self._write(ops.recover, self.owner, self.clock.now())
        self._notify(trs)
        return trs

    async def retry_job(self, job_id: str) -> Transition:
        return await self._one(ops.retry_job, job_id, self.clock.now())

    async def prune(self, older_than: float, limit: int = 500) -> list[str]:
        ids: list[str] = await self._write(ops.prune, self.clock.now() - older_than, limit)
        return ids

    async def checkpoint(self) -> tuple[int, int, int]:
        """Checkpoint the WAL (TRUNCATE) so it cannot grow without bound."""

        def run(conn: sqlite3.Connection) -> tuple[int, int, int]:
            row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return (row[0], row[1], row[2])

        result: tuple[int, int, int] = await self.writer.run_outside(run)
        return result

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run another module's write function ``fn(conn, *args)`` through the writer."""
        return await self._write(fn, *args)

    # --- reads -------------------------------------------------------------------------------

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store not open")
        return self._reader

    async def _rows(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        # One thread hop per read (execute + fetch + close together): a cursor left open across
        # awaits would keep the connection in an old read transaction and return stale rows.
        return list(await self.reader.execute_fetchall(sql, params))

    async def get(self, job_id: str) -> Job | None:
        rows = await self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's event rows after event id ``after``, oldest first."""
        rows = await self._rows(
            "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
        )
        return [{**dict(r), "data": loads(r["data"])} for r in rows]

    async def list_jobs(
        self,
        *,
        states: list[str] | None = None,
        limit: int = 50,
        cursor: tuple[str, str] | None = None,
    ) -> list[Job]:
        """Jobs newest first; ``cursor`` = (created_at, id) of the last job of the previous page."""
        where, params = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if cursor:
            where.append("(created_at, id) < (?, ?)")
            params.extend(cursor)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [Job.from_row(r) for r in await self._rows(sql, (*params, limit))]

    async def counts(self) -> dict[Stage, dict[str, int]]:
        """Waiting and running jobs per stage."""
        out = {s: {"waiting": 0, "running": 0} for s in STAGES}
        for stage, state, n in await self._rows(
            # One query per state, so each reads its partial index and not the whole (mostly
            # finished) table.
            "SELECT stage, 'pending', count(*) FROM jobs WHERE state = 'pending' GROUP BY stage"
            " UNION ALL SELECT stage, 'running', count(*)"
            " FROM jobs WHERE state = 'running' GROUP BY stage"
        ):
            out[stage]["waiting" if state == State.PENDING else "running"] = n
        return out

    async def position(self, job: Job) -> tuple[int, int]:
        """(1-based position among waiting jobs of its stage, waiting jobs in that stage)."""
        ((ahead, size),) = await self._rows(
            "SELECT (SELECT count(*) FROM jobs WHERE state = 'pending' AND stage = :stage AND"
            "   (priority > :p OR (priority = :p AND (created_at, id) < (:c, :id)))),"
            " (SELECT count(*) FROM jobs WHERE state = 'pending' AND stage = :stage)",
            {"stage": job.stage, "p": job.priority, "c": job.created_at, "id": job.id},
        )
        return ahead + 1, size

    async def recent_timings(
        self, kind: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Timings of recently completed jobs (of one kind when given), newest first."""
        sql = "SELECT timings FROM jobs WHERE state = 'completed'"
        params: list[Any] = []
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY finished_at DESC LIMIT ?"
        return [loads(r[0]) for r in await self._rows(sql, (*params, limit))]

    async def put_output(self, job_id: str, row: dict[str, Any]) -> None:
        await self._write(ops.put_output, job_id, self.clock.now(), row)

    async def outputs(self, job_id: str) -> list[dict[str, Any]]:
        """The job's output rows, in the order they were recorded."""
        return [
            dict(r)
            for r in await self._rows(
                "SELECT * FROM outputs WHERE job_id = ? ORDER BY id", (job_id,)
            )
        ]

    async def secrets(self, job_id: str) -> dict[str, Any]:
        rows = await self._rows("SELECT data FROM job_secrets WHERE job_id = ?", (job_id,))
        return loads(rows[0][0]) if rows else {}

    async def cancel_requested(self) -> list[str]:
        """Ids of jobs this process runs that someone (CLI, another connection) asked to cancel."""
        rows = await self._rows(
            "SELECT id FROM jobs WHERE state = 'running' AND lease_owner = ? AND"
            " cancel_requested = 1",
            (self.owner,),
        )
        return [r[0] for r in rows]

    async def next_run_after(self, stage: Stage) -> str | None:
        """The earliest ``run_after`` among waiting jobs of ``stage`` (for retry timers)."""
        rows = await self._rows(
            "SELECT min(run_after) FROM jobs WHERE state = 'pending' AND stage = ?", (stage,)
        )
        return rows[0][0] if rows else None

    def now_iso(self) -> str:
        return iso(self.clock.now())
