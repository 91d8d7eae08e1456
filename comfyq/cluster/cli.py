"""``comfyq instances``: the instances registered on the store, alive or not."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from comfyq.config import Settings

COLUMNS = ["name", "alive", "heartbeat_age", "roles", "url", "backends", "id"]


async def registered(settings: Settings) -> list[dict[str, Any]]:
    """Every instance of the store the settings name, most recently heard first."""
    db = settings.database
    if db.startswith(("postgresql://", "postgres://")):
        import psycopg

        from comfyq.cluster.pg import PgLink

        link = PgLink(db, app_name="comfyq-cli")
        try:
            return [i.as_dict(settings.instance_heartbeat) for i in await link.instances()]
        except psycopg.errors.UndefinedTable:
            return []  # no instance ever started on this database
        finally:
            await link.close_connection()
    return _sqlite_holder(Path(db))


def _sqlite_holder(db: Path) -> list[dict[str, Any]]:
    # A SQLite file has one server at most: the process holding its lock file.
    lock = db.with_name(db.name + ".lock")
    if not lock.exists():
        return []
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 64).decode(errors="replace").strip()
            return [
                {
                    "name": f"{os.uname().nodename} (pid {pid})",
                    "alive": True,
                    "heartbeat_age": 0.0,
                    "roles": ["all"],
                    "url": "",
                    "backends": [],
                    "id": f"pid {pid}",
                }
            ]
        fcntl.flock(fd, fcntl.LOCK_UN)
        return []
    finally:
        os.close(fd)


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no instance registered"
    shown = [
        {
            **r,
            "alive": "yes" if r["alive"] else ("stopped" if r.get("stopped") else "no"),
            "heartbeat_age": f"{r['heartbeat_age']:.1f}s",
            "roles": ",".join(r["roles"]),
            "backends": ",".join(r["backends"]),
        }
        for r in rows
    ]
    widths = {c: max(len(c), *(len(str(r[c])) for r in shown)) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in shown]
    return "\n".join(lines)


def main(settings: Settings, as_json: bool) -> int:
    rows = asyncio.run(registered(settings))
    print(json.dumps(rows, indent=2) if as_json else render(rows))
    return 0
