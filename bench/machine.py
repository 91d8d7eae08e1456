"""What the benchmarks ran on: CPU, memory, OS, the Python stack and the data directory's disk."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _mount_of(path: Path) -> dict[str, str]:
    """The /proc/mounts entry holding ``path`` (longest matching mount point)."""
    best: dict[str, str] = {}
    real = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, point, fstype, opts = line.split()[:4]
            point = point.replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best.get("mount", "")):
                best = {"device": dev, "mount": point, "fstype": fstype, "options": opts}
    except OSError:
        pass
    return best


def _rotational(device: str) -> str | None:
    """sysfs's rotational flag ('0' or '1') of a block device named in /proc/mounts, if any."""
    name = Path(device).name
    for cand in (
        name,
        name.rstrip("0123456789"),
        name.split("p")[0] if name.startswith("nvme") else name,
    ):
        f = Path(f"/sys/block/{cand}/queue/rotational")
        if f.exists():
            return f.read_text().strip()
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return out + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe(data_dir: Path, repo: Path) -> dict[str, Any]:
    """A JSON-ready description of this machine, with ``data_dir``'s file system."""
    uname = platform.uname()
    disk = _mount_of(data_dir)
    if disk.get("device", "").startswith("/dev/"):
        rotational = _rotational(disk["device"])
        if rotational is not None:
            disk["rotational"] = rotational  # virtual disks often say 1 whatever lies beneath
    st = os.statvfs(data_dir)
    disk["free_gib"] = f"{st.f_bavail * st.f_frsize / 1024**3:.1f}"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _mem_total_gib(),
        "os": _os_name(),
        "kernel": f"{uname.system} {uname.release} ({uname.machine})",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "aiohttp": _version("aiohttp"),
        "aiosqlite": _version("aiosqlite"),
        "msgspec": _version("msgspec"),
        "comfyq": _version("comfyq"),
        "git_commit": _git_commit(repo),
        "data_dir": str(data_dir),
        "data_disk": disk,
        "load_avg_at_start": list(os.getloadavg()),
    }
