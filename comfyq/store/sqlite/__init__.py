"""The SQLite adapter: the queue, the job log and the outbox in one file, one writer thread."""

from comfyq.store.sqlite.store import FileLock, SqliteStore, open_migrated
from comfyq.store.sqlite.writer import connect

__all__ = ["FileLock", "SqliteStore", "connect", "open_migrated"]
