"""ImageEffects: a model-free workflow (built-in image nodes only) for demos and tests.

Source: an ``input_image`` (URL or a name from ``input.images``) loaded and optionally scaled, or
else a solid ``color`` image of ``width`` x ``height``. Then optional invert and blur, then save.
A stock ComfyUI runs it without any model weights.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from modifiers.basemodifier import BaseModifier, ModificationError

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
MAX_SIDE = 16384
PREFIX_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,127}$"

Side = Annotated[int, Meta(ge=0, le=MAX_SIDE)]


class ImageEffectsParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Parameters of ImageEffects."""

    input_image: Annotated[
        str | None,
        Meta(
            description="source image: an http(s) URL or the name of an input.images entry;"
            " absent: a solid color image",
            examples=["https://example.com/cat.png"],
        ),
    ] = None
    width: Annotated[
        Side | None,
        Meta(description="width in pixels (0 with input_image: keep the aspect ratio)"),
    ] = None
    height: Annotated[
        Side | None,
        Meta(description="height in pixels (0 with input_image: keep the aspect ratio)"),
    ] = None
    color: Annotated[
        Annotated[int, Meta(ge=0, le=0xFFFFFF)]
        | Annotated[str, Meta(pattern=r"^#?[0-9A-Fa-f]{6}$")],
        Meta(description="solid color as 0xRRGGBB or '#rrggbb'", examples=["#ff8000"]),
    ] = 0
    batch_size: Annotated[int, Meta(ge=1, le=64, description="images per run")] = 1
    invert: Annotated[bool, Meta(description="invert the colors")] = True
    blur_radius: Annotated[int, Meta(ge=0, le=31, description="0: no blur")] = 0
    sigma: Annotated[float, Meta(ge=0.1, le=10.0, description="blur strength")] = 1.0
    upscale_method: Annotated[
        Literal["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],
        Meta(description="how input_image is scaled"),
    ] = "bilinear"
    crop: Annotated[Literal["disabled", "center"], Meta(description="crop when scaling")] = (
        "disabled"
    )
    filename_prefix: Annotated[
        str, Meta(pattern=PREFIX_PATTERN, description="SaveImage prefix (relative, no '..')")
    ] = "comfyq_effects"


class ImageEffects(BaseModifier):
    """Nodes: 1 EmptyImage | 10 LoadImage, 11 ImageScale; 2 ImageInvert; 3 ImageBlur; 9 SaveImage"""

    WORKFLOW_JSON = "workflows/image_effects.json"
    Params = ImageEffectsParams
    EXAMPLE: ClassVar[dict[str, Any] | None] = {
        "width": 64,
        "height": 64,
        "color": "#ff8000",
        "blur_radius": 2,
    }
    params: ImageEffectsParams

    async def apply_modifications(self) -> None:
        """Build the source -> invert -> blur -> save chain from the parameters."""
        p = self.params
        color = int(p.color.removeprefix("#"), 16) if isinstance(p.color, str) else p.color
        prefix = self.check_prefix(p.filename_prefix)
        wf = self.workflow
        source: list[Any]
        if p.input_image:
            del wf["1"]
            wf["10"] = {"class_type": "LoadImage", "inputs": {"image": p.input_image}}
            source = ["10", 0]
            if p.width or p.height:
                # ImageScale keeps the aspect ratio for a side given as 0.
                wf["11"] = {
                    "class_type": "ImageScale",
                    "inputs": {
                        "image": source,
                        "upscale_method": p.upscale_method,
                        "width": p.width or 0,
                        "height": p.height or 0,
                        "crop": p.crop,
                    },
                }
                source = ["11", 0]
        else:
            for key, side in (("width", p.width), ("height", p.height)):
                if side == 0:
                    raise ModificationError(key, f"modification '{key}' must be at least 1")
            wf["1"]["inputs"].update(
                width=p.width or 512, height=p.height or 512, batch_size=p.batch_size, color=color
            )
            source = ["1", 0]
        if p.invert:
            wf["2"]["inputs"]["image"] = source
            source = ["2", 0]
        else:
            del wf["2"]
        if p.blur_radius:
            wf["3"]["inputs"].update(image=source, blur_radius=p.blur_radius, sigma=p.sigma)
            source = ["3", 0]
        else:
            del wf["3"]
        wf["9"]["inputs"]["images"] = source
        wf["9"]["inputs"]["filename_prefix"] = prefix
        await super().apply_modifications()
