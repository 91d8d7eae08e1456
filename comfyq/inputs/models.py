"""Models and LoRAs by URL (``input.models``): downloaded before the workflow is submitted into the
local ComfyUI's models directory (``COMFYUI_MODELS_DIR``), where ComfyUI finds them by file name.

- Through the SSRF-guarded :class:`~comfyq.inputs.Downloader` (its own instance: a size cap of its
  own, model file types only, a staging cache inside the models directory so the final move is a
  rename on one file system).
- Jobs asking for the same file at once share one download; a file already in place is reused.
- A given ``sha256`` is verified; a mismatch deletes the download and fails the job.
- A manifest (``.comfyq-models.json`` in the models directory) lists the files comfyq downloaded,
  with their size and last use. Over the ``COMFYQ_MODEL_CACHE_GB`` budget, the least recently used
  of them are deleted; a file comfyq did not download is never touched, and the file a job is
  being prepared with is never evicted for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from yarl import URL

from comfyq.errors import InputError
from comfyq.inputs.downloader import Downloader
from comfyq.netguard import AddressGuard
from comfyq.schemas import ModelFolder

log = logging.getLogger("comfyq.inputs.models")

# ComfyUI's model folders (folder_paths), the ones a URL download may target.
FOLDERS: tuple[str, ...] = get_args(ModelFolder)
MODEL_TYPES = ("application/x-safetensors", "application/x-gguf")
FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ +-]{0,199}")
MANIFEST = ".comfyq-models.json"
STAGING = ".comfyq-downloads"
GiB = 1024**3


@dataclass
class Entry:
    """A file comfyq downloaded into the models directory."""

    url: str
    sha256: str
    size: int
    last_used: float


def filename_for(ref: dict[str, Any]) -> str:
    """The file name a model reference ends up under: ``filename``, else the URL's last part."""
    name = ref.get("filename") or URL(str(ref.get("url") or "")).name
    return str(name)


def admission_errors(
    refs: list[dict[str, Any]], models_dir: str, guard: AddressGuard
) -> list[dict[str, str]]:
    """Why ``input.models`` cannot be served (no models directory, a bad name or URL), by field."""
    if not refs:
        return []
    if not models_dir:
        return [
            {
                "path": "$.input.models",
                "message": "this server has no local models directory (COMFYUI_MODELS_DIR), so"
                " it cannot fetch models by URL",
            }
        ]
    errors: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, ref in enumerate(refs):
        path = f"$.input.models[{i}]"
        try:
            guard.check_url_syntax(str(ref.get("url")))
        except InputError as exc:
            errors.append({"path": f"{path}.url", "message": exc.message})
            continue
        name = filename_for(ref)
        if not FILENAME.fullmatch(name) or ".." in name:
            errors.append(
                {
                    "path": f"{path}.filename",
                    "message": "a plain file name is needed (letters, digits, . _ - + and space;"
                    " taken from the URL when not given)",
                }
            )
            continue
        key = f"{ref.get('folder')}/{name}"
        if key in seen:
            errors.append({"path": f"{path}.filename", "message": f"{key} is listed twice"})
        seen.add(key)
    return errors


