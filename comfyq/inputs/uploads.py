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
import binascii
import hashlib
import hmac
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader

from comfyq.errors import (
    BadRequest,
    InputError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from comfyq.fileio import fsync_dir
from comfyq.inputs.filetypes import (
    SNIFF_BYTES,
    Asset,
    extension_for,
    sniff_type,
    type_allowed,
)
from comfyq.inputs.storage import PARTIAL_DIR
from modifiers.basemodifier import looks_like_url

PREFIX = "upload:"
CHUNK = 256 * 1024
# Base64 inputs longer than this are spooled to a file at admission (``spool_inline``), so the
# job's row holds a short reference instead of megabytes that every transition rewrites.
SPOOL_ABOVE = 64 * 1024
# Characters of base64 decoded per step: each step (a few C calls) holds the GIL well under a
# millisecond, so a 16 MiB input never holds the event loop's thread off for longer (one
# b64decode of it held it ~40 ms).
SPOOL_STEP = 256 * 1024
_B64 = re.compile(r"[A-Za-z0-9+/]*")
_URLSAFE = str.maketrans("-_", "+/")
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


def _b64_payload(data: str) -> str | None:
    """The base64 text of a plain base64 string or a ``data:...;base64,`` URI; None for anything
    else (a percent-encoded data: URI stays inline: the preprocess stage decodes it)."""
    if data[:5].lower() != "data:":
        return data
    header, sep, payload = data[5:].partition(",")
    if sep and "base64" in (p.strip().lower() for p in header.split(";")):
        return payload
    return None


def spool_inline(
    data: str,
    cache_dir: Path,
    *,
    max_bytes: int,
    allowed: Iterable[str],
    step: int = SPOOL_STEP,
) -> Received | None:
    """Store a base64 input (plain or a data: URI) as an upload: the same rules as the preprocess
    stage's decoding (whitespace ignored, URL-safe alphabet and missing padding accepted, size
    limit, type sniffed and checked), decoded in slices of ``step`` characters straight to a file
    that is fsynced with its folder, so the reference is durable before the job that names it is.

    None when ``data`` is not base64 (left inline). ``InputError`` for bad base64, an input over
    ``max_bytes`` or a refused type. Blocking: run it in a thread."""
    payload = _b64_payload(data)
    if payload is None:
        return None
    payload = payload.rstrip()
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InputError(f"inline data is over the {max_bytes} byte limit")
    partial = cache_dir / PARTIAL_DIR
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    size, head, carry = 0, b"", ""
    try:
        with open(tmp, "wb") as f:
            end, at, last = len(payload), 0, False
            while not last:
                # The last slice holds at least the final 64 characters: the padding stays whole.
                last = at + step >= end - 64
                text = carry + "".join((payload[at:] if last else payload[at : at + step]).split())
                at += step
                if "-" in text or "_" in text:
                    text = text.translate(_URLSAFE)
                if last:  # as the preprocess stage: padded to whole groups, at most two "="
                    body = text.rstrip("=")
                    text += "=" * (-len(text) % 4)
                    if len(text) - len(body) > 2:
                        raise _not_base64()
                else:
                    cut = len(text) - len(text) % 4
                    text, carry = text[:cut], text[cut:]
                    body = text
                if not _B64.fullmatch(body):
                    raise _not_base64()
                try:
                    raw = binascii.a2b_base64(text)
                except binascii.Error:
                    raise _not_base64() from None
                size += len(raw)
                if size > max_bytes:
                    raise InputError(f"inline data is over the {max_bytes} byte limit")
                if len(head) < SNIFF_BYTES:
                    head += raw[: SNIFF_BYTES - len(head)]
                digest.update(raw)
                f.write(raw)
            if size == 0:
                raise InputError("inline data is empty")
            mime = sniff_type(head)
            if not type_allowed(mime, frozenset(allowed)):
                raise InputError(
                    f"inline data is {mime}, which is not an accepted input type "
                    "(images, video, audio, text, safetensors/GGUF models)",
                    details={"mimetype": mime},
                )
            f.flush()
            os.fsync(f.fileno())
        sha = digest.hexdigest()
        ext = extension_for(mime)
        token = _token(cache_dir, sha)
        final = _stored_path(cache_dir, token, sha, ext)
        fresh = not final.exists()
        os.replace(tmp, final)
        fsync_dir(cache_dir)
    except BaseException:
        _unlink(tmp)
        raise
    return Received(
        field="",
        filename="",
        ref=f"{PREFIX}{token}_{sha}{ext}",
        asset=Asset(final, sha, mime, ext, size),
        fresh=fresh,
    )


async def spool_images(
    images: list[Any], cache_dir: Path, *, max_bytes: int, allowed: Iterable[str]
) -> list[Received]:
    """Admission: every base64 ``input.images`` entry (an object with a mutable ``image``) over
    ``SPOOL_ABOVE`` characters is stored as an upload and replaced by its reference, one thread
    hop each. A bad one is a 400 naming ``$.input.images[i].image``; what was stored for this
    request is removed again then."""
    stored: list[Received] = []
    try:
        for i, img in enumerate(images):
            data = img.image
            if len(data) <= SPOOL_ABOVE or is_ref(data) or looks_like_url(data):
                continue
            try:
                got = await asyncio.to_thread(
                    spool_inline, data, cache_dir, max_bytes=max_bytes, allowed=allowed
                )
            except InputError as exc:
                path = f"$.input.images[{i}].image"
                raise BadRequest(
                    f"{path}: {exc.message}",
                    details=exc.details,
                    fields=[{"path": path, "message": exc.message}],
                ) from None
            if got is not None:
                img.image = got.ref
                stored.append(got)
    except BaseException:
        await discard(stored)
        raise
    return stored


def _not_base64() -> InputError:
    return InputError("inline data is neither valid base64 nor a data: URI")


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
