"""Input files sent as ``multipart/form-data``: streamed to disk while they arrive (never held
whole), hashed, size-capped (413) and typed by their bytes with libmagic (415 for a type comfyq
does not accept), the same checks as URL and base64 inputs.

A stored upload is referred to as ``upload:<token>_<sha256><ext>`` wherever an ``input.images``
entry takes base64 or a URL; the preprocess stage resolves it from the cache folder. The token is
an HMAC of the content under a key kept beside the cache, so a reference cannot be made up from a
file's hash by someone who never uploaded it, while the same bytes sent again get the same
reference (a repeated request with the same ``request_id`` is the same job, not a conflict).

Shared helper: ``receive_part`` streams one aiohttp multipart part; any route may use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import BodyPartReader

from comfyq.errors import InputError, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from comfyq.inputs.filetypes import (
    SNIFF_BYTES,
    Asset,
    extension_for,
    sniff_type,
    type_allowed,
)
from comfyq.inputs.storage import PARTIAL_DIR

PREFIX = "upload:"
CHUNK = 256 * 1024
_REF = re.compile(r"upload:([0-9a-f]{32})_([0-9a-f]{64})(\.[a-z0-9]{1,12})")
# In a subfolder: the cache prune deletes old files of the cache folder itself, never this key.
_KEY_FILE = Path(".keys") / "upload"


@dataclass(frozen=True)
class Received:
    """One stored upload: the form field it came in, its reference and the stored file."""

    field: str
    filename: str
    ref: str
    asset: Asset
    fresh: bool  # False when the same bytes were already stored (maybe for another job)


def is_ref(value: object) -> bool:
    """Whether ``value`` is an upload reference (``upload:...``)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def _key(cache_dir: Path) -> bytes:
    path = cache_dir / _KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()  # another process made it first
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


def _token(cache_dir: Path, sha: str) -> str:
    return hmac.new(_key(cache_dir), sha.encode(), hashlib.sha256).hexdigest()[:32]


def _stored_path(cache_dir: Path, token: str, sha: str, ext: str) -> Path:
    return cache_dir / f"up_{token}_{sha}{ext}"


async def receive_part(
    part: BodyPartReader,
    cache_dir: Path,
    *,
    max_bytes: int,
    allowed: Iterable[str],
    path: str,
    idle_timeout: float = 60.0,
    setting: str = "max_body_bytes",
) -> Received:
    """Stream ``part`` into ``cache_dir``; 413 over ``max_bytes``, 415 for a refused type, 408
    when no byte arrives for ``idle_timeout`` seconds."""
    partial = cache_dir / PARTIAL_DIR
    await asyncio.to_thread(partial.mkdir, parents=True, exist_ok=True)
    tmp = partial / f"{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    size, mime, head = 0, "", bytearray()
    allowed = frozenset(allowed)
    try:
        with open(tmp, "wb") as f:  # noqa: ASYNC230 - writes go to a thread below
            while True:
                try:
                    async with asyncio.timeout(idle_timeout):
                        chunk = await part.read_chunk(CHUNK)
                except TimeoutError:
                    raise RequestTimeout(
                        f"{path}: no data for {idle_timeout:g}s (setting http_body_timeout)",
                        details={"limit": idle_timeout, "setting": "http_body_timeout"},
                    ) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(
                        f"{path}: the file is over the {max_bytes} byte limit (setting {setting})",
                        details={"limit": max_bytes, "setting": setting},
                        fields=[{"path": path, "message": f"over {max_bytes} bytes"}],
                    )
                if not mime:
                    head += chunk
                    if len(head) >= SNIFF_BYTES:
                        mime = await _check(bytes(head[:SNIFF_BYTES]), allowed, path)
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
        if size == 0:
            raise InputError(
                f"{path}: the file is empty", fields=[{"path": path, "message": "empty"}]
            )
        if not mime:
            mime = await _check(bytes(head), allowed, path)
        sha = digest.hexdigest()
        ext = extension_for(mime)
        token = await asyncio.to_thread(_token, cache_dir, sha)
        final = _stored_path(cache_dir, token, sha, ext)
        fresh = not await asyncio.to_thread(final.exists)
        await asyncio.to_thread(os.replace, tmp, final)
    except BaseException:
        await asyncio.to_thread(_unlink, tmp)
        raise
    return Received(
        field=part.name or "",
        filename=part.filename or "",
        ref=f"{PREFIX}{token}_{sha}{ext}",
        asset=Asset(final, sha, mime, ext, size),
        fresh=fresh,
    )


async def _check(head: bytes, allowed: frozenset[str], path: str) -> str:
    mime = await asyncio.to_thread(sniff_type, head)
    if not type_allowed(mime, allowed):
        message = (
            f"{path}: the file is {mime}, which is not an accepted input type"
            " (images, video, audio, text, safetensors/GGUF models)"
        )
        raise UnsupportedMediaType(
            message, details={"mimetype": mime}, fields=[{"path": path, "message": message}]
        )
    return mime


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def resolve(ref: str, cache_dir: Path) -> Asset:
    """The stored file of an upload reference (blocking: run it in a thread)."""
    m = _REF.fullmatch(ref)
    if m is None:
        raise InputError("not a valid upload reference")
    token, sha, ext = m.groups()
    if not hmac.compare_digest(token, _token(cache_dir, sha)):
        raise InputError("unknown upload reference")
    path = _stored_path(cache_dir, token, sha, ext)
    try:
        size = path.stat().st_size
        os.utime(path)  # in use: keep it from the cache prune
        with open(path, "rb") as f:
            mime = sniff_type(f.read(SNIFF_BYTES))
    except FileNotFoundError:
        raise InputError("the uploaded file is no longer stored (pruned); send it again") from None
    return Asset(path, sha, mime, ext, size)


async def discard(received: Iterable[Received]) -> None:
    """Remove stored uploads (a request that failed after storing them)."""
    for r in received:
        if r.fresh:
            await asyncio.to_thread(_unlink, r.asset.path)
