"""File transfer with ComfyUI: ``POST /upload/image|mask`` and streamed ``GET /view``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import mimetypes
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import msgspec
from yarl import URL

from comfyq.errors import ComfyUIUnreachable, InputError, OutputError
from comfyq.fileio import BatchedWriter, write_file

_CHUNK = 1 << 16
_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError)


def _unreachable(backend: str, what: str, exc: BaseException) -> ComfyUIUnreachable:
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ComfyUIUnreachable(
        f"ComfyUI at {backend} failed during {what}: {reason}", details={"backend": backend}
    )


@functools.cache
def _stream_timeout(timeout: float) -> aiohttp.ClientTimeout:
    # No total limit (files can be large), but a stalled connection is given up on. One object
    # per distinct value (a client has one), not one per request.
    return aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)


async def upload_file(
    session: aiohttp.ClientSession,
    base_url: str,
    backend: str,
    data: bytes | Path,
    name: str,
    *,
    subfolder: str,
    type: str,
    overwrite: bool,
    mask: bool,
    original_ref: dict[str, Any] | None,
    timeout: float,
) -> dict[str, Any]:
    """Upload ``data`` as ``name``; returns ComfyUI's {"name", "subfolder", "type"}."""
    if mask and original_ref is None:
        raise ValueError("a mask upload needs original_ref (the image the mask belongs to)")
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    handle: IO[bytes] | None = None
    if isinstance(data, Path):
        try:
            handle = await asyncio.to_thread(open, data, "rb")
        except OSError as exc:
            raise InputError(f"cannot read {data.name} for upload: {exc.strerror}") from exc
    form = aiohttp.FormData()
    # aiohttp reads file objects in a thread, chunk by chunk: large inputs are streamed.
    form.add_field(
        "image", handle if handle is not None else data, filename=name, content_type=mime
    )
    form.add_field("type", type)
    form.add_field("subfolder", subfolder)
    form.add_field("overwrite", "true" if overwrite else "false")
    if original_ref is not None:
        form.add_field("original_ref", json.dumps(original_ref))
    path = "/upload/mask" if mask else "/upload/image"
    try:
        async with session.post(
            base_url + path, data=form, timeout=_stream_timeout(timeout)
        ) as resp:
            body = await resp.read()
            status = resp.status
    except _NETWORK_ERRORS as exc:
        raise _unreachable(backend, f"upload of {name}", exc) from exc
    finally:
        if handle is not None:
            await asyncio.to_thread(handle.close)
    if status == 200:
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("name"), str):
            return {
                "name": answer["name"],
                "subfolder": answer.get("subfolder", subfolder),
                "type": answer.get("type", type),
            }
        raise ComfyUIUnreachable(
            f"ComfyUI at {backend} sent an unexpected upload answer",
            details={"backend": backend, "body": body[:200].decode(errors="replace")},
        )
    if status in (400, 403, 413):
        what = "too large" if status == 413 else "refused"
        raise InputError(
            f"ComfyUI {what} the upload of {name!r} (HTTP {status})",
            details={"status": status, "subfolder": subfolder, "type": type},
        )
    raise ComfyUIUnreachable(
        f"ComfyUI at {backend} answered upload with HTTP {status}",
        details={"backend": backend, "status": status},
    )


_SMALL = 4 * 1024 * 1024
T = TypeVar("T")

# ``after(dest, data)`` runs in the hop that wrote ``dest``; ``data`` is the file's content when
# it was downloaded whole (a small output: hash it without reading the file back), else None.
After = Callable[[Path, bytes | None], T]


def _then(
    after: After[T] | None, dest: Path, data: bytes | None
) -> tuple[T | None, BaseException | None]:
    # ``after``'s own failure is its caller's to see as it is, not as a failed write.
    if after is None:
        return None, None
    try:
        return after(dest, data), None
    except Exception as exc:  # noqa: BLE001 - re-raised on the loop
        return None, exc


def _write_then(
    part: Path, data: bytes, dest: Path, after: After[T] | None
) -> tuple[T | None, BaseException | None]:
    write_file(part, data, replace=dest)
    return _then(after, dest, data)


def _replace_then(
    part: Path, dest: Path, after: After[T] | None
) -> tuple[T | None, BaseException | None]:
    os.replace(part, dest)
    return _then(after, dest, None)


async def download_then(
    session: aiohttp.ClientSession,
    url: str | URL,
    backend: str,
    label: str,
    dest: Path,
    *,
    timeout: float,
    after: After[T] | None = None,
) -> tuple[int, T | None]:
    """Stream ``url`` into ``dest`` through ``dest.part`` and an atomic rename, then run
    ``after(dest, data)`` (e.g. hashing the file) in the thread hop of the write (one hop per
    small output instead of two); returns (bytes, ``after``'s value or None)."""
    part = dest.with_name(dest.name + ".part")
    size, (value, exc) = await _download(session, url, backend, label, dest, part, timeout, after)
    if exc is not None:
        raise exc
    return size, value


async def _download(
    session: aiohttp.ClientSession,
    url: str | URL,
    backend: str,
    label: str,
    dest: Path,
    part: Path,
    timeout: float,
    after: After[T] | None,
) -> tuple[int, tuple[T | None, BaseException | None]]:
    """Stream ``url`` into ``dest`` through ``part`` and an atomic rename, then ``after``;
    returns (bytes, (``after``'s value, its exception))."""
    size = 0
    done = False
    try:
        async with session.get(url, timeout=_stream_timeout(timeout)) as resp:
            if resp.status in (400, 403, 404):
                raise OutputError(
                    f"ComfyUI has no file {label} (HTTP {resp.status})",
                    details={"backend": backend, "status": resp.status},
                )
            if resp.status != 200:
                raise ComfyUIUnreachable(
                    f"ComfyUI at {backend} answered /view with HTTP {resp.status}",
                    details={"backend": backend, "status": resp.status},
                )
            expected = resp.content_length
            if expected is not None and expected <= _SMALL:
                # Most outputs are small images: one read and one thread hop for mkdir, write
                # and rename, instead of a hop per chunk.
                data = await resp.read()
                if len(data) != expected:
                    raise ComfyUIUnreachable(
                        f"download of {label} from {backend} stopped after {len(data)} of"
                        f" {expected} bytes",
                        details={"backend": backend},
                    )
                try:
                    then = await asyncio.to_thread(_write_then, part, data, dest, after)
                except OSError as exc:
                    raise OutputError(f"cannot write {dest.name}: {exc.strerror or exc}") from exc
                done = True
                return len(data), then
            try:
                # One thread hop per MiB (the first one creates the folder and opens the file).
                async with BatchedWriter(part) as out:
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        await out.write(chunk)
                size = out.size
            except _NETWORK_ERRORS:
                raise
            except OSError as exc:
                raise OutputError(f"cannot write {dest.name}: {exc.strerror or exc}") from exc
        if expected is not None and size != expected:
            raise ComfyUIUnreachable(
                f"download of {label} from {backend} stopped after {size} of {expected} bytes",
                details={"backend": backend},
            )
        then = await asyncio.to_thread(_replace_then, part, dest, after)
        done = True
        return size, then
    except _NETWORK_ERRORS as exc:
        raise _unreachable(backend, f"download of {label}", exc) from exc
    finally:
        if not done:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(part.unlink, missing_ok=True)
