"""SQLite schema migrations: numbered SQL files in ``migrations/``, applied in order, recorded
in a table.

A landed file is never edited; a change to the schema is a new file. The runner refuses to start
when a recorded migration's checksum no longer matches its file, so an edited one is caught.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from comfyq.clock import Clock, iso
from comfyq.store.base import MigrationError
from comfyq.store.migrations import Migration, migrations_root
from comfyq.store.migrations import load as load_dir

__all__ = ["Migration", "MigrationError", "apply", "load", "migrations_dir"]


def load(directory: Path | None = None) -> list[Migration]:
    """Every SQLite migration file, in version order."""
    return load_dir(directory or migrations_dir())


def migrations_dir() -> Path:
    """Where the SQLite files are: ``migrations/`` of the source tree or of the installed data."""
    return migrations_root()


def apply(
    conn: sqlite3.Connection, *, clock: Clock | None = None, directory: Path | None = None
) -> list[int]:
    """Apply every pending migration, each in its own transaction; return the versions applied."""
    clock = clock or Clock()
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
        " applied_at TEXT NOT NULL) STRICT"
    )
    done = {
        row[0]: row[1]
        for row in conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    }
    files = load(directory)
    known = {m.version for m in files}
    for version in done:
        if version not in known:
            raise MigrationError(
                f"database has migration {version},"
                " which this comfyq does not know (newer database?)"
            )
    applied = []
    for m in files:
        if m.version in done:
            if done[m.version] != m.checksum:
                raise MigrationError(
                    f"migration {m.version:04d}_{m.name}.sql was edited after it was applied"
                )
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # executescript would commit on its own; run statement by statement instead.
            for stmt in _statements(m.sql):
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at)"
                " VALUES (?, ?, ?, ?)",
                (m.version, m.name, m.checksum, iso(clock.now())),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(m.version)
    return applied


def _statements(sql: str) -> list[str]:
    """Split a script into complete statements (triggers contain inner semicolons)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf)
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise MigrationError("migration ends with an incomplete statement")
    return out
