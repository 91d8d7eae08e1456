"""The SQLite adapter's assets (migration 0003): each write is a ``fn(conn, ...)`` run by the
store's one writer inside the group transaction, like ``ops``; reads on the store's read
connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

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
from comfyq.store.sqlite import ops
from comfyq.store.sqlite.journal import stamp as _iso

Rows = Callable[[str, Any], Awaitable[list[Any]]]

_ASSET_SQL = (
    "SELECT a.id, a.hash, a.owner, a.content_type, a.file_path, a.tags, a.created_at,"
    " a.expires_at, b.size_bytes, b.path FROM assets a JOIN blobs b ON b.hash = a.hash"
)
_OUTPUT_SQL = (
    "SELECT asset_id, blake3, size, mimetype, filename, created_at, local_path, url, job_id,"
    " node_id, output_type FROM outputs"
)


# --- writes: fn(conn, ...) run by the writer ---------------------------------------------------


def put_asset(
    conn: sqlite3.Connection, blob: Blob, new: NewAsset, now: float, key: str | None
) -> tuple[AssetRecord, bool]:
    """Record the blob (unless held already) and mint an asset over it: ``(asset, blob_is_new)``."""
    t = _iso(now)
    if key is not None:
        _claim_key(conn, new.owner, "assets", key, new.id, now)
    created = (
        conn.execute(
            "INSERT INTO blobs (hash, size_bytes, path, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (hash) DO NOTHING RETURNING hash",
            (blob.hash, blob.size_bytes, blob.path, t),
        ).fetchone()
        is not None
    )
    expires = None if new.expires_at is None else _iso(new.expires_at)
    if not created:
        # Re-referencing content extends the retention of the assets over it, never shortens it.
        conn.execute(
            "UPDATE assets SET expires_at = ? WHERE hash = ? AND owner = ?"
            " AND expires_at IS NOT NULL"
            " AND (? IS NULL OR expires_at < ?)",
            (expires, blob.hash, new.owner, expires, expires),
        )
    conn.execute(
        "INSERT INTO assets (id, hash, owner, content_type, file_path, tags, created_at,"
        " expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            new.id,
            blob.hash,
            new.owner,
            new.content_type,
            new.file_path,
            dumps(new.tags),
            t,
            expires,
        ),
    )
    row = conn.execute(f"{_ASSET_SQL} WHERE a.id = ?", (new.id,)).fetchone()
    return asset_record(row), created


def mint_from_hash(
    conn: sqlite3.Connection, hash_: str, new: NewAsset, now: float, scope: str | None
) -> AssetRecord | None:
    """A new asset over a blob that ``scope`` (an owner; None: anyone) has an asset of; None when
    there is none."""
    src = conn.execute(
        "SELECT content_type, expires_at FROM assets WHERE hash = ? AND (? IS NULL OR owner = ?)"
        " ORDER BY created_at DESC LIMIT 1",
        (hash_, scope, scope),
    ).fetchone()
    if src is None:
        return None
    expires = None if new.expires_at is None else _iso(new.expires_at)
    conn.execute(
        "INSERT INTO assets (id, hash, owner, content_type, file_path, tags, created_at,"
        " expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            new.id,
            hash_,
            new.owner,
            src["content_type"],
            new.file_path,
            dumps(new.tags),
            _iso(now),
            expires,
        ),
    )
    conn.execute(
        "UPDATE assets SET expires_at = ? WHERE hash = ? AND owner = ? AND expires_at IS NOT NULL"
        " AND (? IS NULL OR expires_at < ?)",
        (expires, hash_, new.owner, expires, expires),
    )
    return asset_record(conn.execute(f"{_ASSET_SQL} WHERE a.id = ?", (new.id,)).fetchone())


def delete_asset(
    conn: sqlite3.Connection, asset_id: str, scope: str | None
) -> tuple[str, str | None]:
    """``("deleted", blob path to remove or None)``, ``("missing", None)`` or ``("in_use", None)``;
    ``scope`` is the owner whose asset it must be (None: anyone's)."""
    row = conn.execute(
        "SELECT hash FROM assets WHERE id = ? AND (? IS NULL OR owner = ?)",
        (asset_id, scope, scope),
    ).fetchone()
    if row is None:
        out = conn.execute("SELECT 1 FROM outputs WHERE asset_id = ?", (asset_id,)).fetchone()
        # An output is held by its job for as long as the job is kept.
        return ("in_use", None) if out is not None else ("missing", None)
    used = conn.execute(
        "SELECT 1 FROM job_assets ja JOIN jobs j ON j.id = ja.job_id"
        " WHERE ja.asset_id = ? AND j.state IN ('pending', 'running') LIMIT 1",
        (asset_id,),
    ).fetchone()
    if used is not None:
        return "in_use", None
    conn.execute("DELETE FROM assets WHERE id = ?", (asset_id,))
    return "deleted", _drop_blob_if_unused(conn, row["hash"])


def _drop_blob_if_unused(conn: sqlite3.Connection, hash_: str) -> str | None:
    gone = conn.execute(
        "DELETE FROM blobs WHERE hash = ? AND NOT EXISTS (SELECT 1 FROM assets WHERE hash = ?)"
        " RETURNING path",
        (hash_, hash_),
    ).fetchone()
    return None if gone is None else str(gone[0])


def _claim_key(
    conn: sqlite3.Connection, owner: str, scope: str, key: str, ref: str, now: float
) -> None:
    t = _iso(now)
    claimed = conn.execute(
        "INSERT INTO idempotency_keys (owner, scope, key, ref, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, scope, key) DO UPDATE SET"
        " ref = excluded.ref, created_at = excluded.created_at, expires_at = excluded.expires_at"
        " WHERE idempotency_keys.expires_at <= ? RETURNING key",
        (owner, scope, key, ref, t, _iso(now + IDEMPOTENCY_TTL), t),
    ).fetchone()
    if claimed is None:
        raise KeyReused(
            "this Idempotency-Key was already used (keys are single-use for 24 hours)",
            details={"idempotency_key": key},
        )


def create_job_keyed(
    conn: sqlite3.Connection,
    new: NewJob,
    now: float,
    max_queue: int,
    owner: str,
    key: str | None,
    asset_ids: Sequence[str],
    claim: tuple[str, float, str] | None = None,
) -> tuple[Job, list[Transition]]:
    """Admit a v2 job: claim its Idempotency-Key, insert the job, note the assets it uses;
    ``claim`` (lease owner, lease, message): claimed at once as ``ops.create_claimed`` does.

    One transaction: concurrent duplicates of a key make one job, and a refusal (queue full)
    leaves the key unclaimed for a legitimate retry."""
    if key is not None:
        _claim_key(conn, owner, "jobs", key, new.id, now)
    if claim is None:
        job, tr = ops.create(conn, new, now, max_queue)
        trs = [] if tr is None else [tr]
    else:
        job, trs = ops.create_claimed(conn, new, now, max_queue, *claim)
    if trs and asset_ids:
        conn.executemany(
            "INSERT OR IGNORE INTO job_assets (job_id, asset_id) VALUES (?, ?)",
            [(new.id, a) for a in asset_ids],
        )
    return job, trs


def prune_assets(conn: sqlite3.Connection, now: float, limit: int = 500) -> list[str]:
    """Delete expired assets no unfinished job uses, blobs left without assets, and old keys;
    return the blob files to remove."""
    t = _iso(now)
    conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (t,))
    hashes = [
        r[0]
        for r in conn.execute(
            "DELETE FROM assets WHERE id IN (SELECT a.id FROM assets a WHERE a.expires_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM job_assets ja JOIN jobs j ON j.id = ja.job_id"
            "   WHERE ja.asset_id = a.id AND j.state IN ('pending', 'running')) LIMIT ?)"
            " RETURNING hash",
            (t, limit),
        ).fetchall()
    ]
    paths = []
    for h in set(hashes):
        path = _drop_blob_if_unused(conn, h)
        if path is not None:
            paths.append(path)
    return paths


