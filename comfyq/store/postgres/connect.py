"""Connections to PostgreSQL: the pool, the type loaders, and the errors at the store's boundary.

Rows come back in the same shapes as from SQLite, so the shared model (``Job``, ``Transition``)
reads either: instants as ISO-8601 UTC text with microseconds (``clock.iso``), JSON as its text,
decoded where it is used.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from comfyq.errors import IllegalTransition
from comfyq.store.base import StoreUnavailable

T = TypeVar("T")
Conn = psycopg.AsyncConnection[DictRow]

# Every session speaks UTC, so instants come back as '2026-12-07 15:21:23.123456+00'.
SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO"


class IsoInstantLoader(Loader):
    """timestamptz -> '2026-12-07T15:21:23.123456Z', the text ``clock.iso`` writes."""

    def load(self, data: bytes | bytearray | memoryview) -> str:
        text = bytes(data).decode()
        day, rest = text[:10], text[11:]
        clock, _, frac = rest[:-3].partition(".")  # rest ends with the '+00' offset
        return f"{day}T{clock}.{frac.ljust(6, '0')}Z"


class JsonTextLoader(Loader):
    """json/jsonb -> the JSON text (decoded where used, as SQLite's TEXT columns are)."""

    def load(self, data: bytes | bytearray | memoryview) -> str:
        return bytes(data).decode()


async def configure(conn: Conn) -> None:
    """Per connection: the loaders above (rows in SQLite's shapes)."""
    conn.adapters.register_loader("timestamptz", IsoInstantLoader)
    conn.adapters.register_loader("json", JsonTextLoader)
    conn.adapters.register_loader("jsonb", JsonTextLoader)


def session_options(url: str) -> str:
    """The URL's own ``options`` (say a search_path: one schema per deployment) plus ours."""
    try:
        own = conninfo_to_dict(url).get("options") or ""
    except psycopg.ProgrammingError:
        own = ""
    return f"{own} {SESSION_OPTIONS}".strip()


def redact(url: str) -> str:
    """The URL without its password (for logs, /health and error messages)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


async def connect_once(url: str, timeout: float = 10.0) -> Conn:
    """One connection outside the pool (startup checks, migrations), errors as StoreUnavailable."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            row_factory=dict_row,
            options=session_options(url),
            connect_timeout=max(1, int(timeout)),
        )
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot connect to {redact(url)}: {one_line(exc)}") from None
    await configure(conn)
    return conn


def make_pool(
    url: str, *, min_size: int = 2, max_size: int = 16, app_name: str = "comfyq"
) -> AsyncConnectionPool[Conn]:
    # application_name is the instance id: the job_events NOTIFY trigger sends it as the origin,
    # so an instance skips its own state changes (already published) when they come back.
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "options": session_options(url),
            "application_name": app_name[:63],
        },
        configure=configure,
        open=False,
        timeout=10.0,
        max_lifetime=3600,
        name="comfyq",
    )


def one_line(exc: BaseException) -> str:
    """psycopg's message (often several lines with a DETAIL/HINT) as one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextlib.asynccontextmanager
async def wrapped(where: str) -> AsyncIterator[None]:
    """Database errors at the store's boundary: lost connections become StoreUnavailable, the
    schema's refusal of a transition IllegalTransition; our own errors pass through."""
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout, pg_errors.AdminShutdown) as exc:
        raise StoreUnavailable(f"{where}: {one_line(exc)}") from exc
    except pg_errors.CheckViolation as exc:
        raise IllegalTransition(one_line(exc)) from exc


Op = Callable[[Conn], Coroutine[Any, Any, T]]
