"""Reads on PostgreSQL, on the pool: each one statement in autocommit, so each sees every commit
made before it was issued, whichever instance made it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from comfyq.store.base import JobReads, StoreUnavailable, status_sql
from comfyq.store.model import Job, State, loads
from comfyq.store.postgres.connect import Conn, wrapped

HEAD_COLUMNS = (
    "id, state, stage, message, attempts, kind, priority, created_at, updated_at,"
    " stage_entered_at, finished_at, owner"
)
# A job without its documents, plus the two facts Postgres takes out of them (JobReads.summary).
_GRAPH = (
    "CASE WHEN prepared IS NULL THEN payload #> '{input,workflow_json}'"
    " ELSE prepared -> 'workflow' END"
)
SUMMARY_COLUMNS = (
    "id, state, stage, priority, attempts, max_attempts, message, kind, error, timings, owner,"
    " cancel_requested, comfy_prompt_id, created_at, updated_at, stage_entered_at, finished_at,"
    " deadline_at, payload #> '{v2,metadata}' AS v2_metadata,"
    f" CASE json_typeof({_GRAPH})"
    f" WHEN 'object' THEN (SELECT count(*) FROM json_object_keys({_GRAPH}))"
    f" WHEN 'array' THEN json_array_length({_GRAPH}) ELSE 0 END AS nodes_total"
)
# Waiting jobs in claim order per stage (the jobs_claim index), then the running ones.
SNAPSHOT_SQL = (
    "SELECT id, stage, 'pending' AS state, row_number() OVER (PARTITION BY stage"
    " ORDER BY priority DESC, created_at, id) AS pos FROM jobs WHERE state = 'pending'"
    " UNION ALL SELECT id, stage, 'running', 0 FROM jobs WHERE state = 'running'"
)


class PgReads(JobReads):
    """Fresh reads for request handlers, streams and the store's own read methods."""

    def __init__(
        self, pool: AsyncConnectionPool[Conn], where: str, on_lost: Callable[[], None]
    ) -> None:
        self.pool = pool
        self.where = where
        self.on_lost = on_lost

    async def rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """All rows of one statement."""
        try:
            async with wrapped(self.where), self.pool.connection() as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall()
        except StoreUnavailable:
            self.on_lost()
            raise

    async def close(self) -> None:
        """Nothing of its own to release: the pool is the store's."""

    async def job(self, job_id: str) -> Job | None:
        rows = await self.rows("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return Job(rows[0]) if rows else None

    async def head(self, job_id: str) -> Job | None:
        rows = await self.rows(f"SELECT {HEAD_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        return Job(rows[0]) if rows else None

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        rows = await self.rows(
            "SELECT * FROM job_events WHERE job_id = %s AND id > %s ORDER BY id", (job_id, after)
        )
        for r in rows:
            r["data"] = loads(r["data"])
        return rows

    async def outputs(self, job_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        if job_ids:
            sql = "SELECT * FROM outputs WHERE job_id = ANY(%s) ORDER BY id"
            for r in await self.rows(sql, (job_ids,)):
                out.setdefault(r["job_id"], []).append(r)
        return out

    async def output_file(self, job_id: str, filename: str) -> dict[str, Any] | None:
        rows = await self.rows(
            "SELECT o.local_path, o.mimetype, j.owner FROM outputs o JOIN jobs j ON j.id = o.job_id"
            " WHERE o.job_id = %s AND o.filename = %s",
            (job_id, filename),
        )
        return rows[0] if rows else None

    async def page(
        self,
        statuses: Sequence[str],
        limit: int,
        cursor: tuple[str, str] | None,
        owners: list[str] | None = None,
        id_prefix: str = "",
    ) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if statuses:
            where.append("(" + " OR ".join(status_sql(s, params, "%s") for s in statuses) + ")")
        if id_prefix:
            where.append("starts_with(id, %s)")
            params.append(id_prefix)
        if cursor:
            where.append("(created_at, id) < (%s::timestamptz, %s)")
            params.extend(cursor)
        if owners is not None:
            where.append("owner = ANY(%s)")
            params.append(owners)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        return [Job(r) for r in await self.rows(sql, (*params, limit))]

    async def summary(self, job_id: str) -> Job | None:
        rows = await self.rows(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
        return Job(rows[0]) if rows else None

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
            where.append("owner = ANY(%s)")
            params.append(owners)
        if states:
            where.append("state = ANY(%s)")
            params.append(states)
        if cursor:
            where.append("(created_at, id) < (%s::timestamptz, %s)")
            params.extend(cursor)
        sql = f"SELECT {SUMMARY_COLUMNS} FROM jobs"
        sql += (" WHERE " + " AND ".join(where) if where else "") + (
            " ORDER BY created_at DESC, id DESC LIMIT %s"
        )
        return [Job(r) for r in await self.rows(sql, (*params, limit))]

    async def workflow(self, job_id: str) -> dict[str, Any] | None:
        rows = await self.rows(
            "SELECT coalesce(prepared -> 'workflow', payload #> '{input,workflow_json}') AS w"
            " FROM jobs WHERE id = %s",
            (job_id,),
        )
        graph = loads(rows[0]["w"]) if rows and rows[0]["w"] else None
        return graph if isinstance(graph, dict) else None

    async def queue_snapshot(self) -> list[tuple[str, str, str, int]]:
        return [(r["id"], r["stage"], r["state"], r["pos"]) for r in await self.rows(SNAPSHOT_SQL)]

    async def status_counts(self, owners: list[str] | None) -> dict[tuple[str, str], int]:
        if owners is not None and not owners:
            return {}
        sql = (
            "SELECT state, CASE WHEN finished_at IS NULL THEN stage ELSE '' END AS stage,"
            " count(*) AS n FROM jobs"
            + (" WHERE owner = ANY(%s)" if owners is not None else "")
            + " GROUP BY 1, 2"
        )
        rows = await self.rows(sql, (owners,) if owners is not None else ())
        return {(r["state"], r["stage"]): r["n"] for r in rows}

    async def finished_between(
        self, start: float, end: float, limit: int
    ) -> list[tuple[str, float]]:
        rows = await self.rows(
            "SELECT state, extract(epoch FROM finished_at - created_at)::float8 AS secs FROM jobs"
            " WHERE finished_at >= to_timestamp(%s) AND finished_at < to_timestamp(%s) LIMIT %s",
            (start, end, limit),
        )
        return [(r["state"], float(r["secs"])) for r in rows]

    async def completed_timings(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        rows = await self.rows(
            "SELECT kind, timings FROM jobs WHERE state = 'completed' AND finished_at IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT %s",
            (limit,),
        )
        return [(r["kind"], loads(r["timings"])) for r in rows]
