"""``multipart/form-data`` request bodies for the generate and workflow routes.

For ``/generate``: a part named ``request`` holds the JSON body (``{"input": {...}}``); every file
part becomes an ``input.images`` entry named after its form field (or, for a field called
``file``/``files``/``images``, after the file name), so the workflow or a modifier parameter refers
to it by that name, exactly like an uploaded base64 image. For ``/workflows/{name}``: a part
named ``params`` may hold the JSON parameters; each other text part is one parameter (``64`` is
read as a number where the schema wants one), and each file part sets the parameter named by its
field to the stored file.

Files are streamed to the input cache while they arrive (``comfyq.inputs.uploads``); the JSON and
text parts are small and read whole, within the JSON limit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web

from comfyq.admission import bad
from comfyq.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from comfyq.inputs import uploads
from comfyq.inputs.filetypes import DEFAULT_ALLOWED_TYPES
from comfyq.limits import json_limit, too_large

MAX_PARTS = 64
MAX_TEXT = 64 * 1024
_GENERIC = frozenset({"", "file", "files", "image", "images"})
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Form:
    """What a multipart body held: JSON parts, text fields and stored files."""

    json: dict[str, bytes] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    files: list[uploads.Received] = field(default_factory=list)


def is_multipart(request: web.Request) -> bool:
    return request.content_type == "multipart/form-data"


async def _read_small(part: BodyPartReader, limit: int, path: str, timeout: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise too_large(None, limit, "max_json_bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"{path}: the part did not arrive within {timeout:g}s (setting http_body_timeout)",
            details={"limit": timeout, "setting": "http_body_timeout"},
        ) from None
    return b"".join(chunks)


async def read_form(request: web.Request, services: Any, json_parts: set[str]) -> Form:
    """Read every part: ``json_parts`` as JSON bytes, other text fields as text, files to disk."""
    settings = services.settings
    declared = request.content_length
    if declared is not None and declared > settings.max_body_bytes:
        raise PayloadTooLarge(
            f"{declared} bytes is over the request body limit of {settings.max_body_bytes} bytes"
            " (setting max_body_bytes)",
            details={"limit": settings.max_body_bytes, "setting": "max_body_bytes"},
        )
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as exc:
        raise UnsupportedMediaType(f"not a readable multipart/form-data body ({exc})") from None
    limit, _ = json_limit(settings)
    cache_dir = services.downloader.cache_dir
    allowed = getattr(services.downloader, "allowed_types", DEFAULT_ALLOWED_TYPES)
    form = Form()
    total = 0
    try:
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                return form
            if not isinstance(part, BodyPartReader):
                raise bad("$", "nested multipart bodies are not accepted")
            name = part.name or ""
            path = f"$.{name}" if name.isidentifier() else f"$[{name!r}]"
            if part.filename is not None:
                received = await uploads.receive_part(
                    part,
                    cache_dir,
                    max_bytes=settings.max_body_bytes - total,
                    allowed=allowed,
                    path=path,
                    idle_timeout=settings.http_body_timeout,
                )
                total += received.asset.size
                form.files.append(received)
            elif name in json_parts:
                form.json[name] = await _read_small(part, limit, path, settings.http_body_timeout)
            else:
                raw = await _read_small(part, MAX_TEXT, path, settings.http_body_timeout)
                try:
                    form.text[name] = raw.decode()
                except UnicodeDecodeError:
                    raise bad(path, "must be UTF-8 text") from None
        raise bad("$", f"at most {MAX_PARTS} parts")
    except (ValueError, AssertionError, LookupError) as exc:  # aiohttp: a malformed body
        await uploads.discard(form.files)
        raise bad("$", f"malformed multipart/form-data body: {exc}") from None
    except BaseException:
        await uploads.discard(form.files)
        raise


def _decode_object(raw: bytes, path: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise bad(path, "invalid JSON") from None
    except RecursionError:
        raise bad(path, "JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise bad(path, "must be a JSON object")
    return value


def file_name(received: uploads.Received) -> str:
    """The name an uploaded file goes by in the workflow."""
    if received.field not in _GENERIC:
        return received.field
    stem = _SAFE.sub("_", received.filename).strip("._") or "upload"
    return stem[:200]


async def generate_body(request: web.Request, services: Any) -> tuple[bytes, list[Any]]:
    """The JSON body of a multipart ``/generate`` request, and the stored files."""
    form = await read_form(request, services, {"request"})
    try:
        if "request" not in form.json:
            raise bad("$.request", 'required: a part named "request" holding {"input": {...}}')
        body = _decode_object(form.json["request"], "$.request")
        if form.text:
            extra = min(form.text)
            raise bad(f"$.{extra}", "unknown form field (send the request as the request part)")
        inp = body.get("input")
        if not isinstance(inp, dict):
            raise bad("$.request.input", "required: an object")
        images = inp.setdefault("images", [])
        if not isinstance(images, list):
            raise bad("$.request.input.images", "must be a list")
        taken = {i.get("name") for i in images if isinstance(i, dict)}
        for received in form.files:
            name = file_name(received)
            if name in taken:
                raise bad(f"$.{received.field}", f"input name {name!r} is used twice")
            taken.add(name)
            images.append({"name": name, "image": received.ref})
        return msgspec.json.encode(body), form.files
    except BaseException:
        await uploads.discard(form.files)
        raise


async def workflow_params(
    request: web.Request, services: Any
) -> tuple[dict[str, Any], list[dict[str, str]], list[Any]]:
    """Parameters, ``input.images`` entries and stored files of a multipart workflow request."""
    form = await read_form(request, services, {"params"})
    try:
        params = _decode_object(form.json["params"], "$.params") if "params" in form.json else {}
        for key, value in form.text.items():
            params[key] = value
        images: list[dict[str, str]] = []
        for received in form.files:
            name = file_name(received)
            if received.field in _GENERIC:
                raise bad(f"$.{received.field}", "name the file part after the parameter it sets")
            images.append({"name": name, "image": received.ref})
            params[received.field] = name
        return params, images, form.files
    except BaseException:
        await uploads.discard(form.files)
        raise


def json_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's headers with the body now declared as JSON."""
    out = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
    out["Content-Type"] = "application/json"
    return out
