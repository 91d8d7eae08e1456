"""The PostgreSQL adapter: many comfyq instances on one database (psycopg 3 and its pool)."""

from comfyq.store.postgres.store import PostgresStore

__all__ = ["PostgresStore"]
