"""Small output files this process wrote (or read) lately, kept in memory by path.

``GET /outputs`` answers such a file from here instead of through aiohttp's FileResponse, which
opens, stats and closes the file in the default executor (two thread hops per download, each a
GIL hand-off on both threads) before a sendfile. An entry is used only while the file on disk is
still the one kept: the same device, inode, size, modification and change times as the
``lstat`` the download handler makes anyway (outputs are written through a ``.part`` file and a
rename, so a rewritten output is a new inode; a rename or chmod changes the change time).

Bounded by count and by bytes, least recently used first out; touched only from the event loop.
"""

from __future__ import annotations

import os
from collections import OrderedDict

MAX_FILE = 1 << 20  # bytes: a file over this is served by sendfile, never kept
MAX_BYTES = 8 << 20  # bytes kept in all
MAX_FILES = 1024

_Key = tuple[int, int, int, int, int]


def _key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RecentFiles:
    def __init__(
        self, *, max_file: int = MAX_FILE, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES
    ) -> None:
        self.max_file = max_file
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.size = 0
        self._files: OrderedDict[str, tuple[_Key, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._files)

    def put(self, path: str, st: os.stat_result, data: bytes) -> None:
        """Keep ``data`` as the content of ``path`` whose stat (after it was written) is ``st``."""
        self.discard(path)
        if len(data) != st.st_size or len(data) > self.max_file:
            return
        self._files[path] = (_key(st), data)
        self.size += len(data)
        while self.size > self.max_bytes or len(self._files) > self.max_files:
            _, (_, old) = self._files.popitem(last=False)
            self.size -= len(old)

    def get(self, path: str, st: os.stat_result) -> bytes | None:
        """The kept content of ``path`` if the file is still the one kept (``st``: its lstat now);
        a stale entry is dropped."""
        hit = self._files.get(path)
        if hit is None:
            return None
        if hit[0] != _key(st):
            self.discard(path)
            return None
        self._files.move_to_end(path)
        return hit[1]

    def discard(self, path: str) -> None:
        old = self._files.pop(path, None)
        if old is not None:
            self.size -= len(old[1])

    def clear(self) -> None:
        self._files.clear()
        self.size = 0


# One per process: keyed by absolute path and checked against the file itself, so servers
# sharing a process (tests) cannot see each other's entries as their own.
RECENT = RecentFiles()
