"""Base64 copies of output files, made only when a request asks for them, one size cap per file.

A file over the cap (or one that cannot be read) gets an ``error`` instead of ``data``; the job
itself is unaffected. Encoding runs in a thread so a 10 MB file never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


async def inline_file(path: str | Path, max_bytes: int) -> tuple[str | None, str | None]:
    """:func:`encode_file` off the event loop."""
    return await asyncio.to_thread(encode_file, path, max_bytes)


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
