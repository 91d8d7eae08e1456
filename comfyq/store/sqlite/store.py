"""SqliteStore: the SQLite adapter of the store interface. Writes go through the one writer thread
(group commit, FULL sync); reads use their own connection. After each commit the store tells its
listeners (event bus, stage wake-ups) what changed, so nothing downstream ever sees a change that
is not durable.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from comfyq.clock import Clock
from comfyq.limits import HEAP_TRIM
from comfyq.store.assets import AssetStore
from comfyq.store.base import Attempt, DatabaseLocked, JobReads, JobStore, Stats
from comfyq.store.model import STAGES, Job, NewJob, Stage, State, Transition, loads
from comfyq.store.sqlite import migrate, ops, outbox
from comfyq.store.sqlite.assets import SqliteAssets
from comfyq.store.sqlite.reads import INLINE_SNAPSHOT_ROWS, InlineReader, Reads
from comfyq.store.sqlite.writer import Writer, connect

# Seconds one group of writes may run before /health calls the store unwritable.
PING_BUSY_LIMIT = 30.0

log = logging.getLogger("comfyq.store")

__all__ = ["DatabaseLocked", "FileLock", "SqliteStore", "open_migrated"]


def _shrink_memory(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA shrink_memory")


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


class SqliteStore(JobStore):
    """Jobs, events and outputs in one SQLite file."""

    engine = "sqlite"

    def __init__(
        self, database: str | os.PathLike[str], *, clock: Clock | None = None, owner: str = ""
    ) -> None:
        super().__init__(database, clock=clock, owner=owner)
        self.path = Path(database)
        self.writer = Writer(self.path)
        self.lock = FileLock(self.path)
        self._locked = False
        self._reader: aiosqlite.Connection | None = None
        self._unhook: Callable[[], None] | None = None
        self._inline = InlineReader(self.path)
        self._unfinished = INLINE_SNAPSHOT_ROWS  # as of the last counts(); unknown: large
        self._assets: AssetStore | None = None
        self.ping_busy_limit = PING_BUSY_LIMIT

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self, *, exclusive: bool = False) -> None:
        """Take the file lock (a server), migrate, start the writer, open the read connection."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            self.lock.acquire()
            self._locked = True
        try:
            open_migrated(self.path, self.clock)
            self.writer.start()
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            self._reader.row_factory = sqlite3.Row
            await self._reader.execute("PRAGMA busy_timeout = 10000")
            await self._reader.execute("PRAGMA foreign_keys = ON")
            self._unhook = HEAP_TRIM.release_with(self.release_memory)
        except BaseException:
            await self.close()
            raise

    async def release_memory(self) -> None:
        """Drop the page caches (after large bodies: the writer's keeps every page written)."""
        await self.writer.run_outside(_shrink_memory)
        if self._reader is not None:
            await self._reader.execute("PRAGMA shrink_memory")

    async def close(self) -> None:
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        await self.writer.stop()
        self._inline.close()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._locked:
            self.lock.release()
            self._locked = False

    async def migrate(self) -> list[int]:
        return open_migrated(self.path, self.clock)

    def describe(self) -> str:
        return str(self.path)

    @property
    def identity(self) -> str:
        return str(self.path.resolve())

    async def ping(self) -> None:
        """Through the writer, like every real write, when it is idle: proves the writer thread
        and the file work. A busy writer is proof enough while its group is younger than
        ``ping_busy_limit`` seconds and the last one committed: /health does not queue behind a
        large transaction (it did, for seconds, behind 16 MiB job rows)."""
        writer = self.writer
        if not writer.alive:
            raise sqlite3.OperationalError("the writer thread is not running")
        busy = writer.busy()
        if busy is None:
            await self._write(lambda c: c.execute("SELECT 1").fetchone())
        elif writer.failure is not None:
            raise sqlite3.OperationalError(f"the last commit failed: {writer.failure}")
        elif busy > self.ping_busy_limit:
            raise sqlite3.OperationalError(f"one group of writes has run for {busy:.0f}s")

    async def maintain(self) -> str:
        busy, frames, done = await self.checkpoint()
        return f"WAL checkpoint: busy={busy} frames={frames} checkpointed={done}"

    def reads(self) -> JobReads:
        return Reads(self.path)

    def assets(self) -> AssetStore:
        if self._assets is None:
            self._assets = SqliteAssets(self)
        return self._assets

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.writer.run(fn, *args)

    # --- writes ------------------------------------------------------------------------------

    async def create(self, new: NewJob, max_queue: int) -> tuple[Job, bool]:
        """Insert a job durably; ``(job, False)`` when an identical request already exists.
        With an idle preprocess worker (``intake``), claimed for it in the same commit."""
        now = self.clock.now()
        return await self._admitting(
            lambda: self._write(ops.create, new, now, max_queue),
            lambda owner, lease, message: self._write(
                ops.create_claimed, new, now, max_queue, owner, lease, message
            ),
        )

    async def claim(
        self, stage: Stage, n: int, lease: float, message: str, prompt_backend: str | None = None
    ) -> list[Job]:
        """Claim up to ``n`` jobs of ``stage`` for this process."""
        trs: list[Transition] = await self._write(
            ops.claim, stage, self.owner, n, self.clock.now(), lease, message, prompt_backend
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
        claim_fields: dict[str, Any] | None = None,
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
            claim_fields,
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

    async def delete_finished(self, job_id: str) -> bool:
        gone: bool = await self._write(ops.delete_finished, job_id)
        return gone

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

    # --- reads -------------------------------------------------------------------------------

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store not open")
        return self._reader

    async def _rows(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        # One thread hop per read (execute + fetch + close together): a cursor left open across
        # awaits would keep the connection in an old read transaction and return stale rows.
        return list(await self._conn.execute_fetchall(sql, params))

    async def _now(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        # A cheap indexed read, on the loop's own thread (see sqlite/reads.py); on the reader
        # thread only when SQLite says busy.
        if self._reader is None:
            raise RuntimeError("store not open")
        got = self._inline.rows(sql, params)
        return got if got is not None else await self._rows(sql, params)

    async def get(self, job_id: str) -> Job | None:
        rows = await self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))  # may be large
        return Job.from_row(rows[0]) if rows else None

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's event rows after event id ``after``, oldest first."""
        rows = await self._now(
            "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
        )
        return [{**dict(r), "data": loads(r["data"])} for r in rows]

    async def list_jobs(
        self,
        *,
        states: Sequence[State] | None = None,
        limit: int = 50,
        cursor: tuple[str, str] | None = None,
    ) -> list[Job]:
        """Jobs newest first; ``cursor`` = (created_at, id) of the last job of the previous page."""
        where: list[str] = []
        params: list[Any] = []
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
        return (await self._counts(""))[0]

    async def counts_at(self) -> tuple[dict[Stage, dict[str, int]], int | None]:
        # One statement reads one snapshot: the counts and the events-table high-water mark
        # agree (AUTOINCREMENT: ids only grow, even past deleted rows; one writer commits them
        # in order).
        return await self._counts(
            " UNION ALL SELECT '', 'seq', seq FROM sqlite_sequence WHERE name = 'job_events'"
        )

    async def waiting_at(self) -> tuple[list[tuple[str, str, int, str]], int] | None:
        rows = await self._rows(
            "SELECT id, stage, priority, created_at FROM jobs INDEXED BY jobs_claim"
            " WHERE state = 'pending'"
            " UNION ALL SELECT '', '', seq, '' FROM sqlite_sequence WHERE name = 'job_events'"
        )
        seq = 0
        out: list[tuple[str, str, int, str]] = []
        for job_id, stage, priority, created_at in rows:
            if job_id:
                out.append((job_id, stage, priority, created_at))
            else:
                seq = priority
        return out, seq

    async def _counts(self, extra: str) -> tuple[dict[Stage, dict[str, int]], int | None]:
        out = {s: {"waiting": 0, "running": 0} for s in STAGES}
        # Inline while the last count was small (the counts read every waiting job's index entry).
        read = self._now if self._unfinished < INLINE_SNAPSHOT_ROWS else self._rows
        rows = await read(
            # One query per state, so each reads its partial index and not the whole (mostly
            # finished) table. INDEXED BY: the planner would pick jobs_state_created (state, ...)
            # and read every waiting row for its stage (20 ms at 10k waiting jobs, 1.2 ms so).
            "SELECT stage, 'pending', count(*) FROM jobs INDEXED BY jobs_claim"
            " WHERE state = 'pending' GROUP BY stage"
            " UNION ALL SELECT stage, 'running', count(*)"
            " FROM jobs WHERE state = 'running' GROUP BY stage" + extra
        )
        seq = 0 if extra else None  # no row yet: no event was ever written
        unfinished = 0
        for stage, state, n in rows:
            if state == "seq":
                seq = n
                continue
            unfinished += n
            out[stage]["waiting" if state == State.PENDING else "running"] = n
        self._unfinished = unfinished
        return out, seq

    async def position(self, job: Job) -> tuple[int, int]:
        """(1-based position among waiting jobs of its stage, waiting jobs in that stage)."""
        # Inline (no reader-thread hop) while the last count was small, as counts() does: the
        # two counts read the waiting jobs' index entries of one stage.
        read = self._now if self._unfinished < INLINE_SNAPSHOT_ROWS else self._rows
        ((ahead, size),) = await read(
            "SELECT (SELECT count(*) FROM jobs WHERE state = 'pending' AND stage = :stage AND"
            "   (priority > :p OR (priority = :p AND (created_at, id) < (:c, :id)))),"
            " (SELECT count(*) FROM jobs WHERE state = 'pending' AND stage = :stage)",
            {"stage": job.stage, "p": job.priority, "c": job.created_at, "id": job.id},
        )
        return ahead + 1, size

    async def put_output(self, job_id: str, row: dict[str, Any]) -> None:
        await self._write(ops.put_output, job_id, self.clock.now(), row)

    async def outputs(self, job_id: str) -> list[dict[str, Any]]:
        """The job's output rows, in the order they were recorded."""
        return [
            dict(r)
            for r in await self._now(
                "SELECT * FROM outputs WHERE job_id = ? ORDER BY id", (job_id,)
            )
        ]

    async def secrets(self, job_id: str) -> dict[str, Any]:
        rows = await self._now("SELECT data FROM job_secrets WHERE job_id = ?", (job_id,))
        return loads(rows[0][0]) if rows else {}

    async def cancel_requested(self) -> list[str]:
        """Ids of jobs this process runs that someone (CLI, another connection) asked to cancel."""
        rows = await self._now(
            "SELECT id FROM jobs WHERE state = 'running' AND lease_owner = ? AND"
            " cancel_requested = 1",
            (self.owner,),
        )
        return [r[0] for r in rows]

    async def next_run_after(self, stage: Stage) -> str | None:
        """The earliest ``run_after`` among waiting jobs of ``stage`` (for retry timers)."""
        rows = await self._now(
            "SELECT min(run_after) FROM jobs WHERE state = 'pending' AND stage = ?", (stage,)
        )
        return rows[0][0] if rows else None

    async def overview(self, statuses: list[str] | None, limit: int) -> list[dict[str, Any]]:
        sql = "SELECT * FROM jobs_overview"
        params: list[Any] = []
        if statuses:
            marks = ",".join("?" * len(statuses))
            sql += f" WHERE state IN ({marks}) OR status IN ({marks})"
            params = [*statuses, *statuses]
        return [dict(r) for r in await self._rows(sql + " LIMIT ?", (*params, limit))]

    async def stats(self) -> Stats:
        out = Stats(
            jobs={s: 0 for s in ("pending", "running", "completed", "failed", "cancelled")},
            webhook_deliveries={s: 0 for s in ("pending", "sending", "delivered", "failed")},
            webhook_attempts={s: 0 for s in ("delivered", "retry", "gave_up")},
        )
        for table, col, into in (
            ("jobs", "state", out.jobs),
            ("webhook_deliveries", "state", out.webhook_deliveries),
            ("webhook_attempts", "outcome", out.webhook_attempts),
        ):
            for key, n in await self._rows(f"SELECT {col}, count(*) FROM {table} GROUP BY {col}"):
                into[key] = n
        return out

    # --- webhook outbox ----------------------------------------------------------------------

    async def outbox_claim(
        self, n: int, per_host: int, lease: float, per_endpoint: int | None = None
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._write(
            outbox.claim, self.owner, self.clock.now(), n, per_host, lease, per_endpoint
        )
        return rows

    async def outbox_record(self, delivery: dict[str, Any], attempt: Attempt) -> bool:
        ok: bool = await self._write(outbox.record, delivery, self.owner, self.clock.now(), attempt)
        return ok

    async def outbox_recover(self, max_attempts: int) -> int:
        n: int = await self._write(outbox.recover, self.owner, self.clock.now(), max_attempts)
        return n

    async def outbox_next_due(self) -> str | None:
        rows = await self._now(
            "SELECT min(next_attempt_at) FROM webhook_deliveries"
            " WHERE state = 'pending' AND next_attempt_at > ?",
            (self.now_iso(),),
        )
        return rows[0][0] if rows else None

    async def webhook_history(
        self, job_id: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        deliveries = await self._rows(
            "SELECT id, url, event, state, host, attempts, next_attempt_at, last_status,"
            " last_error, created_at, finished_at FROM webhook_deliveries WHERE job_id = ?"
            " ORDER BY created_at, id",
            (job_id,),
        )
        attempts = await self._rows(
            "SELECT delivery_id, attempt, at, duration_ms, status_code, error, outcome"
            " FROM webhook_attempts WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
        return [dict(r) for r in deliveries], [dict(r) for r in attempts]
