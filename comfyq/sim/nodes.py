"""How each simulated node runs: solid-colour images carried through the graph, real PNG files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import zlib
from typing import Any

from .env import BIG_FILE, SimEnv, read_file, write_file, write_sync
from .png import UnidentifiedImageError, encode_png, sniff_image
from .types import (
    NodeFailure,
    RunContext,
    RunResult,
    SimConditioning,
    SimImage,
    SimLatent,
    SimMask,
    SimModelPart,
)
from .ws import _dumps as dumps

_THREAD_PIXELS = 1 << 18  # encode PNGs bigger than this off the event loop


def _want(value: Any, kind: type, attr: str = "shape") -> Any:
    # A constant where a link was expected passes ComfyUI's validation and fails at run time.
    if not isinstance(value, kind):
        raise NodeFailure(
            "AttributeError", f"'{type(value).__name__}' object has no attribute '{attr}'"
        )
    return value


async def png_bytes(
    width: int,
    height: int,
    rgb: tuple[int, int, int],
    texts: dict[str, str] | None = None,
    level: int = 1,
) -> bytes:
    """Encode a solid PNG, in a thread when it is large."""
    if width * height >= _THREAD_PIXELS:
        return await asyncio.to_thread(encode_png, width, height, rgb, texts, level)
    return encode_png(width, height, rgb, texts, level)


async def run_empty_image(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """EmptyImage: `color` is 0xRRGGBB."""
    c = int(a["color"])
    rgb = ((c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF)
    return (SimImage(int(a["width"]), int(a["height"]), int(a["batch_size"]), rgb),), None


async def run_invert(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """ImageInvert."""
    img = _want(a["image"], SimImage)
    r, g, b = img.rgb
    return (SimImage(img.width, img.height, img.batch, (255 - r, 255 - g, 255 - b)),), None


async def run_scale(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """ImageScale; a zero width or height keeps the aspect ratio like ComfyUI."""
    img = _want(a["image"], SimImage)
    w, h = int(a["width"]), int(a["height"])
    if w == 0 and h == 0:
        return (img,), None
    if w == 0:
        w = max(1, round(img.width * h / img.height))
    elif h == 0:
        h = max(1, round(img.height * w / img.width))
    return (SimImage(w, h, img.batch, img.rgb),), None


async def run_passthrough_image(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """ImageBlur on a solid image changes nothing visible."""
    return (_want(a["image"], SimImage),), None


async def run_get_size(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """GetImageSize: also shows the size on the node via a binary TEXT frame."""
    img = _want(a["image"], SimImage)
    await ctx.text(f"width: {img.width}, height: {img.height}\n batch size: {img.batch}")
    return (img.width, img.height, img.batch), None


async def _save(
    ctx: RunContext, images: Any, prefix: str, base_dir: str, kind: str, level: int
) -> RunResult:
    img = _want(images, SimImage)
    env: SimEnv = ctx.env
    folder, stem, counter, subfolder = env.save_path(prefix, base_dir, img.width, img.height)
    texts = {"prompt": dumps(ctx.prompt)}  # json.dumps's text, one cached encoder
    pnginfo = ctx.extra_data.get("extra_pnginfo")
    if isinstance(pnginfo, dict):
        texts.update({k: dumps(v) for k, v in pnginfo.items()})
    if img.width * img.height < _THREAD_PIXELS:  # small: no coroutine, no thread
        data = encode_png(img.width, img.height, img.rgb, texts, level)
    else:
        data = await png_bytes(img.width, img.height, img.rgb, texts, level)
    results = []
    for batch_number in range(img.batch):
        name = f"{stem.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        path = os.path.join(folder, name)
        if len(data) < BIG_FILE:
            write_sync(path, data)
        else:
            await write_file(path, data)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    env.advance_counter(folder, stem, counter)
    return (), {"images": results}


async def run_save_image(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """SaveImage into output/."""
    return await _save(
        ctx, a["images"], str(a.get("filename_prefix", "ComfyUI")), ctx.env.output_dir, "output", 4
    )


async def run_preview_image(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """PreviewImage into temp/ with ComfyUI's random `_temp_xxxxx` suffix (stable per node)."""
    suffixes: dict[str, str] = ctx.env.preview_suffixes
    suffix = suffixes.get(ctx.node_id)
    if suffix is None:
        suffix = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        suffixes[ctx.node_id] = suffix
    return await _save(ctx, a["images"], "ComfyUI" + suffix, ctx.env.temp_dir, "temp", 1)


