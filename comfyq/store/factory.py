"""Which adapter a database setting names: a ``postgresql://`` URL or a SQLite file path.

Above the interface and both adapters, so the interface (``base.py``) imports neither of them.
"""

from __future__ import annotations

import os

from comfyq.clock import Clock
from comfyq.store.base import JobStore, is_postgres_url


def open_store(
    database: str | os.PathLike[str],
    *,
    clock: Clock | None = None,
    owner: str = "",
    pool_size: int | None = None,
) -> JobStore:
    """The adapter the database setting names, not yet opened (``await store.open()``);
    ``pool_size``: the most connections a server adapter (Postgres) opens."""
    if pool_size is not None and is_postgres_url(database):
        from comfyq.store.postgres import PostgresStore

        return PostgresStore(database, clock=clock, owner=owner, pool_size=pool_size)
    return _adapter_for(database)(database, clock=clock, owner=owner)


def _adapter_for(database: str | os.PathLike[str]) -> type[JobStore]:
    if is_postgres_url(database):
        from comfyq.store.postgres import PostgresStore

        return PostgresStore
    from comfyq.store.sqlite import SqliteStore

    return SqliteStore
