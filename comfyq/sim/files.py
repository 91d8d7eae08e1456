"""POST /upload/image, /upload/mask and GET /view with ComfyUI's naming and path rules."""

from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import os
from typing import Any

from aiohttp import web

from .env import SimEnv, write_file
from .png import UnidentifiedImageError, encode_webp_solid, sniff_image

_UNSAFE_TYPES = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}


class UnknownUploadType(Exception):
    """ComfyUI fails with an UnboundLocalError (so a 500) for a `type` it does not know."""


async def upload(request: web.Request, env: SimEnv, mask: bool = False) -> web.Response:
    """Store a multipart `image` field; same name + same bytes reuses the file, else `name (1).ext`."""
    post = await request.post()
    image = post.get("image")
    if isinstance(image, str) and image:
        raise TypeError("'str' object has no attribute 'file'")  # ComfyUI answers 500 here
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    kind_raw = post.get("type")
    kind = "input" if kind_raw is None else str(kind_raw)
    upload_dir = env.dir_for_type(kind)
    if upload_dir is None:
        raise UnknownUploadType(kind)
    original_ref: Any = None
    if mask:
        original_ref = json.loads(str(post.get("original_ref")))  # missing -> error -> 500
    filename = image.filename
    subfolder = str(post.get("subfolder", ""))
    folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((upload_dir, filepath)) != upload_dir:
        return web.Response(status=400)
    os.makedirs(folder, exist_ok=True)
    data = image.file.read()
    stem, ext = os.path.splitext(filename)
    duplicate = False
    if str(post.get("overwrite")) not in ("true", "1"):
        digest = hashlib.sha256(data).digest()
        i = 1
        while os.path.exists(filepath):
            if await asyncio.to_thread(_sha256, filepath) == digest:
                duplicate = True
                break
            filename = f"{stem} ({i}){ext}"
            filepath = os.path.join(folder, filename)
            i += 1
    if not duplicate:
        if not mask:
            await write_file(filepath, data)
        elif _mask_original(env, original_ref) is not None:
            # ComfyUI copies the mask's alpha into the original image; without an image library
            # the simulator stores the uploaded mask itself under the new name.
            await write_file(filepath, data)
    return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})


def _sha256(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def _mask_original(env: SimEnv, ref: Any) -> str | None:
    if not isinstance(ref, dict):
        return None
    name, folder = env.split_annotation(str(ref.get("filename", "")))
    if not name or name[0] == "/" or ".." in name:
        return None
    folder = folder or env.dir_for_type(str(ref.get("type", "output")))
    if folder is None:
        return None
    sub = str(ref.get("subfolder", ""))
    if sub:
        full = os.path.join(folder, sub)
        if os.path.commonpath((os.path.abspath(full), folder)) != folder:
            return None
        folder = full
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


async def view(request: web.Request, env: SimEnv, delay: float) -> web.StreamResponse:
    """Serve a file from input/output/temp; `preview=webp` is a real WebP for solid images."""
    if delay > 0:
        await asyncio.sleep(delay)
    query = request.rel_url.query
    if "filename" not in query:
        return web.Response(status=404)
    filename, folder = env.split_annotation(query["filename"])
    if not filename:
        return web.Response(status=400)
    if filename[0] == "/" or ".." in filename:
        return web.Response(status=400)
    if folder is None:
        folder = env.dir_for_type(query.get("type", "output"))
    if folder is None:
        return web.Response(status=400)
    if "subfolder" in query:
        full = os.path.join(folder, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full), folder)) != folder:
            return web.Response(status=403)
        folder = full
    filename = os.path.basename(filename)
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        return web.Response(status=404)
    disposition = {"Content-Disposition": f'filename="{filename}"'}
    if "preview" in query:
        webp = await asyncio.to_thread(_webp_preview, path)
        if webp is not None:
            return web.Response(body=webp, content_type="image/webp", headers=disposition)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in _UNSAFE_TYPES:
        content_type = "application/octet-stream"
    return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})


def _webp_preview(path: str) -> bytes | None:
    # Only PNGs this simulator wrote are known to be one colour; anything else is served as is.
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        info = sniff_image(head)
    except UnidentifiedImageError:
        return None
    if not info.solid or not (1 <= info.width <= 16384 and 1 <= info.height <= 16384):
        return None
    return encode_webp_solid(info.width, info.height, info.rgb)
