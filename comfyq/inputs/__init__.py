"""How a request becomes a ComfyUI prompt: ``prepare`` builds the workflow (modifier or raw) and
places its inputs; ``downloader``, ``filetypes`` and ``storage`` fetch URL and base64 inputs safely.

Input assets: safe URL downloads and inline (base64) inputs, kept in a content-hash cache.

Every file lands in ``cache_dir/{sha256}{ext}``: it is streamed to a private temp file, hashed on
the way, typed by libmagic from its first bytes and renamed into place atomically, so readers
never see a partial file and identical content is stored once. Concurrent fetches of one URL
share one download. The URL -> file index is in memory with a freshness TTL; a stale entry is
revalidated with the server's ETag / Last-Modified, so changed content is picked up.
"""

from __future__ import annotations

from comfyq.inputs.downloader import Downloader, DownloaderStats
from comfyq.inputs.filetypes import (
    DEFAULT_ALLOWED_TYPES,
    SNIFF_BYTES,
    Asset,
    extension_for,
    sniff_type,
    type_allowed,
)

__all__ = [
    "DEFAULT_ALLOWED_TYPES",
    "SNIFF_BYTES",
    "Asset",
    "Downloader",
    "DownloaderStats",
    "extension_for",
    "sniff_type",
    "type_allowed",
]
