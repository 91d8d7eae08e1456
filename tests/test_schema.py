"""The migrations, applied in order, build exactly the intended schema."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from comfyq.store.sqlite import migrate
from comfyq.store.sqlite.writer import connect

EXPECTED = Path(__file__).with_name("expected_schema.sql")


def dump(conn: sqlite3.Connection) -> str:
    rows = conn.execute(
        "SELECT type, name,"
        " sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    ).fetchall()
    return "\n\n".join(f"-- {t} {n}\n{sql};" for t, n, sql in rows) + "\n"


def test_migrations_build_the_expected_schema(tmp_path: Path) -> None:
    conn = connect(tmp_path / "s.db")
    assert migrate.apply(conn) == [m.version for m in migrate.load()]
    got = dump(conn)
    if not EXPECTED.exists():  # first run after adding a migration: write it, review it, commit it
        EXPECTED.write_text(got)
    assert got == EXPECTED.read_text(), "schema differs from tests/expected_schema.sql"
    # Pragmas that make the file crash-safe.
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migrations_are_idempotent_and_recorded(tmp_path: Path) -> None:
    conn = connect(tmp_path / "s.db")
    migrate.apply(conn)
    assert migrate.apply(conn) == []
    rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert [tuple(r) for r in rows] == [(m.version, m.name) for m in migrate.load()]


def test_an_edited_migration_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), copy)
    conn = connect(tmp_path / "s.db")
    migrate.apply(conn, directory=copy)
    first = min(copy.glob("*.sql"))
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(migrate.MigrationError, match="edited"):
        migrate.apply(conn, directory=copy)


def test_state_checks_hold(tmp_path: Path) -> None:
    conn = connect(tmp_path / "s.db")
    migrate.apply(conn)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO jobs (id, state, payload, payload_hash, run_after,"
            " deadline_at, created_at,"
            " updated_at, stage_entered_at) VALUES ('x', 'exploded', '{}', 'h', 'a',"
            " 'b', 'c', 'd', 'e')"
        )
    with pytest.raises(sqlite3.IntegrityError):  # running without a lease
        conn.execute(
            "INSERT INTO jobs (id, state, payload, payload_hash, run_after,"
            " deadline_at, created_at,"
            " updated_at, stage_entered_at) VALUES ('x', 'running', '{}', 'h', 'a',"
            " 'b', 'c', 'd', 'e')"
        )
