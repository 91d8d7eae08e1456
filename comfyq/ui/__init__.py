"""The dashboard at ``/ui``: plain HTML, CSS and JavaScript modules shipped inside the package.

No build step and nothing fetched from the internet: the files in ``static/`` are served as they
are. The page and its files are public (they hold no data); every call the page makes carries the
API key the person typed, kept in sessionStorage and sent as a bearer token (or, for the
websocket, as its ``comfyq.bearer.<base64url>`` subprotocol), never in a URL.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
STATIC_ROUTE = "/ui/static/{name}"
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}
# The page runs only its own files: no inline scripts, no other origins.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:;"
    " style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)


async def page(request: web.Request) -> web.StreamResponse:
    """GET /ui: the dashboard (one page; views are chosen by the URL's #fragment)."""
    return web.FileResponse(
        STATIC / "index.html",
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-cache",
            "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def asset(request: web.Request) -> web.StreamResponse:
    """GET /ui/static/{name}: one of the dashboard's own files."""
    name = request.match_info["name"]
    path = (STATIC / name).resolve()
    if path.parent != STATIC or not path.is_file():
        raise web.HTTPNotFound(text=f"no dashboard file {name!r}")
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return web.FileResponse(
        path,
        headers={
            "Content-Type": ctype,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )
