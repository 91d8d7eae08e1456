"""Image2Image: the SD1.5 image-to-image workflow (workflows/image2image.json)."""

from __future__ import annotations

from typing import Any

from modifiers.basemodifier import BaseModifier
from modifiers.text2image import DEFAULT_CHECKPOINT, set_sampler


class Image2Image(BaseModifier):
    """Nodes: 3 KSampler, 6/7 prompts, 9 SaveImage, 10 LoadImage, 12 VAEEncode, 14 checkpoint."""

    WORKFLOW_JSON = "workflows/image2image.json"

    def __init__(self, modifications: dict[str, Any] | None = None) -> None:
        super().__init__(modifications)

    async def apply_modifications(self) -> None:
        """Write prompt, sampler and input image, then download URLs and fill random ints."""
        wf = self.workflow
        await set_sampler(self, wf["3"]["inputs"], sampler_name="dpmpp_2m", denoise=0.87)
        wf["6"]["inputs"]["text"] = await self.str_value("prompt", "")
        wf["7"]["inputs"]["text"] = await self.str_value("negative_prompt", "")
        # An http(s) URL is downloaded by super(); a name sent in input.images is mapped by the
        # framework. The original defaulted to "" and let ComfyUI fail; here it is required.
        wf["10"]["inputs"]["image"] = await self.str_value("input_image")
        wf["14"]["inputs"]["ckpt_name"] = await self.str_value("ckpt_name", DEFAULT_CHECKPOINT)
        wf["9"]["inputs"]["filename_prefix"] = await self.filename_prefix_value()
        await super().apply_modifications()
