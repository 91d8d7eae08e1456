"""``/docs`` (Swagger UI served from the swagger-ui-py package: works with no internet),
``/openapi.json`` and ``/`` (the README rendered as HTML)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import mimetypes
import re
from functools import lru_cache
from pathlib import Path

from aiohttp import web
from markdown_it import MarkdownIt

from comfyq.api.context import get_api

ASSETS_ROUTE = "/docs/assets/{name}"


@lru_cache(maxsize=1)
def assets_dir() -> Path:
    """Swagger UI's static files, found without importing the package (it pulls in web servers)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@lru_cache(maxsize=1)
def asset_files() -> dict[str, Path]:
    """The servable files by name: a request's name is looked up, never joined into a path."""
    return {
        p.name: p for p in assets_dir().iterdir() if p.is_file() and not p.name.endswith(".map")
    }


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>comfyq API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>
const token = __TOKEN__;
window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, persistAuthorization: true,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
  requestInterceptor: (req) => {
    if (token && !req.headers.Authorization) req.headers.Authorization = "Bearer " + token;
    return req;
  },
});
</script></body></html>
"""


def _js_string(value: str | None) -> str:
    # JSON is valid JS; escaping "<" keeps "</script>" inside a value from closing the tag.
    return json.dumps(value).replace("<", "\\u003c")


async def docs_page(request: web.Request) -> web.Response:
    """GET /docs: interactive documentation."""
    keys = get_api(request).keys
    token = request.query.get("access_token")
    # Only a key that was checked goes into the page: /docs?access_token=KEY lets a browser try
    # calls.
    shown = token if keys.enabled and keys.principal(token) is not None else None
    return web.Response(
        text=_PAGE.replace("__TOKEN__", _js_string(shown)), content_type="text/html"
    )


async def docs_asset(request: web.Request) -> web.StreamResponse:
    """GET /docs/assets/{name}: Swagger UI's own files (public: nothing of ours is in them)."""
    name = request.match_info["name"]
    path = asset_files().get(name)
    if path is None:
        raise web.HTTPNotFound(text=f"no asset {name!r}")
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return web.FileResponse(
        path, headers={"Content-Type": ctype, "Cache-Control": "public, max-age=86400"}
    )


async def openapi_json(request: web.Request) -> web.Response:
    """GET /openapi.json"""
    from comfyq.api import OPENAPI

    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def readme_text(path: Path | None) -> str | None:
    """The README: the given file, the source checkout's, or the installed package's description."""
    candidates = [path] if path is not None else [Path(__file__).resolve().parents[2] / "README.md"]
    for p in candidates:
        if p is not None and p.is_file():
            return p.read_text(encoding="utf-8", errors="replace")
    try:
        text = importlib.metadata.metadata("comfyq").get_payload()  # type: ignore[attr-defined]
    except (importlib.metadata.PackageNotFoundError, AttributeError):
        return None
    return text if isinstance(text, str) and text.strip() else None


_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0"
    " 1rem;color:#222}"
    "pre{background:#f5f5f5;padding:.8rem;overflow:auto}code{background:#f5f5f5;padding:0 .2rem}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem}"
    "nav{margin-bottom:1.5rem}"
)


def render_readme(path: Path | None) -> str:
    """The README as a whole HTML page (raw HTML in the Markdown is escaped, not passed through)."""
    text = readme_text(path)
    nav = (
        '<nav><a href="/ui">Dashboard</a> · <a href="/docs">Interactive API docs</a> · '
        '<a href="/openapi.json">OpenAPI</a> · '
        '<a href="/health">Health</a></nav>'
    )
    if text is None:
        body = (
            "<h1>comfyq</h1><p>A durable API server in front of ComfyUI. No README was found.</p>"
        )
    else:
        # HTML comments (the generated-table markers) are for editors, not readers; any other raw
        # HTML stays escaped.
        text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.DOTALL)
        body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>comfyq</title>'
        f"<style>{_STYLE}</style></head><body>{nav}{body}</body></html>"
    )


async def index(request: web.Request) -> web.Response:
    """GET /: the README."""
    from comfyq.api import README

    return web.Response(text=request.app[README], content_type="text/html")
