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


def test_version_5_keeps_the_rules_of_a_database_with_jobs(tmp_path: Path) -> None:
    """0005 rewrites the jobs table's CHECK text in place (writable_schema) and merges the state
    triggers: a database made by 0001-0004 with jobs in it migrates, stays intact, and refuses
    and counts what it did before."""
    older = tmp_path / "older"
    older.mkdir()
    for f in migrate.migrations_dir().glob("*.sql"):
        if int(f.name[:4]) < 5:
            shutil.copy(f, older / f.name)
    conn = connect(tmp_path / "s.db")
    migrate.apply(conn, directory=older)
    cols = "id, state, payload, payload_hash, run_after, deadline_at, created_at, updated_at,"
    cols += " stage_entered_at"
    rest = "'{}', 'h', 'r', 'd', 'c', 'u', 's'"
    for job_id in ("a", "b"):
        conn.execute(
            f"INSERT INTO jobs ({cols}) VALUES (?, 'pending', {rest})",
            (job_id,),
        )
    assert migrate.apply(conn) == [5]
    conn.close()
    conn = connect(tmp_path / "s.db")  # a fresh connection reads the rewritten schema
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT unfinished FROM queue_stats").fetchone()[0] == 2
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(f"INSERT INTO jobs ({cols}) VALUES ('x', 'exploded', {rest})")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE jobs SET stage = 'elsewhere' WHERE id = 'a'")
    with pytest.raises(sqlite3.IntegrityError):  # finished without finished_at
        conn.execute("UPDATE jobs SET state = 'cancelled' WHERE id = 'a'")
    with pytest.raises(sqlite3.IntegrityError, match="illegal job transition"):
        conn.execute("UPDATE jobs SET state = 'completed', finished_at = 'f' WHERE id = 'a'")
    conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = 'f' WHERE id = 'a'")
    assert conn.execute("SELECT unfinished FROM queue_stats").fetchone()[0] == 1
    conn.execute("UPDATE jobs SET state = 'pending', finished_at = NULL WHERE id = 'a'")
    assert conn.execute("SELECT unfinished FROM queue_stats").fetchone()[0] == 2
