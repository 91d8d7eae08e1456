"""Both store adapters for the contract suite: SQLite files and a real PostgreSQL server.

The server is ``COMFYQ_TEST_POSTGRES`` (a URL) when set, else the local one at 127.0.0.1:5432;
when neither answers, a throwaway cluster is started from Debian's ``postgresql`` binaries for the
session. Each test run gets a database of its own (dropped at the end), each test a fresh schema
in it (the URL's search_path), so tests never see each other's rows.

Postgres tests skip when no server can be had, unless ``COMFYQ_REQUIRE_POSTGRES=1`` (CI) turns the
skip into a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from comfyq.clock import Clock, ManualClock
from comfyq.store import JobStore, open_store
from comfyq.store.postgres import PostgresStore
from comfyq.store.postgres.connect import IsoInstantLoader, JsonTextLoader
from comfyq.store.sqlite import SqliteStore

ENGINES = ["sqlite", "postgres"]
LOCAL = "postgresql://root@127.0.0.1:5432/postgres"


def _unavailable(reason: str) -> None:
    if os.environ.get("COMFYQ_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (COMFYQ_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"no PostgreSQL: {reason}")


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A PostgreSQL cluster of our own in a temporary folder (trust auth, loopback, no fsync)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql)")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="comfyq-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        pwd.getpwnam("postgres")
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"
    try:
        subprocess.run(
            [
                *run_as,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *run_as,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                str(root / "log"),
                "-o",
                f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A URL of a PostgreSQL server the tests may create databases on."""
    configured = os.environ.get("COMFYQ_TEST_POSTGRES")
    if configured:
        if not _answers(configured):
            _unavailable(f"COMFYQ_TEST_POSTGRES ({configured}) does not answer")
        yield configured
        return
    if _answers(LOCAL):
        yield LOCAL
        return
    try:
        cluster = throwaway_cluster()
        url = cluster.__enter__()
    except (RuntimeError, KeyError, OSError, subprocess.CalledProcessError) as exc:
        _unavailable(f"nothing answers at {LOCAL} and no cluster could be started ({exc})")
        return
    try:
        yield url
    finally:
        cluster.__exit__(None, None, None)


def _url(server: str, dbname: str, schema: str | None = None) -> str:
    parts = conninfo_to_dict(server)
    user = quote(str(parts.get("user") or "postgres"))
    password = parts.get("password")
    auth = f"{user}:{quote(str(password))}" if password else user
    host, port = parts.get("host") or "127.0.0.1", parts.get("port") or 5432
    url = f"postgresql://{auth}@{host}:{port}/{dbname}"
    if schema:
        url += "?options=" + quote(f"-c search_path={schema}")
    return url


@pytest.fixture(scope="session")
def pg_database(pg_server: str) -> Iterator[str]:
    """A database of this test run's own (a unique name), dropped when the run ends."""
    name = f"comfyq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _url(pg_server, name)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A postgresql:// URL whose search_path is a fresh, empty schema of its own."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _url(pg_database, pg_database.rsplit("/", 1)[1], schema)
    finally:
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


StoreFactory = Callable[..., JobStore]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The database setting of one test on the engine under test: a file or a URL."""
    if engine == "sqlite":
        return str(tmp_path / "q.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def make_store(database: str) -> AsyncIterator[StoreFactory]:
    """``make_store(clock=..., owner=...)``: an unopened store on the test's database (several
    stores on one database are several processes/instances); all are closed at the end."""
    made: list[JobStore] = []

    def make(*, clock: Clock | None = None, owner: str = "") -> JobStore:
        s = open_store(database, clock=clock, owner=owner)
        made.append(s)
        return s

    yield make
    for s in made:
        with contextlib.suppress(Exception):
            await s.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[JobStore]:
    """An open store with a manual clock, lease owner ``w1``, on each engine."""
    s = make_store(clock=ManualClock(), owner="w1")
    await s.open()
    yield s


def raw(store: JobStore, sql: str) -> list[tuple[Any, ...]]:
    """What an operator's shell (sqlite3 or psql) shows for ``sql``, on the store's database;
    database errors propagate as the engine's own (sqlite3.Error, psycopg.Error)."""
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store.path, isolation_level=None)
        try:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
        finally:
            conn.close()
    assert isinstance(store, PostgresStore)
    with psycopg.connect(store.url, autocommit=True) as pg:
        cur = pg.execute(sql.encode())
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


def rows(store: JobStore, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows as dicts, in the adapter's own shapes (instants and JSON as text); ``?`` marks."""
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store.path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        finally:
            conn.close()
    assert isinstance(store, PostgresStore)
    with psycopg.connect(store.url, autocommit=True, row_factory=dict_row) as pg:
        pg.adapters.register_loader("timestamptz", IsoInstantLoader)
        pg.adapters.register_loader("json", JsonTextLoader)
        pg.adapters.register_loader("jsonb", JsonTextLoader)
        pg.execute("SET TimeZone = 'UTC'")
        cur = pg.execute(sql.replace("?", "%s").encode(), params)
        return list(cur.fetchall())


DB_ERRORS = (sqlite3.Error, psycopg.Error)
