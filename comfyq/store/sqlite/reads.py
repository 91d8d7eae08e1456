"""The SQLite adapter's JobReads: the API's reads, on connections of their own, each one statement
run to completion in one step.

Point reads (a job's head, its events, its outputs: one indexed lookup, tens of microseconds) run
right on the event loop's thread, on a plain connection: a hop to a reader thread and back costs far
more than the read (a queue put, a thread wake-up, two GIL hand-offs and a loop wake-up, each a
few futex calls) and under load it dominated the API's CPU per job. In WAL mode a reader never
waits for the writer; if SQLite still answers "busy" (recovery of a WAL left by a crash), the read
is done on the reader thread instead. Reads whose cost grows with the table (pages, counts) or
with a job's documents (the whole row, summaries) stay on the reader thread, so a big table or a
16 MiB workflow never stalls the loop.

Why not the store's shared read connection: there a read is several thread hops (execute, fetch,
close) and the reads of many tasks interleave, so the connection can stay inside one read
transaction for as long as some statement is open, and under load a read issued after a commit
was announced could still see the state before it. Here every read is a single ``execute_fetchall``
(the statement is finished before the next one starts), so each sees every commit announced
before it was issued; and streams do not queue behind the pipeline's own reads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from comfyq.clock import iso
from comfyq.store.base import JobReads, status_sql
from comfyq.store.model import Job, State, loads

# The queue's ranking runs inline while it had fewer rows than this the last time (~0.1 ms); a
# deeper queue ranks on the reader thread (at 10,000 waiting jobs it takes ~100 ms).
INLINE_SNAPSHOT_ROWS = 200

HEAD_COLUMNS = (
    "id, state, stage, message, attempts, kind, priority, created_at, updated_at,"
    " stage_entered_at, finished_at, owner"
)


class Reads(JobReads):
    """Fresh reads for request handlers and streams."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._opening: asyncio.Future[aiosqlite.Connection] | None = None
        self._inline: InlineReader = InlineReader(self.path)
        self._snapshot_rows = INLINE_SNAPSHOT_ROWS  # unknown until the first one: on the thread

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA busy_timeout = 10000")
        self._conn = conn
        return conn

    async def rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """All rows of one statement, run to completion in one step."""
        conn = self._conn
        if conn is None:
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            conn = await asyncio.shield(self._opening)
        return list(await conn.execute_fetchall(sql, tuple(params)))

    async def now(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """All rows of one cheap statement, read on the calling thread (see the module doc)."""
        got = self._inline.rows(sql, params)
        return got if got is not None else await self.rows(sql, params)

    async def close(self) -> None:
        self._inline.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._opening = None
            await conn.close()

    async def job(self, job_id: str) -> Job | None:
        """The whole job row."""
        # On the reader thread: the row holds the payload and prepared workflow, which may be
        # megabytes (a 16 MiB body); reading them would hold the loop.
        rows = await self.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    async def head(self, job_id: str) -> Job | None:
        """The few columns a stream needs (not payload or workflow: a thousand streams add up)."""
        rows = await self.now(f"SELECT {HEAD_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's event rows after row ``after``, oldest first."""
        rows = await self.now(
            "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
        )
        return [{**dict(r), "data": loads(r["data"])} for r in rows]

    async def outputs(self, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Output rows of some jobs, in the order they were recorded."""
        out: dict[str, list[dict[str, Any]]] = {}
        if job_ids:
            marks = ",".join("?" * len(job_ids))
            sql = f"SELECT * FROM outputs WHERE job_id IN ({marks}) ORDER BY id"
            for r in await self.now(sql, job_ids):
                out.setdefault(r["job_id"], []).append(dict(r))
        return out

    async def output_file(self, job_id: str, filename: str) -> dict[str, Any] | None:
        rows = await self.now(
            "SELECT o.local_path, o.mimetype, j.owner FROM outputs o JOIN jobs j ON j.id = o.job_id"
            " WHERE o.job_id = ? AND o.filename = ?",
            (job_id, filename),
        )
        return dict(rows[0]) if rows else None

    async def page(
        self,
        statuses: list[str],
        limit: int,
        cursor: tuple[str, str] | None,
        owners: list[str] | None = None,
        id_prefix: str = "",
    ) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if statuses:
            where.append("(" + " OR ".join(status_sql(s, params, "?") for s in statuses) + ")")
        if id_prefix:
            # A primary-key range, not LIKE (whose wildcards and case rules do not fit ids).
            where.append("id >= ? AND id < ?")
            params.extend((id_prefix, id_prefix + "\U0010ffff"))
        if cursor:
            where.append("(created_at, id) < (?, ?)")
            params.extend(cursor)
        if owners is not None:
            where.append(f"owner IN ({','.join('?' * len(owners))})" if owners else "0")
            params.extend(owners)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [Job.from_row(r) for r in await self.rows(sql, (*params, limit))]

    async def summary(self, job_id: str) -> Job | None:
        # On the reader thread: SUMMARY_COLUMNS walks the job's documents.
        rows = await self.rows(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    async def summaries(
        self,
        states: Sequence[State] | None,
        owners: list[str] | None,
        cursor: tuple[str, str] | None,
        limit: int,
    ) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if owners is not None:
            where.append(f"owner IN ({','.join('?' * len(owners))})" if owners else "0")
            params.extend(owners)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if cursor:
            where.append("(created_at, id) < (?, ?)")
            params.extend(cursor)
        sql = f"SELECT {SUMMARY_COLUMNS} FROM jobs"
        sql += (" WHERE " + " AND ".join(where) if where else "") + (
            " ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        return [Job.from_row(r) for r in await self.rows(sql, (*params, limit))]

    async def workflow(self, job_id: str) -> dict[str, Any] | None:
        rows = await self.rows(
            "SELECT coalesce(json_extract(prepared, '$.workflow'),"
            " json_extract(payload, '$.input.workflow_json')) FROM jobs WHERE id = ?",
            (job_id,),
        )
        return loads(rows[0][0]) if rows and rows[0][0] else None

    async def queue_snapshot(self) -> list[tuple[str, str, str, int]]:
        got = self.queue_snapshot_now()
        if got is not None:
            return got
        rows = await self.rows(SNAPSHOT_SQL)
        self._snapshot_rows = len(rows)
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def queue_snapshot_now(self) -> list[tuple[str, str, str, int]] | None:
        # Its cost grows with the unfinished jobs: inline while the last one was short.
        if self._snapshot_rows >= INLINE_SNAPSHOT_ROWS:
            return None
        rows = self._inline.rows(SNAPSHOT_SQL)
        if rows is None:
            return None
        self._snapshot_rows = len(rows)
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def status_counts(self, owners: list[str] | None) -> dict[tuple[str, str], int]:
        if owners is not None:
            if not owners:
                return {}
            sql = (
                "SELECT state, CASE WHEN finished_at IS NULL THEN stage ELSE '' END, count(*)"
                f" FROM jobs WHERE owner IN ({','.join('?' * len(owners))}) GROUP BY 1, 2"
            )
            return {(r[0], r[1]): r[2] for r in await self.rows(sql, owners)}
        # Unfinished jobs through their partial indexes; finished ones one count per state on
        # the (state, created_at, id) index: no pass over the finished rows themselves.
        rows = await self.rows(
            "SELECT state, stage, count(*) FROM jobs WHERE state = 'pending' GROUP BY stage"
            " UNION ALL SELECT state, stage, count(*) FROM jobs WHERE state = 'running'"
            " GROUP BY stage"
            " UNION ALL SELECT 'completed', '', count(*) FROM jobs WHERE state = 'completed'"
            " UNION ALL SELECT 'failed', '', count(*) FROM jobs WHERE state = 'failed'"
            " UNION ALL SELECT 'cancelled', '', count(*) FROM jobs WHERE state = 'cancelled'"
        )
        return {(r[0], r[1]): r[2] for r in rows if r[2]}

    async def finished_between(
        self, start: float, end: float, limit: int
    ) -> list[tuple[str, float]]:
        rows = await self.rows(
            "SELECT state, (julianday(finished_at) - julianday(created_at)) * 86400.0 FROM jobs"
            " WHERE finished_at >= ? AND finished_at < ? LIMIT ?",
            (iso(start), iso(end), limit),
        )
        return [(r[0], float(r[1])) for r in rows]

    async def completed_timings(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        # ``finished_at IS NOT NULL`` (always true of a completed job) lets it walk the
        # jobs_finished index newest first and stop at the limit, instead of scanning and sorting.
        rows = await self.rows(
            "SELECT kind, timings FROM jobs WHERE state = 'completed' AND finished_at IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT ?",
            (limit,),
        )
        return [(kind, loads(timings)) for kind, timings in rows]


# A job without its documents, plus the two facts SQLite takes out of them (JobReads.summary).
SUMMARY_COLUMNS = (
    "id, state, stage, priority, attempts, max_attempts, message, kind, error, timings, owner,"
    " cancel_requested, comfy_prompt_id, created_at, updated_at, stage_entered_at, finished_at,"
    " deadline_at, json_extract(payload, '$.v2.metadata') AS v2_metadata,"
    " (SELECT count(*) FROM json_each(coalesce(prepared, payload),"
    "   CASE WHEN prepared IS NULL THEN '$.input.workflow_json' ELSE '$.workflow' END))"
    " AS nodes_total"
)


# Two halves, one per index range (jobs_claim for pending, in claim order, and the running range of
# jobs_state_created): ``state IN ('pending', 'running')`` in one query scanned and sorted the whole
# table, finished jobs included, on every change (4 ms at 20,000 jobs; 0.01 ms this way).
# INDEXED BY: the claim index is already in rank order (no sort) and holds every column read.
SNAPSHOT_SQL = (
    "SELECT id, stage, 'pending', row_number() OVER (PARTITION BY stage ORDER BY priority DESC,"
    " created_at, id) FROM jobs INDEXED BY jobs_claim WHERE state = 'pending'"
    " UNION ALL SELECT id, stage, 'running', 0 FROM jobs WHERE state = 'running'"
)


class InlineReader:
    """A plain connection, only read from, used on the caller's thread. :meth:`rows` answers None
    when the database is busy (the caller then reads on a thread, where waiting stalls no loop)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def rows(self, sql: str, params: Iterable[Any] = ()) -> list[Any] | None:
        conn = self._conn
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 0")
            self._conn = conn
        try:
            args = params if isinstance(params, dict) else tuple(params)
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
