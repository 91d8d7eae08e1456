"""The simulator's file system side: input/output/temp folders, annotated names, save counters."""

from __future__ import annotations

import asyncio
import mimetypes
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path

from .types import NodeFailure

DEFAULT_CHECKPOINTS = ("sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors")
BIG_FILE = 1 << 20


class SimEnv:
    """Folders and per-prefix file counters of one simulated ComfyUI installation."""

    def __init__(self, data_dir: Path) -> None:
        # commonpath() checks of uploads and /view compare against these: keep them absolute.
        data_dir = data_dir.resolve()
        self.data_dir = data_dir
        self.input_dir = str(data_dir / "input")
        self.output_dir = str(data_dir / "output")
        self.temp_dir = str(data_dir / "temp")
        self.checkpoints_dir = str(data_dir / "models" / "checkpoints")
        self._dirs = {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}
        self._counters: dict[tuple[str, str], int] = {}
        # (prefix, base dir) -> (folder, file stem, subfolder, counter key) of a checked prefix
        self._resolved: dict[tuple[str, str], tuple[str, str, str, tuple[str, str]]] = {}
        # PreviewImage keeps one random suffix per node id, like ComfyUI's cached node objects.
        self.preview_suffixes: dict[str, str] = {}
        for d in (self.input_dir, self.output_dir, self.temp_dir):
            os.makedirs(d, exist_ok=True)

    def wipe_temp(self) -> None:
        """ComfyUI empties temp/ at startup."""
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        os.makedirs(self.temp_dir, exist_ok=True)
        self._counters.clear()

    def dir_for_type(self, kind: str | None) -> str | None:
        """Folder for an upload/view `type`; None for an unknown type."""
        return self._dirs.get(kind or "")

    def split_annotation(self, name: str) -> tuple[str, str | None]:
        """(name, folder) for `x.png [output]`-style names; folder None without annotation."""
        if not name.endswith("]"):
            return name, None
        for kind in ("output", "input", "temp"):
            suffix = f" [{kind}]"
            if name.endswith(suffix):
                return name[: -len(suffix)], self.dir_for_type(kind)
        return name, None

    def annotated(self, name: str, default: str = "input") -> tuple[str, str]:
        """Like split_annotation, with `default`'s folder for names without annotation."""
        base, folder = self.split_annotation(name)
        return base, folder or self.dir_for_type(default) or self.input_dir

    def annotated_path(self, name: str) -> str:
        """Absolute path of an input file named like LoadImage's `image` widget."""
        base, folder = self.annotated(name)
        return os.path.join(folder, base)

    def input_images(self) -> list[str]:
        """Sorted image files at the top of input/, as LoadImage lists them."""
        try:
            names = os.listdir(self.input_dir)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            mime = mimetypes.guess_type(n)[0] or ""
            if mime.startswith("image/") and os.path.isfile(os.path.join(self.input_dir, n)):
                out.append(n)
        return sorted(out)

    def input_files(self) -> list[str]:
        """Sorted files at the top of input/ (LoadImageMask lists every file)."""
        try:
            return sorted(
                n
                for n in os.listdir(self.input_dir)
                if os.path.isfile(os.path.join(self.input_dir, n))
            )
        except FileNotFoundError:
            return []

    def checkpoints(self) -> list[str]:
        """Pretend checkpoint names plus any file placed in models/checkpoints/."""
        names = set(DEFAULT_CHECKPOINTS)
        if os.path.isdir(self.checkpoints_dir):
            names.update(
                n
                for n in os.listdir(self.checkpoints_dir)
                if os.path.isfile(os.path.join(self.checkpoints_dir, n))
            )
        return sorted(names)

    def save_path(
        self, prefix: str, base_dir: str, width: int, height: int
    ) -> tuple[str, str, int, str]:
        """Resolve a filename prefix like ComfyUI: (folder, file stem, next counter, subfolder)."""
        if "%" in prefix:
            prefix = _compute_vars(prefix, width, height)
        else:  # a fixed prefix resolves the same every time: only the counter moves
            hit = self._resolved.get((prefix, base_dir))
            if hit is not None:
                folder, filename, subfolder, key = hit
                counter = self._counters.get(key)
                if counter is not None:
                    return folder, filename, counter, subfolder
        norm = os.path.normpath(prefix)
        subfolder = os.path.dirname(norm)
        filename = os.path.basename(norm)
        folder = os.path.join(base_dir, subfolder)
        if os.path.commonpath((base_dir, os.path.abspath(folder))) != base_dir:
            raise NodeFailure(
                "Exception",
                "**** ERROR: Saving image outside the output folder is not allowed."
                "\n full_output_folder: "
                + os.path.abspath(folder)
                + "\n         output_dir: "
                + base_dir
                + "\n         commonpath: "
                + os.path.commonpath((base_dir, os.path.abspath(folder))),
            )
        key = (os.path.abspath(folder), os.path.normcase(filename))
        counter = self._counters.get(key)
        if counter is None:
            # Scan once per prefix, then count in memory: a listdir per save would make
            # benchmarks with thousands of outputs quadratic.
            counter = _scan_counter(folder, filename)
        if "%" not in prefix:
            self._resolved[(prefix, base_dir)] = (folder, filename, subfolder, key)
        return folder, filename, counter, subfolder

    def advance_counter(self, folder: str, filename: str, next_counter: int) -> None:
        """Remember the next free counter for a prefix after files were written."""
        self._counters[(os.path.abspath(folder), os.path.normcase(filename))] = next_counter