# --- the async face --------------------------------------------------------------------------


class SqliteAssets(AssetStore):
    """Assets, blobs and idempotency keys: writes through the store's writer, one-step reads."""

    def __init__(self, jobs: Any) -> None:
        self.jobs = jobs  # the SqliteStore: its writer, reads, clock and listeners
        self._rows: Rows = jobs._rows

    def _now(self) -> float:
        return float(self.jobs.clock.now())

    async def put_asset(
        self, blob: Blob, new: NewAsset, key: str | None = None
    ) -> tuple[AssetRecord, bool]:
        """Record a stored blob and mint an asset over it; ``(asset, blob_was_new)``."""
        result: tuple[AssetRecord, bool] = await self.jobs._write(
            put_asset, blob, new, self._now(), key
        )
        return result

    async def mint_from_hash(
        self, hash_: str, new: NewAsset, scope: str | None
    ) -> AssetRecord | None:
        """A new asset over bytes ``scope`` (None: anyone) already has; None when there are none."""
        rec: AssetRecord | None = await self.jobs._write(
            mint_from_hash, hash_, new, self._now(), scope
        )
        return rec

    async def delete_asset(self, asset_id: str, scope: str | None) -> tuple[str, str | None]:
        """Delete an uploaded asset of ``scope`` (None: anyone's): ``deleted`` (with a blob file
        to remove), ``missing`` or ``in_use``."""
        result: tuple[str, str | None] = await self.jobs._write(delete_asset, asset_id, scope)
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
        """Durably admit a job with its Idempotency-Key and the assets it uses (claimed at once
        by an idle preprocess worker, as ``JobStore.create`` does)."""
        now, ids = self._now(), list(asset_ids)

        async def plain() -> tuple[Job, Transition | None]:
            job, trs = await self.jobs._write(
                create_job_keyed, new, now, max_queue, owner, key, ids
            )
            return job, trs[0] if trs else None

        async def claimed(by: str, lease: float, message: str) -> tuple[Job, list[Transition]]:
            result: tuple[Job, list[Transition]] = await self.jobs._write(
                create_job_keyed, new, now, max_queue, owner, key, ids, (by, lease, message)
            )
            return result

        job, _ = await self.jobs._admitting(plain, claimed)
        assert isinstance(job, Job)
        return job

    async def prune_assets(self) -> list[str]:
        """Remove expired assets and keys; the blob files to delete."""
        paths: list[str] = await self.jobs._write(prune_assets, self._now())
        return paths

    async def asset(self, asset_id: str) -> AssetRecord | None:
        """An uploaded asset or a job's output, by id."""
        rows = await self._rows(f"{_ASSET_SQL} WHERE a.id = ?", (asset_id,))
        if rows:
            return asset_record(rows[0])
        rows = await self._rows(f"{_OUTPUT_SQL} WHERE asset_id = ?", (asset_id,))
        return output_asset(rows[0]) if rows else None

    async def assets(self, ids: Sequence[str]) -> dict[str, AssetRecord]:
        """Uploaded assets by id (those that exist)."""
        if not ids:
            return {}
        rows = await self._rows(
            f"{_ASSET_SQL} WHERE a.id IN ({','.join('?' * len(ids))})", list(ids)
        )
        return {r["id"]: asset_record(r) for r in rows}

    async def blob_for(self, hash_: str, scope: str | None) -> Blob | None:
        """The blob with this hash, when ``scope`` (an owner; None: anyone) has an asset over it."""
        rows = await self._rows(
            "SELECT b.hash, b.size_bytes, b.path FROM blobs b WHERE b.hash = ? AND EXISTS"
            " (SELECT 1 FROM assets a WHERE a.hash = b.hash AND (? IS NULL OR a.owner = ?))",
            (hash_, scope, scope),
        )
        return Blob(rows[0]["hash"], rows[0]["size_bytes"], rows[0]["path"]) if rows else None

    async def blob(self, hash_: str) -> Blob | None:
        """The blob with this hash, whoever holds it (dedup of uploads)."""
        rows = await self._rows("SELECT hash, size_bytes, path FROM blobs WHERE hash = ?", (hash_,))
        return Blob(rows[0]["hash"], rows[0]["size_bytes"], rows[0]["path"]) if rows else None

    async def job_outputs(self, job_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Output rows (with asset id and blake3) of some jobs, in the order they were recorded."""
        out: dict[str, list[dict[str, Any]]] = {}
        if job_ids:
            marks = ",".join("?" * len(job_ids))
            sql = f"SELECT * FROM outputs WHERE job_id IN ({marks}) ORDER BY id"
            for r in await self._rows(sql, list(job_ids)):
                out.setdefault(r["job_id"], []).append(dict(r))
        return out
