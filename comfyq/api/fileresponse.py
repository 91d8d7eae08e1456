"""Output downloads without thread hops for small files, with FileResponse's HTTP semantics.

aiohttp's ``web.FileResponse`` stats and opens the file in the default executor, sends it with
``sendfile`` and closes it in the executor again: two thread hops per download, each a GIL
hand-off on both threads, for what is often a file of a few KiB written a moment ago.
:func:`file_response` answers a small file from memory instead (this process's recent outputs,
:mod:`comfyq.outputs.recent`, or a read on the loop for a tiny file: an open of a file whose
folder was just looked up costs microseconds) through :class:`MemoryFileResponse`, which makes
FileResponse's answer from the bytes: the same ETag and Last-Modified, If-Match and
If-Unmodified-Since (412), If-None-Match and If-Modified-Since (304), If-Range, Range (206; a
multi-range or malformed range is 416, as FileResponse answers), HEAD, and the caller's
Content-Type and Content-Disposition. Larger files keep FileResponse (sendfile), minus its
search for precompressed ``.gz``/``.br`` siblings: an output folder holds outputs, and a
``name.gz`` there is another output, not an encoding of ``name``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY, ETag, must_be_empty_body

from comfyq.outputs.recent import RECENT, RecentFiles

# A cache miss this size or smaller is read on the loop (open, fstat, read, close: about 15 us
# here) rather than sent by FileResponse (two hops and a sendfile).
READ_ON_LOOP_MAX = 64 << 10

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def file_response(
    request: web.Request,
    path: Path,
    st: os.stat_result | None,
    headers: Mapping[str, str],
    *,
    recent: RecentFiles = RECENT,
) -> web.StreamResponse:
    """The answer for the regular file ``path`` whose lstat is ``st`` (None: not known, and
    FileResponse looks). From memory when it is small, else FileResponse's. ``headers`` name
    the Content-Type (FileResponse would guess one from the name; without it, it answers)."""
    if st is not None and st.st_size <= recent.max_file and hdrs.CONTENT_TYPE in headers:
        key = str(path)
        data = recent.get(key, st)
        if data is not None:
            return MemoryFileResponse(data, st, headers)
        if st.st_size <= READ_ON_LOOP_MAX:
            read = _read_small(path)
            if read is not None:
                data, st = read
                recent.put(key, st, data)
                return MemoryFileResponse(data, st, headers)
    return PlainFileResponse(path, headers=headers)


def _read_small(path: Path) -> tuple[bytes, os.stat_result] | None:
    """The content and fstat of a small regular file (no link followed), or None when it is
    not one any more or changed while read (FileResponse then answers, as it would have)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > READ_ON_LOOP_MAX:
            return None
        data = os.read(fd, st.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return (data, st) if len(data) == st.st_size else None


class PlainFileResponse(web.FileResponse):
    """FileResponse that serves the file asked for, never a ``.gz``/``.br`` sibling as its
    Content-Encoding (and spares the lstat of each)."""

    def _get_file_path_stat_encoding(
        self, accept_encoding: str
    ) -> tuple[Path | None, os.stat_result, str | None]:
        return super()._get_file_path_stat_encoding("")


def _etag_match(etag_value: str, etags: tuple[ETag, ...], *, weak: bool) -> bool:
    if len(etags) == 1 and etags[0].value == ETAG_ANY:
        return True
    return any(etag.value == etag_value for etag in etags if weak or not etag.is_weak)


class MemoryFileResponse(web.StreamResponse):
    """FileResponse's answer for a file whose content is in hand (``data``, with ``st`` the stat
    it was read or checked with): its ``prepare`` is FileResponse's, step for step, with the
    body written from memory (in the same send as the headers) instead of by sendfile."""

    # The headers wait for the body (or the end) and leave in one send.
    _send_headers_immediately = False

    def __init__(self, data: bytes, st: os.stat_result, headers: Mapping[str, str]) -> None:
        super().__init__(headers=headers)
        self._data = data
        self._st = st

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        st = self._st
        etag_value = f"{st.st_mtime_ns:x}-{st.st_size:x}"
        # https://www.rfc-editor.org/rfc/rfc9110#section-13.1.1-2
        if (ifmatch := request.if_match) is not None and not _etag_match(
            etag_value, ifmatch, weak=False
        ):
            return await self._precondition_failed(request)
        if (
            (unmodsince := request.if_unmodified_since) is not None
            and ifmatch is None
            and st.st_mtime > unmodsince.timestamp()
        ):
            return await self._precondition_failed(request)
        # https://www.rfc-editor.org/rfc/rfc9110#section-13.1.2-2
        if (ifnonematch := request.if_none_match) is not None and _etag_match(
            etag_value, ifnonematch, weak=True
        ):
            return await self._not_modified(request, etag_value, st.st_mtime)
        if (
            (modsince := request.if_modified_since) is not None
            and ifnonematch is None
            and st.st_mtime <= modsince.timestamp()
        ):
            return await self._not_modified(request, etag_value, st.st_mtime)
        return await self._send(request, etag_value)

    async def _precondition_failed(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self.set_status(412)
        self.content_length = 0
        return await super().prepare(request)

    async def _not_modified(
        self, request: web.BaseRequest, etag_value: str, last_modified: float
    ) -> AbstractStreamWriter | None:
        self.set_status(304)
        self._length_check = False
        self.etag = etag_value
        self.last_modified = last_modified
        return await super().prepare(request)

    async def _send(self, request: web.BaseRequest, etag_value: str) -> AbstractStreamWriter | None:
        status = self.status
        file_size = self._st.st_size
        file_mtime = self._st.st_mtime
        count = file_size
        start: int | None = None
        if (ifrange := request.if_range) is None or file_mtime <= ifrange.timestamp():
            try:
                rng = request.http_range
                start = rng.start
                end: int | None = rng.stop
            except ValueError:
                # rfc7233: a 416 carries the complete length in an unsatisfied Content-Range.
                self._headers[hdrs.CONTENT_RANGE] = f"bytes */{file_size}"
                self.set_status(416)
                return await super().prepare(request)
            if start is not None:
                if start < 0 and end is None:  # the tail of the file
                    start = max(start + file_size, 0)
                    count = file_size - start
                else:
                    count = min(end if end is not None else file_size, file_size) - start
                if start >= file_size:
                    self._headers[hdrs.CONTENT_RANGE] = f"bytes */{file_size}"
                    self.set_status(416)
                    return await super().prepare(request)
                status = 206
                self.set_status(status)
        self.etag = etag_value
        self.last_modified = file_mtime
        self.content_length = count
        self._headers[hdrs.ACCEPT_RANGES] = "bytes"
        if status == 206:
            assert start is not None
            self._headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{start + count - 1}/{file_size}"
        if count == 0 or must_be_empty_body(request.method, status):
            return await super().prepare(request)
        offset = start or 0
        writer = await super().prepare(request)
        data = self._data
        # A range of a small file: the copy costs less than a hop.
        await super().write_eof(data if count == len(data) else data[offset : offset + count])
        return writer
