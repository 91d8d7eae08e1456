"""Who is asking, and which jobs they may see: API keys with a role, and job ownership.

A key is ``admin`` or ``client``. Admin keys see and act on every job and reach the operator
surfaces (``/metrics``, the dashboard's queue and backends panel). Client keys see, stream, cancel
and download only the jobs they created; any other job answers 404 exactly as a job that does not
exist would, so a client cannot learn other clients' ids.

A job records who created it in ``jobs.owner``: the key's *id*, a short hash of the key, never the
key itself (so a database dump leaks no credential, and the id stays stable across restarts and
reloads).

Key syntax, in ``COMFYQ_API_KEYS`` (comma separated) and in ``COMFYQ_API_KEYS_FILE`` (one per line,
``#`` comments and blank lines ignored): ``KEY`` or ``ROLE:KEY`` with ROLE ``admin`` or ``client``.
A key without a role is **admin**: before roles existed every key saw everything, and existing
deployments must not lose access when they upgrade. The file is read again on SIGHUP; a file that
cannot be read leaves the keys in force unchanged.

With no keys at all, authentication is off and every request is the anonymous admin.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

log = logging.getLogger("comfyq.auth")

Role = Literal["admin", "client"]
ROLES: tuple[Role, ...] = ("admin", "client")


def key_id(key: str) -> str:
    """The stable, non-secret id of a key: ``k_`` and 16 hex digits of its SHA-256."""
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: the id of its key (None without authentication) and its role."""

    key_id: str | None
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner(self) -> str | None:
        """What a job created by this caller records in ``jobs.owner``."""
        return self.key_id

    def can_see(self, owner: str | None) -> bool:
        """Whether a job whose ``owner`` column holds ``owner`` is visible to this caller."""
        return self.is_admin or (owner is not None and owner == self.key_id)

    def visible_owners(self) -> list[str] | None:
        """The ``jobs.owner`` values of the jobs this caller may see; None: every job."""
        if self.is_admin:
            return None
        return [] if self.key_id is None else [self.key_id]


# Authentication off: everyone is the operator. NOBODY: a request the middleware let through
# without a key (public routes); it sees no job.
ANONYMOUS = Principal(None, "admin")
_PRINCIPAL = web.RequestKey("principal", Principal)
NOBODY = Principal(None, "client")


class KeyFileError(ValueError):
    """A key line that cannot be used; the message says which and why (never the key)."""


def parse_key(text: str, where: str) -> tuple[str, Role] | None:
    """``KEY`` or ``ROLE:KEY`` as (key, role); None for blank lines and comments."""
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    head, sep, rest = text.partition(":")
    if sep and head.strip().lower() in ROLES:
        key = rest.strip()
        if not key:
            raise KeyFileError(f"{where}: role {head.strip()!r} without a key")
        role: Role = "admin" if head.strip().lower() == "admin" else "client"
        return key, role
    return text, "admin"


@dataclass(frozen=True)
class KeySet:
    """The keys in force, each with its principal."""

    keys: tuple[tuple[bytes, Principal], ...]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def principal(self, token: str | None) -> Principal | None:
        """The principal of ``token`` (constant time over every key), or None for a wrong one."""
        if token is None:
            return None
        raw = token.encode()
        found: Principal | None = None
        for key, who in self.keys:
            if hmac.compare_digest(raw, key) and found is None:
                found = who
        return found


def build_keyset(entries: Iterable[tuple[str, Role]]) -> KeySet:
    """A KeySet from (key, role) pairs; a key listed twice keeps its first role."""
    seen: dict[str, Principal] = {}
    for key, role in entries:
        seen.setdefault(key, Principal(key_id(key), role))
    return KeySet(tuple((k.encode(), p) for k, p in seen.items()))


def read_keys_file(path: Path) -> list[tuple[str, Role]]:
    """Every key in a keys file; KeyFileError or OSError when it cannot be used."""
    out = []
    text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        parsed = parse_key(line, f"{path}:{n}")
        if parsed is not None:
            out.append(parsed)
    return out


class Keys:
    """The key set in force: from the settings' list and file; ``reload()`` re-reads the file."""

    def __init__(self, env_keys: Iterable[str], file: str = "") -> None:
        self._env: list[tuple[str, Role]] = []
        for i, text in enumerate(env_keys):
            parsed = parse_key(text, f"api_keys[{i}]")
            if parsed is not None:
                self._env.append(parsed)
        self.file = Path(file) if file else None
        self.current = build_keyset(self._env + (read_keys_file(self.file) if self.file else []))

    @property
    def enabled(self) -> bool:
        return self.current.enabled

    def reload(self) -> bool:
        """Read the keys file again; on failure keep the keys in force and log why. True if
        reloaded."""
        if self.file is None:
            return False
        try:
            from_file = read_keys_file(self.file)
        except (OSError, UnicodeDecodeError, KeyFileError) as exc:
            log.error("API keys file not reloaded, the previous keys stay in force: %s", exc)
            return False
        self.current = build_keyset(self._env + from_file)
        log.info("API keys reloaded from %s: %d keys", self.file, len(self.current.keys))
        return True

    def principal(self, token: str | None) -> Principal | None:
        """The caller for ``token``: ANONYMOUS when authentication is off, None for a wrong key."""
        if not self.current.enabled:
            return ANONYMOUS
        return self.current.principal(token)


def set_principal(request: web.Request, who: Principal) -> None:
    request[_PRINCIPAL] = who


def principal(request: web.Request) -> Principal:
    """The caller of ``request``, as the auth middleware found it (NOBODY if it set none)."""
    who = request.get(_PRINCIPAL)
    return who if isinstance(who, Principal) else NOBODY


def visible(request: web.Request, owner: str | None) -> bool:
    """Whether the caller of ``request`` may see a job owned by ``owner``."""
    return principal(request).can_see(owner)


def require_admin(request: web.Request) -> None:
    """403 for client keys: operator-only surfaces (metrics, queue and backends)."""
    from comfyq.errors import Forbidden

    if not principal(request).is_admin:
        raise Forbidden("this needs an admin API key")