def _compute_vars(text: str, width: int, height: int) -> str:
    text = text.replace("%width%", str(width)).replace("%height%", str(height))
    now = time.localtime()
    for key, value in (
        ("%year%", str(now.tm_year)),
        ("%month%", f"{now.tm_mon:02}"),
        ("%day%", f"{now.tm_mday:02}"),
        ("%hour%", f"{now.tm_hour:02}"),
        ("%minute%", f"{now.tm_min:02}"),
        ("%second%", f"{now.tm_sec:02}"),
    ):
        text = text.replace(key, value)
    return text


def _scan_counter(folder: str, filename: str) -> int:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return 1
    plen = len(filename)
    best = 0
    found = False
    for name in names:
        head = name[: plen + 1]
        if len(head) != plen + 1 or head[-1] != "_":
            continue
        if os.path.normcase(head[:-1]) != os.path.normcase(filename):
            continue
        try:
            digits = int(name[plen + 1 :].split("_")[0])
        except ValueError:
            digits = 0
        best = max(best, digits)
        found = True
    return best + 1 if found else 1


# Small files this process wrote lately, by path: (mtime_ns, size, bytes). GET /view answers
# them from memory while the file on disk is still the one written (same mtime and size), which
# spares a thread hand-off, an open and a sendfile per output download.
_RECENT: OrderedDict[str, tuple[int, int, bytes]] = OrderedDict()
_RECENT_MAX_FILES = 256
_RECENT_MAX_SIZE = 256 << 10


async def write_file(path: str, data: bytes) -> None:
    """Write bytes; big payloads go to a thread so the event loop keeps serving."""
    if len(data) >= BIG_FILE:
        await asyncio.to_thread(write_sync, path, data)
    else:
        write_sync(path, data)


def write_sync(path: str, data: bytes) -> None:
    # os.open/os.write: what open(path, "wb") does without its buffer object and the isatty
    # ioctl, lseek and extra fstat it makes per file (one output file per simulated job).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if len(data) <= _RECENT_MAX_SIZE:
        _RECENT[path] = (st.st_mtime_ns, st.st_size, data)
        _RECENT.move_to_end(path)
        while len(_RECENT) > _RECENT_MAX_FILES:
            _RECENT.popitem(last=False)
    else:
        _RECENT.pop(path, None)


def recent_bytes(path: str, st: os.stat_result) -> bytes | None:
    """The bytes of ``path`` if this process wrote them lately and the file is unchanged."""
    hit = _RECENT.get(path)
    if hit is None or hit[0] != st.st_mtime_ns or hit[1] != st.st_size:
        return None
    return hit[2]


async def read_file(path: str) -> bytes:
    """Read a file, in a thread when it is big."""
    if os.path.getsize(path) >= BIG_FILE:
        return await asyncio.to_thread(Path(path).read_bytes)
    return Path(path).read_bytes()
