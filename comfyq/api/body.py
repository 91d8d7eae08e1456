"""Reading a JSON request body within the route's limit and the body timeout.

``max_body_bytes`` (aiohttp's ``client_max_size``) is the cap for uploads; a JSON body has its own,
much lower limit (``max_json_bytes``): a declared ``Content-Length`` over it is refused before a
byte is read, and a chunked (or lying) body is read only up to it. A body that does not arrive
within ``http_body_timeout`` is a 408.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from comfyq.errors import RequestTimeout
from comfyq.limits import json_limit, too_large

CHUNK = 256 * 1024
JOIN_IN_THREAD = 1024 * 1024
FAST_BYTES = 1024 * 1024  # a declared body up to this, already received, is read in one call


async def read_json_body(request: web.Request, settings: Any) -> bytes:
    """The whole body, at most the JSON limit (413 beyond), within ``http_body_timeout`` (408)."""
    limit, setting = json_limit(settings)
    timeout = settings.http_body_timeout
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(declared, limit, setting)
    content = request.content
    if declared is not None and declared <= FAST_BYTES and content.is_eof():
        # A small body that has arrived whole (the common case: one packet): take it as is, with
        # no timer and no chunked loop. Never more than Content-Length is fed to the stream.
        body = content.read_nowait(-1)
        if len(body) > limit:
            raise too_large(len(body), limit, setting)
        return body
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await content.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise too_large(None, limit, setting)
                parts.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout:g}s (setting http_body_timeout)",
            details={"limit": timeout, "setting": "http_body_timeout"},
        ) from None
    if size > JOIN_IN_THREAD:
        # bytes.join releases the GIL for large results: the copy (and the page faults of a new
        # 16 MiB buffer, ~17 ms of CPU measured) stays off the event loop.
        return await asyncio.to_thread(b"".join, parts)
    return b"".join(parts)
