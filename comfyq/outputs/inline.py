"""Base64 copies of output files, made only when a request asks for them, one size cap per file.

A file over the cap (or one that cannot be read) gets an ``error`` instead of ``data``; the job
itself is unaffected. Encoding runs in a thread so a 10 MB file never stalls the event loop; a
small output this process wrote lately is encoded on the loop from memory (no thread hop).
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from comfyq.outputs.recent import RECENT

_CHUNK = 3 * 256 * 1024  # a multiple of 3: chunks encode without padding in between


def encode_file(path: str | Path, max_bytes: int) -> tuple[str | None, str | None]:
    """``(base64 data, None)`` or ``(None, why not)`` for one file; blocking, run it in a thread."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                return (
                    None,
                    f"not inlined as base64: {size} bytes is over the {max_bytes}-byte limit",
                )
            parts: list[bytes] = []
            read = 0
            while chunk := f.read(_CHUNK):
                read += len(chunk)
                if read > max_bytes:  # the file grew after stat
                    return None, f"not inlined as base64: over the {max_bytes}-byte limit"
                parts.append(base64.b64encode(chunk))
    except OSError as exc:
        return None, f"not inlined as base64: {exc.strerror or exc}"
    return b"".join(parts).decode("ascii"), None


# An output this process wrote lately (comfyq.outputs.recent) up to this size is encoded on the
# loop from memory (about 20 us for 32 KiB here), not read and encoded in a thread hop.
ON_LOOP_MAX = 32 << 10


async def inline_file(path: str | Path, max_bytes: int) -> tuple[str | None, str | None]:
    """:func:`encode_file` off the event loop, or from memory for a small recent output."""
    data = _recent(str(path))
    if data is None:
        return await asyncio.to_thread(encode_file, path, max_bytes)
    if len(data) > max_bytes:
        return None, f"not inlined as base64: {len(data)} bytes is over the {max_bytes}-byte limit"
    return base64.b64encode(data).decode("ascii"), None


def _recent(path: str) -> bytes | None:
    """The bytes of ``path`` when it is a small output still as this process wrote it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return RECENT.get(path, st) if st.st_size <= ON_LOOP_MAX else None


async def inline_outputs(outputs: Iterable[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """Copies of output dicts (``local_path`` read, not kept) plus ``data`` or an ``error``."""
    out: list[dict[str, Any]] = []
    for o in outputs:
        item = dict(o)
        path = item.pop("local_path", None)
        if path and item.get("data") is None:
            data, err = await inline_file(path, max_bytes)
            if data is not None:
                item["data"] = data
            if err and not item.get("error"):
                item["error"] = err
        if item.get("data") is None:
            item.pop("data", None)
        out.append(item)
    return out
