"""Cache-file helpers: inline decoding, hashing writes, touch, prune (blocking ones in threads)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from pathlib import Path
from urllib.parse import unquote_to_bytes

from comfyq.errors import InputError
from comfyq.fileio import remove_if_present
from comfyq.inputs.filetypes import SNIFF_BYTES, extension_for, sniff_type

PARTIAL_DIR = ".partial"


def decode_inline(data: str, max_bytes: int) -> bytes:
    """Decode base64 or a data: URI (blocking for big inputs: run it in a thread)."""
    payload, is_b64 = data, True
    if data[:5].lower() == "data:":
        header, sep, payload = data[5:].partition(",")
        if not sep:
            raise InputError("data: URI has no ',' before its data")
        is_b64 = "base64" in (p.strip().lower() for p in header.split(";"))
    if not is_b64:
        raw = unquote_to_bytes(payload)
    else:
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise InputError(f"inline data is over the {max_bytes} byte limit")
        compact = "".join(payload.split())
        if "-" in compact or "_" in compact:
            compact = compact.translate(str.maketrans("-_", "+/"))
        compact += "=" * (-len(compact) % 4)
        try:
            raw = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("inline data is neither valid base64 nor a data: URI") from None
    if len(raw) > max_bytes:
        raise InputError(f"inline data is over the {max_bytes} byte limit")
    return raw


def inline_candidate(data: str, max_bytes: int, cache_dir: Path) -> tuple[bytes, str, str, bool]:
    """Decode inline data; return bytes, type, sha256 and whether the cache already has it."""
    raw = decode_inline(data, max_bytes)
    if not raw:
        raise InputError("inline data is empty")
    mime = sniff_type(raw[:SNIFF_BYTES])
    sha = hashlib.sha256(raw).hexdigest()
    return raw, mime, sha, touch(cache_dir / f"{sha}{extension_for(mime)}")


def touch(path: Path) -> bool:
    """Mark a cached file as used (for pruning); False when it no longer exists."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


async def discard(path: Path) -> None:
    """Remove a file that may already be gone."""
    await asyncio.to_thread(remove_if_present, path)


def prune_dir(cache_dir: Path, cutoff: float) -> list[Path]:
    """Delete cache and partial files last touched before ``cutoff`` (epoch seconds)."""
    removed: list[Path] = []
    for folder in (cache_dir, cache_dir / PARTIAL_DIR):
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False) and e.stat().st_mtime < cutoff:
                    os.remove(e.path)
                    removed.append(Path(e.path))
            except FileNotFoundError:
                continue
    return removed
