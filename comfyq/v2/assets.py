"""The v2 asset routes: upload (multipart, streamed), from-hash, by-hash, read, content, delete.

Uploads are streamed to disk and hashed (blake3) while they arrive, never held whole; the size cap
answers 413 and keeps nothing; an ``expected_hash`` that does not match answers 409
``hash_mismatch`` and keeps nothing; bytes already held are stored once (200, ``created_new:
false``). A job's outputs are assets too: read, downloaded (with Range) and refused deletion
(409 ``asset_in_use``) while their job is kept.
"""

from __future__ import annotations

import stat
import uuid
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from comfyq.api.body import read_json_body
from comfyq.api.fileresponse import file_response
from comfyq.store.assets import AssetRecord, Blob, NewAsset
from comfyq.v2 import mapping
from comfyq.v2.blobs import Received, TooLarge, parse_hash
from comfyq.v2.context import V2, get_v2, origin, owner_of, scope_of, sees
from comfyq.v2.errors import V2Error, invalid, not_found
from comfyq.v2.submit import check_key

MAX_FIELD = 4096  # bytes of one text field
MAX_PARTS = 64
MAX_TAGS = 32
EXPIRES_IN = (60, 604800)


def _content_type(value: str) -> str:
    v = value.strip()
    if not v or len(v) > 255 or "/" not in v or not v.isprintable():
        raise invalid("$.content_type", "must be a MIME type such as image/png")
    return v


def _file_path(value: str) -> str:
    # Shown back to clients only: never joined to a directory (blobs are named by their hash).
    v = value.strip()
    if not v or len(v) > 1024 or "\x00" in v:
        raise invalid("$.file_path", "must be a name of 1-1024 characters")
    return v


