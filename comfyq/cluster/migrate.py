"""The cluster's own tables on Postgres (``migrations/postgres_cluster``), applied at start.

Numbered SQL files recorded with checksums in ``cluster_migrations``, applied in one transaction
under an advisory lock, so instances that start together do not race; a database that has a
cluster migration this comfyq does not know is refused (it was written by a newer one).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import psycopg

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_KEY = 0x636F6D667971  # "comfyq": the same advisory lock key for every cluster migration


class ClusterMigrationError(Exception):
    """The database and the cluster migration files disagree."""


def migrations_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "migrations" / "postgres_cluster"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "comfyq" / "migrations" / "postgres_cluster"


def load(directory: Path | None = None) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every file, in order; versions 1..n without gaps."""
    out = []
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise ClusterMigrationError(f"cluster migration {path.name} is not named NNNN_name.sql")
        out.append((int(m.group(1)), m.group(2), path.read_text()))
    if [v for v, _, _ in out] != list(range(1, len(out) + 1)):
        raise ClusterMigrationError("cluster migration versions must be 1..n without gaps")
    return out


async def apply_cluster_migrations(
    conn: psycopg.AsyncConnection[Any], directory: Path | None = None
) -> list[int]:
    """Apply pending cluster migrations; return the versions applied."""
    files = load(directory)
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS cluster_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL"
            " DEFAULT now())"
        )
        cur = await conn.execute("SELECT version, checksum FROM cluster_migrations")
        done = {_version_of(r): _checksum_of(r) for r in await cur.fetchall()}
        known = {v for v, _, _ in files}
        newer = sorted(set(done) - known)
        if newer:
            raise ClusterMigrationError(
                f"database has cluster migration {newer[0]}, which this comfyq does not know"
                " (written by a newer comfyq?)"
            )
        for version, name, sql in files:
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if version in done:
                if done[version] != checksum:
                    raise ClusterMigrationError(
                        f"cluster migration {version:04d}_{name}.sql was edited after it was"
                        " applied"
                    )
                continue
            await conn.execute(sql.encode())
            await conn.execute(
                "INSERT INTO cluster_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (version, name, checksum),
            )
            applied.append(version)
    return applied


async def migrate_url(url: str) -> list[int]:
    """``comfyq migrate``: apply the cluster migrations on the database at ``url``."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await apply_cluster_migrations(conn)


def _checksum_of(row: Any) -> str:
    return str(row[1] if isinstance(row, tuple) else row["checksum"])


def _version_of(row: Any) -> int:
    return int(row[0] if isinstance(row, tuple) else row["version"])
