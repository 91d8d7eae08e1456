"""PostgresStore: the PostgreSQL adapter of the store interface, for several comfyq instances on
one database. psycopg 3 with its async pool: every store call borrows a pooled connection for one
statement (or one short transaction on a slow path), so a call is one round trip in the usual case
and instances share nothing but the database. Listeners are told after the commit, as with SQLite.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from comfyq.clock import Clock, iso
from comfyq.store.assets import AssetStore
from comfyq.store.base import JobReads, JobStore, Stats, StoreError, StoreUnavailable
from comfyq.store.model import STAGES, Job, NewJob, Stage, State, Transition, loads
from comfyq.store.postgres import migrate, ops, outbox
from comfyq.store.postgres.assets import PgAssets
from comfyq.store.postgres.connect import Conn, connect_once, make_pool, redact, wrapped
from comfyq.store.postgres.reads import PgReads

T = TypeVar("T")


class PostgresStore(JobStore):
    """Jobs, events, outputs and the webhook outbox in a PostgreSQL database."""

    engine = "postgres"
    shared = True

    def __init__(
        self,
        database: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        owner: str = "",
        pool_size: int = 16,
    ) -> None:
        super().__init__(database, clock=clock, owner=owner)
        self.url = str(database)
        self.pool = make_pool(
            self.url, min_size=min(2, pool_size), max_size=pool_size, app_name=self.owner
        )
        self._reads = PgReads(self.pool, self.describe(), self._purge)
        self._assets = PgAssets(self)
        self._checking: asyncio.Future[None] | None = None
        # Lease owners known to be dead (the instance registry's answer); recover() rescues their
        # running jobs at once. Without it, they wait for their leases to expire (the reaper).
        self.dead_owners: Callable[[], Awaitable[list[str]]] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self, *, exclusive: bool = False) -> None:
        """Check the server and the schema (one-line errors), migrate, open the pool."""
        await self.migrate()
        try:
            await self.pool.open(wait=True, timeout=10.0)
        except Exception as exc:
            await self.pool.close()
            raise StoreError(f"cannot open a connection pool to {self.describe()}: {exc}") from exc

    async def close(self) -> None:
        await self.pool.close()

    async def migrate(self) -> list[int]:
        conn = await connect_once(self.url)
        try:
            async with wrapped(self.describe()):
                return await migrate.apply(conn, clock=self.clock)
        finally:
            await conn.close()

    def describe(self) -> str:
        return redact(self.url)

    @property
    def identity(self) -> str:
        try:
            parts = conninfo_to_dict(self.url)
        except psycopg.ProgrammingError:
            return self.describe()
        host, port, db = parts.get("host", ""), parts.get("port", 5432), parts.get("dbname", "")
        return f"postgresql://{host}:{port}/{db}"

    async def _run(self, op: Callable[[Conn], Awaitable[T]]) -> T:
        try:
            async with wrapped(self.describe()), self.pool.connection() as conn:
                return await op(conn)
        except StoreUnavailable:
            self._purge()
            raise

    def _purge(self) -> None:
        """After a lost connection: drop every pooled connection that no longer works (a server
        restart breaks them all), in the background, so the next calls get fresh ones."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self.pool.check())

    async def ping(self) -> None:
        async def check(conn: Conn) -> None:
            cur = await conn.execute("SELECT pg_is_in_recovery() AS standby")
            row = await cur.fetchone()
            if row is None or row["standby"]:
                raise StoreError(f"{self.describe()} is a read-only standby")

        await self._run(check)

    async def maintain(self) -> str:
        return "postgres: autovacuum maintains the tables"

    def reads(self) -> JobReads:
        return self._reads

    def assets(self) -> AssetStore:
        return self._assets

    # --- writes ------------------------------------------------------------------------------

    async def create(self, new: NewJob, max_queue: int) -> tuple[Job, bool]:
        now = self.clock.now()
        return await self._admitting(
            lambda: self._run(lambda c: ops.create(c, new, now, max_queue)),
            lambda owner, lease, message: self._run(
                lambda c: ops.create_claimed(c, new, now, max_queue, owner, lease, message)
            ),
        )

    async def claim(
        self, stage: Stage, n: int, lease: float, message: str, prompt_backend: str | None = None
    ) -> list[Job]:
        now = self.clock.now()
        trs = await self._run(
            lambda c: ops.claim(c, stage, self.owner, n, now, lease, message, prompt_backend)
        )
        self._notify(trs)
        return [t.job for t in trs if t.job is not None]

    async def _one(self, op: Callable[[Conn], Awaitable[Transition]]) -> Transition:
        tr = await self._run(op)
        self._notify([tr])
        return tr

    async def _many(self, op: Callable[[Conn], Awaitable[list[Transition]]]) -> list[Transition]:
        trs = await self._run(op)
        self._notify(trs)
        return trs

    async def advance(
        self,
        job_id: str,
        message: str,
        fields: dict[str, Any] | None = None,
        outputs: list[dict[str, Any]] | None = None,
    ) -> Transition:
        now = self.clock.now()
        return await self._one(
            lambda c: ops.advance(c, job_id, self.owner, now, message, fields, outputs)
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
        now = self.clock.now()
        return await self._many(
            lambda c: ops.advance_and_claim(
                c,
                job_id,
                self.owner,
                now,
                message,
                fields,
                lease,
                claim_message,
                outputs,
                claim_fields,
            )
        )

    async def finish(
        self,
        job_id: str,
        state: State,
        message: str,
        *,
        error: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> Transition:
        now = self.clock.now()
        return await self._one(
            lambda c: ops.finish(
                c, job_id, self.owner, now, state, message, error=error, fields=fields
            )
        )

    async def retry_later(self, job_id: str, delay: float, error: dict[str, Any]) -> Transition:
        now = self.clock.now()
        return await self._one(lambda c: ops.retry_later(c, job_id, self.owner, now, delay, error))

    async def release(self, job_id: str, message: str) -> Transition:
        now = self.clock.now()
        return await self._one(lambda c: ops.release(c, job_id, self.owner, now, message))

    async def update(self, job_id: str, fields: dict[str, Any]) -> Job:
        now = self.clock.now()
        return await self._run(lambda c: ops.update(c, job_id, self.owner, now, fields))

    async def renew(self, lease: float) -> int:
        now = self.clock.now()
        return await self._run(lambda c: ops.renew(c, self.owner, now, lease))

    async def request_cancel(self, job_id: str) -> tuple[Job, Transition | None]:
        now = self.clock.now()
        job, tr = await self._run(lambda c: ops.request_cancel(c, job_id, now))
        if tr is not None:
            self._notify([tr])
            job = tr.job or job
        return job, tr

    async def reap(self, grace: float) -> list[Transition]:
        now = self.clock.now()
        return await self._many(lambda c: ops.reap(c, now, grace))

    async def recover(self) -> list[Transition]:
        dead = await self.dead_owners() if self.dead_owners is not None else []
        now = self.clock.now()
        return await self._many(lambda c: ops.recover(c, self.owner, now, dead))

    async def retry_job(self, job_id: str) -> Transition:
        now = self.clock.now()
        return await self._one(lambda c: ops.retry_job(c, job_id, now))

    async def delete_finished(self, job_id: str) -> bool:
        return await self._run(lambda c: ops.delete_finished(c, job_id))

    async def prune(self, older_than: float, limit: int = 500) -> list[str]:
        before = self.clock.now() - older_than
        return await self._run(lambda c: ops.prune(c, before, limit))

    async def put_output(self, job_id: str, row: dict[str, Any]) -> None:
        now = self.clock.now()
        await self._run(lambda c: ops.put_output(c, job_id, now, row))

    # --- reads -------------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        return await self._reads.job(job_id)

    async def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return await self._reads.events(job_id, after)

    async def list_jobs(
        self,
        *,
        states: Sequence[State] | None = None,
        limit: int = 50,
        cursor: tuple[str, str] | None = None,
    ) -> list[Job]:
        return await self._reads.page(states or [], limit, cursor)

    async def overview(self, statuses: list[str] | None, limit: int) -> list[dict[str, Any]]:
        if statuses:
            return await self._reads.rows(
                "SELECT * FROM jobs_overview WHERE state = ANY(%s) OR status = ANY(%s) LIMIT %s",
                (statuses, statuses, limit),
            )
        return await self._reads.rows("SELECT * FROM jobs_overview LIMIT %s", (limit,))

    async def counts(self) -> dict[Stage, dict[str, int]]:
        out = {s: {"waiting": 0, "running": 0} for s in STAGES}
        for r in await self._reads.rows(
            "SELECT stage, state, count(*) AS n FROM jobs WHERE state IN ('pending', 'running')"
            " GROUP BY stage, state"
        ):
            out[r["stage"]]["waiting" if r["state"] == "pending" else "running"] = r["n"]
        return out

    async def position(self, job: Job) -> tuple[int, int]:
        (row,) = await self._reads.rows(
            "SELECT (SELECT count(*) FROM jobs WHERE state = 'pending' AND stage = %(stage)s AND"
            "   (priority > %(p)s OR (priority = %(p)s"
            "    AND (created_at, id) < (%(c)s::timestamptz, %(id)s)))) AS ahead,"
            " (SELECT count(*) FROM jobs WHERE state = 'pending' AND stage = %(stage)s) AS size",
            {"stage": job.stage, "p": job.priority, "c": job.created_at, "id": job.id},
        )
        return row["ahead"] + 1, row["size"]

    async def outputs(self, job_id: str) -> list[dict[str, Any]]:
        return (await self._reads.outputs([job_id])).get(job_id, [])

    async def secrets(self, job_id: str) -> dict[str, Any]:
        rows = await self._reads.rows("SELECT data FROM job_secrets WHERE job_id = %s", (job_id,))
        return loads(rows[0]["data"]) if rows else {}

    async def cancel_requested(self) -> list[str]:
        rows = await self._reads.rows(
            "SELECT id FROM jobs WHERE state = 'running' AND lease_owner = %s AND cancel_requested",
            (self.owner,),
        )
        return [r["id"] for r in rows]

    async def next_run_after(self, stage: Stage) -> str | None:
        rows = await self._reads.rows(
            "SELECT min(run_after) AS t FROM jobs WHERE state = 'pending' AND stage = %s", (stage,)
        )
        return rows[0]["t"] if rows else None

    async def stats(self) -> Stats:
        out = Stats(
            jobs={s: 0 for s in ("pending", "running", "completed", "failed", "cancelled")},
            webhook_deliveries={s: 0 for s in ("pending", "sending", "delivered", "failed")},
            webhook_attempts={s: 0 for s in ("delivered", "retry", "gave_up")},
        )
        for r in await self._reads.rows(
            "SELECT 'jobs' AS t, state AS k, count(*) AS n FROM jobs GROUP BY state"
            " UNION ALL SELECT 'deliveries', state, count(*) FROM webhook_deliveries GROUP BY state"
            " UNION ALL SELECT 'attempts', outcome, count(*) FROM webhook_attempts GROUP BY outcome"
        ):
            into = {
                "jobs": out.jobs,
                "deliveries": out.webhook_deliveries,
                "attempts": out.webhook_attempts,
            }[r["t"]]
            into[r["k"]] = r["n"]
        return out

    # --- webhook outbox ----------------------------------------------------------------------

    async def outbox_claim(
        self, n: int, per_host: int, lease: float, per_endpoint: int | None = None
    ) -> list[dict[str, Any]]:
        now = self.clock.now()
        return await self._run(
            lambda c: outbox.claim(c, self.owner, now, n, per_host, lease, per_endpoint)
        )

    async def outbox_record(self, delivery: dict[str, Any], attempt: Any) -> bool:
        now = self.clock.now()
        return await self._run(lambda c: outbox.record(c, delivery, self.owner, now, attempt))

    async def outbox_recover(self, max_attempts: int) -> int:
        now = self.clock.now()
        return await self._run(lambda c: outbox.recover(c, self.owner, now, max_attempts))

    async def outbox_next_due(self) -> str | None:
        rows = await self._reads.rows(
            "SELECT min(next_attempt_at) AS t FROM webhook_deliveries"
            " WHERE state = 'pending' AND next_attempt_at > %s::timestamptz",
            (iso(self.clock.now()),),
        )
        return rows[0]["t"] if rows else None

    async def webhook_history(
        self, job_id: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        deliveries = await self._reads.rows(
            "SELECT id, url, event, state, host, attempts, next_attempt_at, last_status,"
            " last_error, created_at, finished_at FROM webhook_deliveries WHERE job_id = %s"
            " ORDER BY created_at, id",
            (job_id,),
        )
        attempts = await self._reads.rows(
            "SELECT delivery_id, attempt, at, duration_ms, status_code, error, outcome"
            " FROM webhook_attempts WHERE job_id = %s ORDER BY id",
            (job_id,),
        )
        return deliveries, attempts