class ModelStore:
    """Downloads models into ``models_dir/<folder>/<file>`` with a shared, budgeted cache."""

    def __init__(
        self,
        models_dir: Path,
        guard: AddressGuard,
        *,
        budget_bytes: int,
        max_bytes: int,
        total_timeout: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.budget_bytes = budget_bytes
        self.clock = clock
        self.downloader = Downloader(
            self.models_dir / STAGING,
            guard,
            max_bytes=max_bytes,
            total_timeout=total_timeout,
            read_timeout=300,
            allowed_types=MODEL_TYPES,
            cache_ttl=0,
        )
        self._entries: dict[str, Entry] = {}
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._loaded = False
        self._lock = asyncio.Lock()
        self.downloads = 0
        self.evicted: list[str] = []

    # --- public -------------------------------------------------------------------------------

    async def ensure_all(self, refs: list[dict[str, Any]]) -> list[Path]:
        """Make every referenced model present; InputError naming the entry when one cannot be."""
        await self._load()
        keys = [self._key(r) for r in refs]
        tasks = [self._shared(key, ref, i) for i, (key, ref) in enumerate(zip(keys, refs))]
        paths = await asyncio.gather(*tasks)
        async with self._lock:
            now = self.clock()
            for key in keys:
                if key in self._entries:
                    self._entries[key].last_used = now
            await self._evict(protect=set(keys))
            await self._save()
        return list(paths)

    async def close(self) -> None:
        for t in list(self._inflight.values()):
            t.cancel()
        await self.downloader.close()

    def stats(self) -> dict[str, int]:
        """For /metrics: bytes kept, the budget, downloads and evictions so far."""
        return {
            "bytes": self.usage(),
            "budget": self.budget_bytes,
            "downloads": self.downloads,
            "evictions": len(self.evicted),
        }

    def usage(self) -> int:
        """Bytes of the models comfyq downloaded and still keeps."""
        return sum(e.size for e in self._entries.values())

    # --- internals ------------------------------------------------------------------------------

    @staticmethod
    def _key(ref: dict[str, Any]) -> str:
        return f"{ref['folder']}/{filename_for(ref)}"

    async def _shared(self, key: str, ref: dict[str, Any], index: int) -> Path:
        # No await between the lookup and the registration: concurrent jobs share one task.
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ensure(key, ref), name=f"model {key}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        try:
            return await asyncio.shield(task)
        except InputError as exc:
            raise InputError(
                f"model {key}: {exc.message}",
                details=exc.details,
                fields=[{"path": f"$.input.models[{index}]", "message": exc.message}],
            ) from None

    async def _ensure(self, key: str, ref: dict[str, Any]) -> Path:
        final = self.models_dir / key
        want = (ref.get("sha256") or "").lower() or None
        entry = self._entries.get(key)
        if await asyncio.to_thread(final.is_file):
            if entry is not None:
                if want is None or want == entry.sha256:
                    return final
                raise InputError(
                    f"{key} is already there with sha256 {entry.sha256}, not {want}"
                    " (use another filename)"
                )
            if want is not None and await asyncio.to_thread(_sha256, final) != want:
                # Not ours: never replaced, whatever the request says.
                raise InputError(f"{key} exists (not downloaded by comfyq) with another sha256")
            return final
        asset = await self.downloader.fetch(str(ref["url"]))
        if want is not None and asset.sha256 != want:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.remove, asset.path)
            raise InputError(
                f"downloaded file has sha256 {asset.sha256}, not the expected {want}",
                details={"expected": want, "got": asset.sha256},
            )
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(os.replace, asset.path, final)  # one file system: a rename
        self.downloads += 1
        async with self._lock:
            self._entries[key] = Entry(str(ref["url"]), asset.sha256, asset.size, self.clock())
            await self._save()
        log.info("model %s downloaded (%d bytes, sha256 %s)", key, asset.size, asset.sha256[:16])
        return final

    async def _evict(self, protect: set[str]) -> None:
        over = self.usage() - self.budget_bytes
        if over <= 0:
            return
        for key, entry in sorted(self._entries.items(), key=lambda kv: kv[1].last_used):
            if over <= 0:
                break
            if key in protect or key in self._inflight:
                continue
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.remove, self.models_dir / key)
            del self._entries[key]
            over -= entry.size
            self.evicted.append(key)
            log.info(
                "model %s evicted (least recently used; budget %d bytes)", key, self.budget_bytes
            )
        if over > 0:
            log.warning(
                "models downloaded by comfyq use %d bytes, over the %d-byte budget: the rest is in"
                " use by the job being prepared",
                self.usage(),
                self.budget_bytes,
            )

    async def _load(self) -> None:
        if self._loaded:
            return
        async with self._lock:
            if self._loaded:
                return
            path = self.models_dir / MANIFEST
            try:
                raw = json.loads(await asyncio.to_thread(path.read_text))
            except FileNotFoundError:
                raw = {}
            except (OSError, ValueError) as exc:
                log.warning("model manifest %s unreadable (%s): starting a new one", path, exc)
                raw = {}
            for key, e in (raw.get("files") or {}).items() if isinstance(raw, dict) else []:
                try:
                    entry = Entry(
                        str(e["url"]), str(e["sha256"]), int(e["size"]), float(e["last_used"])
                    )
                except (KeyError, TypeError, ValueError):
                    continue
                if (self.models_dir / key).is_file():
                    self._entries[key] = entry
            self._loaded = True

    async def _save(self) -> None:
        data = {"files": {k: vars(e) for k, e in self._entries.items()}}
        await asyncio.to_thread(
            _write_atomic, self.models_dir / MANIFEST, json.dumps(data, indent=1)
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
