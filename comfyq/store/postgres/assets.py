"""The PostgreSQL adapter's assets (migration 0003): each write one short transaction on a pooled
connection, the same rules as the SQLite adapter's (comfyq/store/sqlite/assets.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from comfyq.clock import iso
from comfyq.store.assets import (
    IDEMPOTENCY_TTL,
    AssetRecord,
    AssetStore,
    Blob,
    KeyReused,
    NewAsset,
    asset_record,
    output_asset,
)
from comfyq.store.model import Job, NewJob, Transition, dumps
from comfyq.store.postgres import ops
from comfyq.store.postgres.connect import Conn

_ASSET_SQL = (
    "SELECT a.id, a.hash, a.owner, a.content_type, a.file_path, a.tags, a.created_at,"
    " a.expires_at, b.size_bytes, b.path FROM assets a JOIN blobs b ON b.hash = a.hash"
)
_OUTPUT_SQL = (
    "SELECT asset_id, blake3, size, mimetype, filename, created_at, local_path, url, job_id,"
    " node_id, output_type FROM outputs"
)
# Re-referencing content extends the retention of the owner's assets over it, never shortens it.
_EXTEND = (
    "UPDATE assets SET expires_at = %(exp)s::timestamptz WHERE hash = %(hash)s"
    " AND owner = %(owner)s AND expires_at IS NOT NULL"
    " AND (%(exp)s::timestamptz IS NULL OR expires_at < %(exp)s::timestamptz)"
)
_INSERT = (
    "INSERT INTO assets (id, hash, owner, content_type, file_path, tags, created_at, expires_at)"
    " VALUES (%(id)s, %(hash)s, %(owner)s, %(ctype)s, %(file_path)s, %(tags)s::json,"
    " %(now)s::timestamptz, %(exp)s::timestamptz)"
)


async def _one(conn: Conn, sql: str, params: Any) -> dict[str, Any] | None:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def _claim_key(conn: Conn, owner: str, scope: str, key: str, ref: str, now: float) -> None:
    t = iso(now)
    claimed = await _one(
        conn,
        "INSERT INTO idempotency_keys (owner, scope, key, ref, created_at, expires_at)"
        " VALUES (%s, %s, %s, %s, %s::timestamptz, %s::timestamptz)"
        " ON CONFLICT (owner, scope, key) DO UPDATE SET ref = excluded.ref,"
        " created_at = excluded.created_at, expires_at = excluded.expires_at"
        " WHERE idempotency_keys.expires_at <= %s::timestamptz RETURNING key",
        (owner, scope, key, ref, t, iso(now + IDEMPOTENCY_TTL), t),
    )
    if claimed is None:
        raise KeyReused(
            "this Idempotency-Key was already used (keys are single-use for 24 hours)",
            details={"idempotency_key": key},
        )


async def _drop_blob_if_unused(conn: Conn, hash_: str) -> str | None:
    gone = await _one(
        conn,
        "DELETE FROM blobs WHERE hash = %s AND NOT EXISTS (SELECT 1 FROM assets WHERE hash = %s)"
        " RETURNING path",
        (hash_, hash_),
    )
    return None if gone is None else str(gone["path"])


class PgAssets(AssetStore):
    """Assets, blobs and idempotency keys in the PostgreSQL store."""

    def __init__(self, jobs: Any) -> None:
        self.jobs = jobs  # the PostgresStore: its pool, clock and listeners

    def _now(self) -> float:
        return float(self.jobs.clock.now())

    async def _rows(self, sql: str, params: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.jobs.reads().rows(sql, params)
        return rows

    async def put_asset(
        self, blob: Blob, new: NewAsset, key: str | None = None
    ) -> tuple[AssetRecord, bool]:
        now = self._now()
        exp = None if new.expires_at is None else iso(new.expires_at)

        async def run(conn: Conn) -> tuple[AssetRecord, bool]:
            async with conn.transaction():
                if key is not None:
                    await _claim_key(conn, new.owner, "assets", key, new.id, now)
                created = (
                    await _one(
                        conn,
                        "INSERT INTO blobs (hash, size_bytes, path, created_at)"
                        " VALUES (%s, %s, %s, %s::timestamptz)"
                        " ON CONFLICT (hash) DO NOTHING RETURNING hash",
                        (blob.hash, blob.size_bytes, blob.path, iso(now)),
                    )
                    is not None
                )
                params = {
                    "id": new.id,
                    "hash": blob.hash,
                    "owner": new.owner,
                    "ctype": new.content_type,
                    "file_path": new.file_path,
                    "tags": dumps(new.tags),
                    "now": iso(now),
                    "exp": exp,
                }
                if not created:
                    await conn.execute(_EXTEND, params)
                await conn.execute(_INSERT, params)
                row = await _one(conn, f"{_ASSET_SQL} WHERE a.id = %s", (new.id,))
            assert row is not None
            return asset_record(row), created

        result: tuple[AssetRecord, bool] = await self.jobs._run(run)
        return result

    async def mint_from_hash(
        self, hash_: str, new: NewAsset, scope: str | None
    ) -> AssetRecord | None:
        now = self._now()
        exp = None if new.expires_at is None else iso(new.expires_at)

        async def run(conn: Conn) -> AssetRecord | None:
            async with conn.transaction():
                src = await _one(
                    conn,
                    "SELECT content_type FROM assets WHERE hash = %s"
                    " AND (%s::text IS NULL OR owner = %s) ORDER BY created_at DESC LIMIT 1",
                    (hash_, scope, scope),
                )
                if src is None:
                    return None
                params = {
                    "id": new.id,
                    "hash": hash_,
                    "owner": new.owner,
                    "ctype": src["content_type"],
                    "file_path": new.file_path,
                    "tags": dumps(new.tags),
                    "now": iso(now),
                    "exp": exp,
                }
                await conn.execute(_INSERT, params)
                await conn.execute(_EXTEND, params)
                row = await _one(conn, f"{_ASSET_SQL} WHERE a.id = %s", (new.id,))
            return None if row is None else asset_record(row)

        rec: AssetRecord | None = await self.jobs._run(run)
        return rec

    async def delete_asset(self, asset_id: str, scope: str | None) -> tuple[str, str | None]:
        async def run(conn: Conn) -> tuple[str, str | None]:
            async with conn.transaction():
                row = await _one(
                    conn,
                    "SELECT hash FROM assets WHERE id = %s AND (%s::text IS NULL OR owner = %s)"
                    " FOR UPDATE",
                    (asset_id, scope, scope),
                )
                if row is None:
                    out = await _one(conn, "SELECT 1 FROM outputs WHERE asset_id = %s", (asset_id,))
                    # An output is held by its job for as long as the job is kept.
                    return ("in_use", None) if out is not None else ("missing", None)
                used = await _one(
                    conn,
                    "SELECT 1 FROM job_assets ja JOIN jobs j ON j.id = ja.job_id"
                    " WHERE ja.asset_id = %s AND j.state IN ('pending', 'running') LIMIT 1",
                    (asset_id,),
                )
                if used is not None:
                    return "in_use", None
                await conn.execute("DELETE FROM assets WHERE id = %s", (asset_id,))
                return "deleted", await _drop_blob_if_unused(conn, row["hash"])

        result: tuple[str, str | None] = await self.jobs._run(run)
        return result

    async def create_job_keyed(
        self,
        new: NewJob,
        max_queue: int,
        *,
        owner: str,
        key: str | None,
        asset_ids: Sequence[str],
    ) -> Job:
        now = self._now()

        async def run(conn: Conn, claim: tuple[str, float, str] | None) -> tuple[Job, Any]:
            # One transaction: concurrent duplicates of a key make one job, and a refusal (queue
            # full) leaves the key unclaimed for a legitimate retry. ``claim``: claimed at once
            # by an idle preprocess worker, as ``create`` does.
            async with conn.transaction():
                if key is not None:
                    await _claim_key(conn, owner, "jobs", key, new.id, now)
                if claim is None:
                    job, tr = await ops.create(conn, new, now, max_queue)
                    trs = [] if tr is None else [tr]
                else:
                    job, trs = await ops.create_claimed(conn, new, now, max_queue, *claim)
                if trs and asset_ids:
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            "INSERT INTO job_assets (job_id, asset_id) VALUES (%s, %s)"
                            " ON CONFLICT DO NOTHING",
                            [(new.id, a) for a in asset_ids],
                        )
            return job, trs

        async def plain() -> tuple[Job, Transition | None]:
            job, trs = await self.jobs._run(lambda c: run(c, None))
            return job, trs[0] if trs else None

        async def claimed(by: str, lease: float, message: str) -> tuple[Job, list[Transition]]:
            result: tuple[Job, list[Transition]] = await self.jobs._run(
                lambda c: run(c, (by, lease, message))
            )
            return result

        job, _ = await self.jobs._admitting(plain, claimed)
        assert isinstance(job, Job)
        return job

    async def prune_assets(self) -> list[str]:
        t = iso(self._now())

        async def run(conn: Conn) -> list[str]:
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM idempotency_keys WHERE expires_at <= %s::timestamptz", (t,)
                )
                cur = await conn.execute(
                    "DELETE FROM assets WHERE id IN (SELECT a.id FROM assets a"
                    " WHERE a.expires_at <= %s::timestamptz AND NOT EXISTS"
                    " (SELECT 1 FROM job_assets ja JOIN jobs j ON j.id = ja.job_id"
                    "  WHERE ja.asset_id = a.id AND j.state IN ('pending', 'running'))"
                    " LIMIT 500 FOR UPDATE SKIP LOCKED) RETURNING hash",
                    (t,),
                )
                hashes = {r["hash"] for r in await cur.fetchall()}
                paths = []
                for h in hashes:
                    path = await _drop_blob_if_unused(conn, h)
                    if path is not None:
                        paths.append(path)
            return paths

        paths: list[str] = await self.jobs._run(run)
        return paths

    async def asset(self, asset_id: str) -> AssetRecord | None:
        rows = await self._rows(f"{_ASSET_SQL} WHERE a.id = %s", (asset_id,))
        if rows:
            return asset_record(rows[0])
        rows = await self._rows(f"{_OUTPUT_SQL} WHERE asset_id = %s", (asset_id,))
        return output_asset(rows[0]) if rows else None

    async def assets(self, ids: Sequence[str]) -> dict[str, AssetRecord]:
        if not ids:
            return {}
        rows = await self._rows(f"{_ASSET_SQL} WHERE a.id = ANY(%s)", (list(ids),))
        return {r["id"]: asset_record(r) for r in rows}

    async def blob_for(self, hash_: str, scope: str | None) -> Blob | None:
        rows = await self._rows(
            "SELECT b.hash, b.size_bytes, b.path FROM blobs b WHERE b.hash = %s AND EXISTS"
            " (SELECT 1 FROM assets a WHERE a.hash = b.hash"
            " AND (%s::text IS NULL OR a.owner = %s))",
            (hash_, scope, scope),
        )
        return Blob(rows[0]["hash"], rows[0]["size_bytes"], rows[0]["path"]) if rows else None

    async def blob(self, hash_: str) -> Blob | None:
        rows = await self._rows(
            "SELECT hash, size_bytes, path FROM blobs WHERE hash = %s", (hash_,)
        )
        return Blob(rows[0]["hash"], rows[0]["size_bytes"], rows[0]["path"]) if rows else None

    async def job_outputs(self, job_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        if job_ids:
            sql = "SELECT * FROM outputs WHERE job_id = ANY(%s) ORDER BY id"
            for r in await self._rows(sql, (list(job_ids),)):
                out.setdefault(r["job_id"], []).append(r)
        return out
