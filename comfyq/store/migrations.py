"""Numbered SQL migration files, shared by the adapters: each engine has its own folder of them.

A landed file is never edited; a change to the schema is a new file. Runners record each applied
file with its checksum and refuse to start when a recorded file was edited or is unknown (a
database of a newer comfyq).
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from comfyq.store.base import MigrationError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations_root() -> Path:
    """Where the SQL files are: ``migrations/`` of the source tree, or the installed data files.
    SQLite's are at its top, each other engine's in a folder of its own (``postgres/``)."""
    here = Path(__file__).resolve().parents[2] / "migrations"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "comfyq" / "migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(directory: Path) -> list[Migration]:
    """Every migration file of one folder, in version order."""
    out = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        out.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in out]
    # Gaps are allowed: numbers are reserved per branch and may land in any order (a database
    # gets each missing file applied when it arrives). Duplicates are not.
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise MigrationError(f"migration versions must be distinct and >= 1, got {versions}")
    return out
