"""The PostgreSQL migrations, applied in order, build exactly the intended schema; instances that
start together apply them once; an edited or unknown migration is refused."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import psycopg
import pytest

from comfyq.store import open_store
from comfyq.store.base import MigrationError
from comfyq.store.postgres import migrate
from comfyq.store.postgres.connect import connect_once

EXPECTED = Path(__file__).with_name("expected_schema_postgres.txt")

_DUMP = [
    (
        "column",
        (
            "SELECT table_name || '.' || column_name, data_type || CASE is_nullable WHEN 'NO'"
            " THEN ' NOT NULL' ELSE '' END || coalesce(' DEFAULT ' || column_default, '')"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
        ),
    ),
    (
        "constraint",
        (
            "SELECT conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE connamespace = current_schema()::regnamespace"
        ),
    ),
    ("index", "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"),
    (
        "trigger",
        (
            "SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c"
            " ON c.oid = t.tgrelid WHERE NOT tgisinternal"
            " AND c.relnamespace = current_schema()::regnamespace"
        ),
    ),
    (
        "view",
        (
            "SELECT table_name, view_definition FROM information_schema.views"
            " WHERE table_schema = current_schema()"
        ),
    ),
    (
        "function",
        "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = current_schema()::regnamespace",
    ),
]


def dump(url: str) -> str:
    """The schema as text, with the test's own schema name taken out."""
    out = []
    with psycopg.connect(url) as conn:
        (schema,) = conn.execute("SELECT current_schema()").fetchone() or ("",)
        for kind, sql in _DUMP:
            for name, definition in sorted(conn.execute(sql.encode()).fetchall()):
                text = " ".join(str(definition).split()).replace(f"{schema}.", "")
                out.append(f"-- {kind} {name}\n{text}\n")
    return "\n".join(out)


async def test_migrations_build_the_expected_schema(pg_url: str) -> None:
    store = open_store(pg_url)
    assert await store.migrate() == [m.version for m in migrate.files()]
    got = dump(pg_url)
    if not EXPECTED.exists():  # first run after adding a migration: write it, review it, commit it
        EXPECTED.write_text(got)
    assert got == EXPECTED.read_text(), "schema differs from tests/expected_schema_postgres.txt"
    assert await store.migrate() == []


async def test_instances_starting_together_migrate_once(pg_url: str) -> None:
    stores = [open_store(pg_url, owner=f"i{i}") for i in range(4)]
    applied = await asyncio.gather(*(s.migrate() for s in stores))
    assert sorted(applied, key=len) == [[], [], [], [m.version for m in migrate.files()]]
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(m.version, m.checksum) for m in migrate.files()]


async def test_an_edited_migration_is_refused(pg_url: str, tmp_path: Path) -> None:
    edited = tmp_path / "postgres"
    shutil.copytree(migrate.migrations_dir(), edited)
    conn = await connect_once(pg_url)
    try:
        await migrate.apply(conn, directory=edited)
        first = min(edited.glob("0001_*.sql"))
        first.write_text(first.read_text() + "\n-- an afterthought\n")
        with pytest.raises(MigrationError, match="was edited"):
            await migrate.apply(conn, directory=edited)
    finally:
        await conn.close()
