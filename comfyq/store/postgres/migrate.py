"""PostgreSQL schema migrations: the numbered files in ``migrations/postgres/``, applied in order
in one transaction under an advisory lock (instances starting together take turns; the second
finds everything applied), each recorded with its checksum in ``schema_migrations``."""

from __future__ import annotations

from pathlib import Path

from comfyq.clock import Clock, iso
from comfyq.store.base import MigrationError
from comfyq.store.migrations import Migration, load, migrations_root
from comfyq.store.postgres.connect import Conn

# pg_advisory_xact_lock key of the migrations ("cq" "mg" as two 16-bit halves; any fixed number).
MIGRATION_LOCK = 0x6371_6D67


def migrations_dir() -> Path:
    return migrations_root() / "postgres"


def files(directory: Path | None = None) -> list[Migration]:
    """Every PostgreSQL migration file, in version order."""
    return load(directory or migrations_dir())


async def apply(
    conn: Conn, *, clock: Clock | None = None, directory: Path | None = None
) -> list[int]:
    """Apply every pending migration; return the versions applied (none when up to date)."""
    clock = clock or Clock()
    wanted = files(directory)
    known = {m.version for m in wanted}
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
            " name text NOT NULL, checksum text NOT NULL, applied_at timestamptz NOT NULL)"
        )
        cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
        done = {row["version"]: row["checksum"] for row in await cur.fetchall()}
        newer = sorted(v for v in done if v not in known)
        if newer:
            raise MigrationError(
                f"database has migration {newer[-1]}, which this comfyq does not know"
                " (a database of a newer comfyq?)"
            )
        applied = []
        for m in wanted:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise MigrationError(
                        f"migration postgres/{m.version:04d}_{m.name}.sql was edited after it"
                        " was applied"
                    )
                continue
            # No parameters: the script goes as one simple query (several statements, $$ bodies).
            await conn.execute(m.sql.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at)"
                " VALUES (%s, %s, %s, %s)",
                (m.version, m.name, m.checksum, iso(clock.now())),
            )
            applied.append(m.version)
    return applied
