"""POST /upload/image, /upload/mask and GET /view with ComfyUI's naming and path rules."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import mimetypes
import os
import stat
import time
import uuid
from typing import TYPE_CHECKING, Any

import blake3
from aiohttp import web

from .env import SimEnv, recent_bytes, write_file

if TYPE_CHECKING:
    from .generation import Generation
from .png import UnidentifiedImageError, encode_webp_solid, sniff_image

_UNSAFE_TYPES = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}
# Newer ComfyUI also downloads these (and any */xml or *+xml) as attachments.
_MORE_UNSAFE_TYPES = {
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "image/svg+xml",
    "application/xml",
    "text/xml",
    "message/rfc822",
}


def _unsafe_new(content_type: str) -> bool:
    return (
        content_type in _UNSAFE_TYPES
        or content_type in _MORE_UNSAFE_TYPES
        or content_type.endswith(("+xml", "/xml"))
    )


class UnknownUploadType(Exception):
    """ComfyUI fails with an UnboundLocalError (so a 500) for a `type` it does not know."""


async def upload(
    request: web.Request, env: SimEnv, mask: bool = False, assets: bool = False
) -> web.Response:
    """Store a multipart `image` field; same name and bytes reuse the file, else `name (1).ext`."""
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
    answer: dict[str, Any] = {"name": filename, "subfolder": subfolder, "type": kind}
    if assets and os.path.isfile(filepath):  # newer ComfyUI registers the upload as an asset
        content = await asyncio.to_thread(_read, filepath)
        answer["asset"] = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, blake3.blake3(content).hexdigest())),
            "name": filename,
            "asset_hash": "blake3:" + blake3.blake3(content).hexdigest(),
            "size": len(content),
            "mime_type": mimetypes.guess_type(filename)[0] or "application/octet-stream",
            "tags": [kind],
        }
    return web.json_response(answer)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def find_by_hash(env: SimEnv, digest: str) -> str | None:
    """The file of input/output/temp whose blake3 is ``digest`` (the assets ``/view`` form)."""
    for root in (env.input_dir, env.output_dir, env.temp_dir):
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if blake3.blake3(_read(path)).hexdigest() == digest:
                    return path
    return None


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


async def view(
    request: web.Request, env: SimEnv, delay: float, gen: Generation | None = None
) -> web.StreamResponse:
    """Serve a file from input/output/temp; `preview=webp` is a real WebP for solid images."""
    if delay > 0:
        await asyncio.sleep(delay)
    query = request.rel_url.query
    if "filename" not in query:
        return web.Response(status=404)
    modern = gen is not None and gen.modern_view
    if modern and query["filename"].startswith("blake3:"):
        assert gen is not None
        found = None
        if gen.assets:
            found = await asyncio.to_thread(find_by_hash, env, query["filename"][7:])
        if found is None:
            return web.Response(status=404)
        return _serve(request, found, os.path.basename(found), modern=True)
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
        if not _inside(full, folder):
            return web.Response(status=403)
        folder = full
    filename = os.path.basename(filename)
    path = os.path.join(folder, filename)
    try:
        st = os.stat(path)
    except OSError:
        return web.Response(status=404)
    if not stat.S_ISREG(st.st_mode):
        return web.Response(status=404)
    if "preview" in query:
        webp = await asyncio.to_thread(_webp_preview, path)
        if webp is not None:
            disposition = {"Content-Disposition": f'filename="{filename}"'}
            return web.Response(body=webp, content_type="image/webp", headers=disposition)
    return _serve(request, path, filename, modern=modern, st=st)


_INSIDE: dict[tuple[str, str], bool] = {}


def _inside(full: str, folder: str) -> bool:
    """ComfyUI's ``commonpath((abspath(full), folder)) == folder`` check, remembered: clients
    ask for the same few subfolders over and over (a pure function of the two strings)."""
    key = (full, folder)
    hit = _INSIDE.get(key)
    if hit is None:
        if len(_INSIDE) >= 4096:
            _INSIDE.clear()
        hit = _INSIDE[key] = os.path.commonpath((os.path.abspath(full), folder)) == folder
    return hit


_TYPES: dict[str, str | None] = {}


def guess_type(filename: str) -> str | None:
    """mimetypes.guess_type(filename)[0], remembered by extension where only the extension
    decides (not for names with a scheme or a compression suffix such as .gz)."""
    dot = filename.rfind(".")
    ext = filename[dot:] if dot > 0 else ""
    if (
        not ext
        or ":" in filename
        or ext in mimetypes.suffix_map
        or ext in mimetypes.encodings_map
        or ext.lower() in mimetypes.suffix_map
        or ext.lower() in mimetypes.encodings_map
    ):
        return mimetypes.guess_type(filename)[0]
    if ext in _TYPES:
        return _TYPES[ext]
    if len(_TYPES) >= 1024:
        _TYPES.clear()
    hit = _TYPES[ext] = mimetypes.guess_type("x" + ext)[0]
    return hit


def _file_response(
    request: web.Request, path: str, headers: dict[str, str], st: os.stat_result | None
) -> web.StreamResponse:
    """aiohttp's FileResponse, or the same answer from memory for a small file this process
    wrote lately (no conditional or range headers asked: those take FileResponse's logic)."""
    data = recent_bytes(path, st) if st is not None else None
    if st is None or data is None or any(h in request.headers for h in _CONDITIONAL):
        return web.FileResponse(path, headers=headers)
    # FileResponse's ETag, Last-Modified and Accept-Ranges, written as its setters write them.
    headers["ETag"] = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    headers["Last-Modified"] = time.strftime(
        "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(math.ceil(st.st_mtime))
    )
    headers["Accept-Ranges"] = "bytes"
    return web.Response(body=data, headers=headers)


_CONDITIONAL = ("Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")


def _serve(
    request: web.Request,
    path: str,
    filename: str,
    *,
    modern: bool,
    st: os.stat_result | None = None,
) -> web.StreamResponse:
    content_type = guess_type(filename) or "application/octet-stream"
    if not modern:
        if content_type in _UNSAFE_TYPES:
            content_type = "application/octet-stream"
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        return _file_response(request, path, {**disposition, "Content-Type": content_type}, st)
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    headers = {"X-Content-Type-Options": "nosniff"}
    as_image = content_type == "image/svg+xml" and request.headers.get("Sec-Fetch-Dest") == "image"
    if _unsafe_new(content_type) and not as_image:
        headers.update(
            {
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{quoted}"',
                "Vary": "Sec-Fetch-Dest",
                "Cache-Control": "no-store",
            }
        )
    else:
        headers.update(
            {"Content-Type": content_type, "Content-Disposition": f'filename="{quoted}"'}
        )
        if content_type == "image/svg+xml":
            headers["Vary"] = "Sec-Fetch-Dest"
    return _file_response(request, path, headers, st)


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
