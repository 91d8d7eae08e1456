"""Collect a job's outputs over HTTP (``GET /view``) into its own folder under the output dir.

File names come from ComfyUI and are never trusted as paths: only a plain base name is kept, the
subfolder is folded into the name, and the result must stay inside the job's folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3

from comfyq.errors import OutputError
from comfyq.inputs.filetypes import magic_type

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def job_dir(root: Path, job_id: str) -> Path:
    """The folder of one job; refuses an id that could name anything else."""
    if not job_id or job_id in (".", "..") or "/" in job_id or "\\" in job_id or "\x00" in job_id:
        raise OutputError(f"job id {job_id!r} cannot name a folder")
    # One path component that is neither "." nor ".." cannot leave ``root``; no resolve() needed
    # (it would cost a stat per component on every job).
    return root / job_id


def safe_name(filename: str, subfolder: str = "") -> str:
    """A flat, harmless file name for a ComfyUI output (subfolder folded in)."""
    base = Path(filename.replace("\\", "/")).name
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    name = "_".join([*parts, base]) if parts else base
    name = _SAFE.sub("_", name).lstrip(".")
    if not name:
        raise OutputError(f"output file name {filename!r} is not usable")
    return name[:200]


@dataclass
class OutputItem:
    """One file ComfyUI reported, as history lists it."""

    node_id: str
    output_type: str  # the key in ComfyUI's outputs: images, gifs, video, audio, text...
    filename: str
    subfolder: str
    comfy_type: str  # output | temp | input
    text: str | None = None


def list_outputs(outputs: dict[str, Any]) -> list[OutputItem]:
    """Every file (and text) in ComfyUI's ``outputs`` mapping, in node order."""
    items: list[OutputItem] = []
    for node_id, out in (outputs or {}).items():
        if not isinstance(out, dict):
            continue
        for key, values in out.items():
            if not isinstance(values, list):
                continue
            for i, v in enumerate(values):
                if isinstance(v, dict) and isinstance(v.get("filename"), str):
                    items.append(
                        OutputItem(
                            str(node_id),
                            key,
                            v["filename"],
                            str(v.get("subfolder") or ""),
                            str(v.get("type") or "output"),
                        )
                    )
                elif isinstance(v, str) and key in ("text", "string", "strings"):
                    items.append(
                        OutputItem(
                            str(node_id), "text", f"node{node_id}_{key}_{i}.txt", "", "text", v
                        )
                    )
    return items


def hash_and_type(path: Path) -> tuple[str, int, str]:
    """(sha256, size, MIME type) of a file; run it in a thread."""
    sha, _, size, mime = hashes_and_type(path)
    return sha, size, mime


def hashes_and_type(path: Path, data: bytes | None = None) -> tuple[str, str, int, str]:
    """(sha256, blake3, size, MIME type) of a file, read once; run it in a thread. ``data``: the
    file's content already in hand (an output just downloaded whole), so it is not read back."""
    if data is not None:
        head = data[:8192]
        mime = (
            _content_type(head) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        return hashlib.sha256(data).hexdigest(), blake3(data).hexdigest(), len(data), mime
    h = hashlib.sha256()
    b = blake3()
    size = 0
    with path.open("rb") as f:
        head = f.read(8192)
        h.update(head)
        b.update(head)
        size += len(head)
        while chunk := f.read(1 << 20):
            h.update(chunk)
            b.update(chunk)
            size += len(chunk)
    mime = _content_type(head) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return h.hexdigest(), b.hexdigest(), size, mime


# libmagic's own PNG rule (Magdir/images: this string at offset 0 is "PNG image data",
# image/png): matched here, it spares the commonest output a libmagic call (~15 us, and one more
# GIL release and re-acquisition in the thread hop that writes it).
_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"


def _content_type(head: bytes) -> str | None:
    """libmagic's type, unless it failed or saw only a RIFF/Matroska container it could not name
    (the extension tells those apart better)."""
    if head.startswith(_PNG):
        return "image/png"
    found = magic_type(head)
    if found in ("application/octet-stream", "text/plain") and head[:4] in (
        b"RIFF",
        b"\x1aE\xdf\xa3",
    ):
        return None
    return found


async def describe(path: Path) -> tuple[str, int, str]:
    return await asyncio.to_thread(hash_and_type, path)


async def describe_all(path: Path) -> tuple[str, str, int, str]:
    """(sha256, blake3, size, MIME type): an output is also a Comfy API v2 asset."""
    return await asyncio.to_thread(hashes_and_type, path)
