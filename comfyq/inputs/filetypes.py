"""What an input file is: its type by content (libmagic), its extension, whether it is accepted."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import magic

MiB = 1024 * 1024
SNIFF_BYTES = 256 * 1024  # enough for libmagic to tell every accepted type apart

DEFAULT_ALLOWED_TYPES: frozenset[str] = frozenset(
    {
        "image/*",
        "video/*",
        "audio/*",
        "text/plain",
        "text/csv",
        "application/json",
        "application/x-safetensors",
        "application/x-gguf",
    }
)
# Types a wildcard never admits: SVG is XML that may carry script and ComfyUI cannot load it.
_NOT_BY_WILDCARD = frozenset({"image/svg+xml"})

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/x-ms-bmp": ".bmp",
    "image/tiff": ".tiff",
    "image/avif": ".avif",
    "image/heic": ".heic",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi",
    "audio/mpeg": ".mp3",
    "audio/x-wav": ".wav",
    "audio/wav": ".wav",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "text/plain": ".txt",
    "text/csv": ".csv",
    "application/json": ".json",
    "application/x-safetensors": ".safetensors",
    "application/x-gguf": ".gguf",
}


@dataclass(frozen=True)
class Asset:
    """One stored input file."""

    path: Path
    sha256: str
    mime: str
    ext: str
    size: int


def magic_type(head: bytes) -> str | None:
    """libmagic's MIME type for a file's first bytes; None when libmagic fails on them. The one
    place comfyq calls libmagic (inputs and outputs alike); blocking, run it in a thread."""
    try:
        return str(magic.from_buffer(head, mime=True))
    except magic.MagicException:
        return None


def sniff_type(head: bytes) -> str:
    """The MIME type of an input file from its first bytes (blocking: run it in a thread)."""
    if head[:4] == b"GGUF":
        return "application/x-gguf"
    if len(head) >= 10:
        # safetensors: u64 little-endian JSON header length, then the JSON header itself.
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= 100 * MiB and head[8:9] == b"{":
            return "application/x-safetensors"
    return magic_type(head) or "application/octet-stream"


def extension_for(mime: str) -> str:
    """The file extension used for ``mime`` (``.bin`` when nothing better is known)."""
    return _EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ".bin"


def type_allowed(mime: str, allowed: Iterable[str]) -> bool:
    """True when ``mime`` matches one of ``allowed`` (exact types or ``major/*``)."""
    allowed = set(allowed)
    if mime in allowed:
        return True
    major = mime.split("/", 1)[0]
    return f"{major}/*" in allowed and mime not in _NOT_BY_WILDCARD
