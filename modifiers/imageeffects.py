"""ImageEffects: a model-free workflow (built-in image nodes only) for demos and tests.

Source: an ``input_image`` (URL or a name from ``input.images``) loaded and optionally scaled, or
else a solid ``color`` image of ``width`` x ``height``. Then optional invert and blur, then save.
A stock ComfyUI runs it without any model weights.
"""

from __future__ import annotations

from typing import Any

from modifiers.basemodifier import BaseModifier, ModificationError

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
MAX_SIDE = 16384


class ImageEffects(BaseModifier):
    """Nodes: 1 EmptyImage | 10 LoadImage, 11 ImageScale; 2 ImageInvert; 3 ImageBlur; 9 SaveImage"""

    WORKFLOW_JSON = "workflows/image_effects.json"

    def __init__(self, modifications: dict[str, Any] | None = None) -> None:
        super().__init__(modifications)

    async def _color(self) -> int:
        raw = await self._value("color", 0)
        if isinstance(raw, str):
            text = raw.strip().removeprefix("#")
            if len(text) == 6:
                try:
                    return int(text, 16)
                except ValueError:
                    pass
            raise ModificationError("color", "modification 'color' must be an integer or '#rrggbb'")
        value: int = await self.int_value("color", 0, 0, 0xFFFFFF)
        return value

    async def apply_modifications(self) -> None:
        """Build the source -> invert -> blur -> save chain from the modifications."""
        # Every accepted key is read up front, whatever the path taken below, because the
        # admission check learns the accepted keys from what a dry run reads.
        input_image = await self.str_value("input_image", None)
        width = await self.int_value("width", None, 0, MAX_SIDE)
        height = await self.int_value("height", None, 0, MAX_SIDE)
        color = await self._color()
        batch_size = await self.int_value("batch_size", 1, 1, 64)
        invert = await self.bool_value("invert", True)
        blur_radius = await self.int_value("blur_radius", 0, 0, 31)
        sigma = await self.float_value("sigma", 1.0, 0.1, 10.0)
        upscale_method = await self.str_value("upscale_method", "bilinear", UPSCALE_METHODS)
        crop = await self.str_value("crop", "disabled", ("disabled", "center"))
        prefix = await self.filename_prefix_value(default="comfyq_effects")

        wf = self.workflow
        source: list[Any]
        if input_image:
            del wf["1"]
            wf["10"] = {"class_type": "LoadImage", "inputs": {"image": input_image}}
            source = ["10", 0]
            if width or height:
                # ImageScale keeps the aspect ratio for a side given as 0.
                wf["11"] = {
                    "class_type": "ImageScale",
                    "inputs": {
                        "image": source,
                        "upscale_method": upscale_method,
                        "width": width or 0,
                        "height": height or 0,
                        "crop": crop,
                    },
                }
                source = ["11", 0]
        else:
            for key, side in (("width", width), ("height", height)):
                if side == 0:
                    raise ModificationError(key, f"modification '{key}' must be at least 1")
            empty = wf["1"]["inputs"]
            empty.update(
                width=width or 512, height=height or 512, batch_size=batch_size, color=color
            )
            source = ["1", 0]
        if invert:
            wf["2"]["inputs"]["image"] = source
            source = ["2", 0]
        else:
            del wf["2"]
        if blur_radius:
            wf["3"]["inputs"].update(image=source, blur_radius=blur_radius, sigma=sigma)
            source = ["3", 0]
        else:
            del wf["3"]
        wf["9"]["inputs"]["images"] = source
        wf["9"]["inputs"]["filename_prefix"] = prefix
        await super().apply_modifications()
