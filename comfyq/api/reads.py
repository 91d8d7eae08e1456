"""The API's reads, on a connection of its own, each one statement run to completion in one step.

Why not the store's shared read connection: there a read is several thread hops (execute, fetch,
close) and the reads of many tasks interleave, so the connection can stay inside one read
transaction for as long as some statement is open, and under load a read issued after a commit
was announced could still see the state before it. Here every read is a single ``execute_fetchall``
(the statement is finished before the next one starts), so each sees every commit announced
before it was issued; and streams do not queue behind the pipeline's own reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from comfyq.store.model import Job, loads

HEAD_COLUMNS = (
    "id, state, stage, message, attempts, kind, priority, created_at, updated_at,"
    " stage_entered_at, finished_at, owner"
)


class Reads:
    """Fresh reads for request handlers and streams."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._opening: asyncio.Future[aiosqlite.Connection] | None = None

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

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            self._opening = None
            await conn.close()

    async def job(self, job_id: str) -> Job | None:
        """The whole job row."""
        rows = await self.rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    async def head(self, job_id: str) -> Job | None:
        """The few columns a stream needs (not payload or workflow: a thousand streams add up)."""
        rows = await self.rows(f"SELECT {HEAD_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's event rows after row ``after``, oldest first."""
        rows = await self.rows(
            "SELECT * FROM job_events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after)
        )
        return [{**dict(r), "data": loads(r["data"])} for r in rows]

    async def outputs(self, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Output rows of some jobs, in the order they were recorded."""
        out: dict[str, list[dict[str, Any]]] = {}
        if job_ids:
            marks = ",".join("?" * len(job_ids))
            sql = f"SELECT * FROM outputs WHERE job_id IN ({marks}) ORDER BY id"
            for r in await self.rows(sql, job_ids):
                out.setdefault(r["job_id"], []).append(dict(r))
        return out
