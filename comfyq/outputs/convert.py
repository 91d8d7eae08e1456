"""Output conversion with Pillow: PNG, JPEG or WebP at a quality, optionally scaled down so that
its longer side is at most ``max_side``; and thumbnails made the same way.

Only still images are converted (PNG, JPEG, WebP, BMP, TIFF); animations, video, audio and text
are left as they are. A conversion that fails keeps the original file (the caller adds a
warning). Everything here blocks: run it in a thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"png": ("PNG", "image/png", ".png"), "jpeg": ("JPEG", "image/jpeg", ".jpg")}
FORMATS["webp"] = ("WEBP", "image/webp", ".webp")
CONVERTIBLE = frozenset({"image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff"})
MAX_PIXELS = 200_000_000  # a bigger "image" is refused rather than decoded


class ConversionError(Exception):
    """The file could not be converted; the message says why."""


@dataclass(frozen=True)
class ConvertSpec:
    """What a job asked for: ``format`` png, jpeg or webp, ``quality`` 1-100, ``max_side``
    (0: any)."""

    format: str
    quality: int = 90
    max_side: int = 0

    @classmethod
    def of(cls, request: dict[str, Any] | None, default: ConvertSpec | None) -> ConvertSpec | None:
        """The job's ``input.convert`` (format ``original``: none), else the operator's default."""
        if not request:
            return default
        fmt = str(request.get("format") or (default.format if default else "original"))
        if fmt == "original":
            return None
        base = default or ConvertSpec(fmt)
        side = request.get("max_side")
        return cls(
            fmt,
            int(request.get("quality") or base.quality),
            int(side) if side is not None else base.max_side,
        )


def wants(spec: ConvertSpec, mime: str) -> bool:
    """Whether a file of type ``mime`` is converted under ``spec``."""
    return mime in CONVERTIBLE and (FORMATS[spec.format][1] != mime or spec.max_side > 0)


def _save(im: Image.Image, dest: Path, spec: ConvertSpec) -> None:
    pil_format = FORMATS[spec.format][0]
    if spec.max_side and max(im.size) > spec.max_side:
        im.thumbnail((spec.max_side, spec.max_side), Image.Resampling.LANCZOS)
    if pil_format == "JPEG" and im.mode not in ("RGB", "L"):
        if "A" in im.getbands() or im.mode == "P":
            rgba = im.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))  # JPEG has no alpha: on white
            flat.paste(rgba, mask=rgba.getchannel("A"))
            im = flat
        else:
            im = im.convert("RGB")
    kwargs: dict[str, Any] = {}
    if pil_format in ("JPEG", "WEBP"):
        kwargs["quality"] = spec.quality
    if pil_format == "PNG":
        kwargs["optimize"] = True
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        im.save(tmp, pil_format, **kwargs)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def converted_name(name: str, spec: ConvertSpec) -> str:
    """The file name of ``name`` once converted (same stem, the format's extension)."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return stem + FORMATS[spec.format][2]


def convert_file(src: Path, dest: Path, spec: ConvertSpec) -> None:
    """Write ``src`` converted to ``dest``; the original is removed once ``dest`` is in place
    (unless they are the same file)."""
    try:
        with Image.open(src) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ConversionError("animated images are not converted")
            if im.width * im.height > MAX_PIXELS:
                raise ConversionError(f"{im.width}x{im.height} is too large to convert")
            im.load()
            _save(ImageOps.exif_transpose(im) or im, dest, spec)
    except ConversionError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ConversionError(f"{type(exc).__name__}: {exc}") from None
    if dest != src:
        src.unlink(missing_ok=True)


def thumbnail(src: Path, dest: Path, max_side: int, fmt: str = "webp", quality: int = 80) -> Path:
    """A thumbnail of ``src`` at ``dest`` (made once; reused while newer than ``src``)."""
    try:
        if dest.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            return dest
    except FileNotFoundError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = ConvertSpec(fmt, quality, max_side)
    try:
        with Image.open(src) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ConversionError(f"{im.width}x{im.height} is too large for a thumbnail")
            im.seek(0)  # the first frame of an animation
            frame = im.convert("RGBA") if fmt != "jpeg" else im.convert("RGB")
            _save(frame, dest, spec)
    except ConversionError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ConversionError(f"{type(exc).__name__}: {exc}") from None
    return dest