async def run_save_websocket(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """SaveImageWebsocket: one progress tick and one binary preview frame per image."""
    img = _want(a["images"], SimImage)
    data = await png_bytes(img.width, img.height, img.rgb)
    per = ctx.duration / img.batch if img.batch else 0.0
    for step in range(img.batch):
        await ctx.sleep(per)
        await ctx.tick(step, img.batch, data)
    return (), None


async def _load(ctx: RunContext, name: Any) -> tuple[str, Any]:
    path = ctx.env.annotated_path(str(name))
    try:
        data = await read_file(path)
    except FileNotFoundError:
        raise NodeFailure(
            "FileNotFoundError", f"[Errno 2] No such file or directory: '{path}'"
        ) from None
    try:
        return path, sniff_image(data)
    except UnidentifiedImageError:
        raise NodeFailure(
            "PIL.UnidentifiedImageError", f"cannot identify image file '{path}'"
        ) from None


async def run_load_image(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """LoadImage: real header parsing, so a corrupt upload fails like PIL does."""
    _, info = await _load(ctx, a["image"])
    mask = SimMask(info.width, info.height, 1) if info.has_alpha else SimMask(64, 64, 1)
    return (SimImage(info.width, info.height, 1, info.rgb), mask), None


async def run_load_image_mask(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """LoadImageMask."""
    _, info = await _load(ctx, a["image"])
    return (SimMask(info.width, info.height, 1),), None


def file_hash(env: SimEnv, inputs: dict[str, Any]) -> str:
    """IS_CHANGED of LoadImage: sha256 of the file, so a replaced upload re-runs the node."""
    with open(env.annotated_path(str(inputs.get("image"))), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def run_checkpoint(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """CheckpointLoaderSimple: no weights, just named handles."""
    name = str(a["ckpt_name"])
    return (
        SimModelPart("MODEL", name),
        SimModelPart("CLIP", name),
        SimModelPart("VAE", name),
    ), None


async def run_clip_encode(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """CLIPTextEncode."""
    _want(a["clip"], SimModelPart, "tokenize")
    return (SimConditioning(str(a["text"])),), None


async def run_empty_latent(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """EmptyLatentImage: latents are 1/8 of the pixel size, so sizes round down to 8."""
    w, h = int(a["width"]) // 8 * 8, int(a["height"]) // 8 * 8
    return (SimLatent(w, h, int(a["batch_size"]), (0, 0, 0)),), None


async def run_ksampler(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """KSampler: `steps` progress ticks (value 1..steps); the colour depends on every setting."""
    latent = _want(a["latent_image"], SimLatent)
    model = _want(a["model"], SimModelPart)
    pos = _want(a["positive"], SimConditioning)
    neg = _want(a["negative"], SimConditioning)
    steps = int(a["steps"])
    per = ctx.duration / steps if steps else 0.0
    for step in range(steps):
        await ctx.sleep(per)
        await ctx.tick(step + 1, steps)
    key = "|".join(
        str(v)
        for v in (
            model.ckpt,
            a["seed"],
            steps,
            a["cfg"],
            a["sampler_name"],
            a["scheduler"],
            pos.text,
            neg.text,
            a["denoise"],
        )
    )
    c = zlib.crc32(key.encode())
    rgb = ((c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF)
    return (SimLatent(latent.width, latent.height, latent.batch, rgb),), None


async def run_vae_decode(ctx: RunContext, a: dict[str, Any]) -> RunResult:
    """VAEDecode."""
    latent = _want(a["samples"], SimLatent)
    _want(a["vae"], SimModelPart, "decode")
    return (SimImage(latent.width, latent.height, latent.batch, latent.rgb),), None