def _expires_in(value: Any, path: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if isinstance(value, bool) or not EXPIRES_IN[0] <= n <= EXPIRES_IN[1]:
        raise invalid(path, f"must be seconds from {EXPIRES_IN[0]} to {EXPIRES_IN[1]}")
    return n


def _tags(values: list[str]) -> list[str]:
    if len(values) > MAX_TAGS or any(not t or len(t) > 128 for t in values):
        raise invalid("$.tags", f"at most {MAX_TAGS} tags of 1-128 characters")
    return values


def _expiry(v2: V2, expires_in: int | None) -> float | None:
    now = float(v2.api.store.clock.now())
    if expires_in is not None:
        return now + expires_in
    retention = v2.settings.retention_seconds
    return now + retention if retention > 0 else None


async def _read_form(request: web.Request, v2: V2) -> tuple[Received | None, dict[str, list[str]]]:
    fields: dict[str, list[str]] = {}
    received: Received | None = None
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as exc:
        raise V2Error(415, "unsupported_media_type", f"send multipart/form-data ({exc})") from None
    try:
        parts = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            parts += 1
            if parts > MAX_PARTS or not isinstance(part, BodyPartReader):
                raise invalid("$", f"at most {MAX_PARTS} plain form fields")
            name = part.name or ""
            if name == "file":
                if received is not None:
                    raise invalid("$.file", "send one file per upload")
                try:
                    received = await v2.blobs.receive(part, v2.settings.asset_max_bytes)
                except TooLarge as exc:
                    raise V2Error(413, "payload_too_large", str(exc)) from None
                continue
            raw = await part.read_chunk(MAX_FIELD + 1)
            if len(raw) > MAX_FIELD or not await _at_end(part):
                raise invalid(f"$.{name}", f"longer than {MAX_FIELD} bytes")
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                raise invalid(f"$.{name}", "must be UTF-8 text") from None
            fields.setdefault(name, []).append(text)
    except (ValueError, AssertionError, LookupError, HttpProcessingError) as exc:
        # aiohttp's multipart reader says so for a body that is not what its header declares.
        if received is not None:
            await v2.blobs.discard(received)
        raise V2Error(
            422, "invalid_request", f"the multipart body cannot be read: {str(exc)[:200]}"
        ) from None
    except BaseException:
        if received is not None:
            await v2.blobs.discard(received)
        raise
    return received, fields


async def _at_end(part: BodyPartReader) -> bool:
    return part.at_eof() or not await part.read_chunk(1)


async def upload(request: web.Request) -> web.Response:
    """POST /api/v2/assets (multipart: file, content_type, file_path, expected_hash, tags,
    expires_in)."""
    v2 = get_v2(request)
    key = check_key(request.headers.get("Idempotency-Key"))
    declared = request.content_length
    if declared is not None and declared > v2.settings.asset_max_bytes + 64 * 1024:
        raise V2Error(
            413, "payload_too_large", f"the file is larger than {v2.settings.asset_max_bytes} bytes"
        )
    received, fields = await _read_form(request, v2)
    try:
        if received is None:
            raise invalid("$.file", "required field is missing")
        for name in ("content_type", "file_path"):
            if not fields.get(name):
                raise invalid(f"$.{name}", "required field is missing")
        unknown = sorted(
            set(fields) - {"content_type", "file_path", "expected_hash", "tags", "expires_in"}
        )
        if unknown:
            raise invalid(f"$.{unknown[0]}", "unknown field")
        content_type = _content_type(fields["content_type"][0])
        file_path = _file_path(fields["file_path"][0])
        tags = _tags(fields.get("tags", []))
        expires_in = (
            _expires_in(fields["expires_in"][0], "$.expires_in")
            if fields.get("expires_in")
            else None
        )
        if fields.get("expected_hash"):
            expected = parse_hash(fields["expected_hash"][0])
            if expected is None:
                raise invalid("$.expected_hash", "must be blake3:<64 hex digits>")
            if f"blake3:{expected}" != received.hash:
                raise V2Error(
                    409,
                    "hash_mismatch",
                    "the bytes received do not have the expected blake3 hash; nothing was kept",
                    {"expected_hash": f"blake3:{expected}", "hash": received.hash},
                )
    except BaseException:
        if received is not None:
            await v2.blobs.discard(received)
        raise
    path = await v2.blobs.keep(received)
    new = NewAsset(
        id=str(uuid.uuid4()),
        owner=owner_of(request),
        content_type=content_type,
        file_path=file_path,
        tags=tags,
        expires_at=_expiry(v2, expires_in),
    )
    rec, created = await v2.assets.put_asset(
        Blob(received.hash, received.size, str(path)), new, key
    )
    return _asset_response(request, rec, 201 if created else 200, created_new=created)


def _asset_response(
    request: web.Request, rec: AssetRecord, status: int = 200, **kw: Any
) -> web.Response:
    from comfyq.api.context import json_response

    return json_response(mapping.asset(rec, origin(request), **kw), status)


async def from_hash(request: web.Request) -> web.Response:
    """POST /api/v2/assets/from-hash {hash, file_path?, tags?, expires_in?}"""
    v2 = get_v2(request)
    try:
        raw = msgspec.json.decode(await read_json_body(request, v2.settings))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise invalid("$", "invalid JSON") from None
    if not isinstance(raw, dict):
        raise invalid("$", 'must be an object: {"hash": "blake3:..."}')
    unknown = sorted(str(k) for k in raw if k not in ("hash", "file_path", "tags", "expires_in"))
    if unknown:
        raise invalid(f"$.{unknown[0]}", "unknown field")
    h = raw.get("hash")
    hexdigest = parse_hash(h) if isinstance(h, str) else None
    if hexdigest is None:
        raise invalid("$.hash", "must be blake3:<64 hex digits>")
    fp = raw.get("file_path")
    if fp is not None and not isinstance(fp, str):
        raise invalid("$.file_path", "must be a string")
    tags = raw.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise invalid("$.tags", "must be a list of strings")
    expires_in = (
        _expires_in(raw["expires_in"], "$.expires_in")
        if raw.get("expires_in") is not None
        else None
    )
    new = NewAsset(
        id=str(uuid.uuid4()),
        owner=owner_of(request),
        content_type="application/octet-stream",
        file_path=_file_path(fp) if fp else None,
        tags=_tags(tags),
        expires_at=_expiry(v2, expires_in),
    )
    rec = await v2.assets.mint_from_hash(f"blake3:{hexdigest}", new, scope_of(request))
    if rec is None:
        raise V2Error(404, "blob_not_found", "no bytes with this hash that you may use")
    return _asset_response(request, rec, 201, created_new=False)


async def by_hash(request: web.Request) -> web.Response:
    """HEAD /api/v2/assets/by-hash/{hash}: 200 when the caller may mint from it, else 404."""
    v2 = get_v2(request)
    hexdigest = parse_hash(request.match_info["hash"])
    if hexdigest is None:
        return web.Response(status=404)
    blob = await v2.assets.blob_for(f"blake3:{hexdigest}", scope_of(request))
    return web.Response(status=200 if blob is not None else 404)


async def _visible(request: web.Request) -> tuple[AssetRecord, str | None]:
    """The asset (and, for an output, its job's expiry), or 404 when gone or not the caller's."""
    v2 = get_v2(request)
    asset_id = request.match_info["id"]
    seen = v2.output_asset(asset_id)
    if seen is not None:
        # An output this process listed: its row is fixed while its job is kept as it ended, so
        # only the job is read (it is still there, the caller's, not expired, not run again).
        ended, rec = seen
        job = await v2.read_job(rec.job_id or "", request, head=True)
        if job is not None and job.terminal and job.updated_at == ended and job.finished_at:
            return rec, mapping.expires_at(job, v2.settings.retention_seconds)
    rec = await v2.assets.asset(asset_id)
    if rec is None:
        raise not_found("asset")
    if rec.job_id is not None:
        # None when the job expired (its outputs did too) or is not the caller's.
        job = await v2.read_job(rec.job_id, request)
        if job is None:
            raise not_found("asset")
        return rec, mapping.expires_at(job, v2.settings.retention_seconds)
    if not sees(request, rec.owner) or (
        rec.expires_at is not None and rec.expires_at < v2.api.store.now_iso()
    ):
        raise not_found("asset")
    return rec, None


async def get_asset(request: web.Request) -> web.Response:
    """GET /api/v2/assets/{id}"""
    rec, until = await _visible(request)
    return _asset_response(request, rec, expires=until)


async def content(request: web.Request) -> web.StreamResponse:
    """GET /api/v2/assets/{id}/content: the bytes (Range: 206, 416), or 302 to S3."""
    rec, _ = await _visible(request)
    if rec.url is not None:
        raise web.HTTPFound(rec.url)  # the output went to S3: its presigned URL
    path = None if rec.path is None else Path(rec.path)
    try:
        st = None if path is None else path.stat()
    except OSError:
        st = None
    if path is None or st is None or not stat.S_ISREG(st.st_mode):
        raise V2Error(404, "not_found", "the asset's bytes are no longer here")
    # Range (206), an unsatisfiable range (416) and HEAD as FileResponse answers them, a small
    # file from memory (no thread hop): the path comes from the store, never from the request.
    return file_response(
        request,
        path,
        st,
        {
            "Content-Type": rec.content_type or "application/octet-stream",
            "Cache-Control": "private, max-age=0",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/v2/assets/{id}: 204; 409 asset_in_use while a kept job depends on it."""
    v2 = get_v2(request)
    asset_id = request.match_info["id"]
    rec = await v2.assets.asset(asset_id)
    if rec is not None and rec.job_id is not None:
        await _visible(request)  # an output: 404 unless the caller may see its job
    outcome, blob_path = await v2.assets.delete_asset(asset_id, scope_of(request))
    if outcome == "missing":
        raise not_found("asset")
    if outcome == "in_use":
        raise V2Error(409, "asset_in_use", "the asset cannot be deleted while it is in use")
    if blob_path is not None:
        await v2.blobs.remove(blob_path)
    return web.Response(status=204)
