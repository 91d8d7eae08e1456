"""Image2Image: the SD1.5 image-to-image workflow (workflows/image2image.json)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from msgspec import Meta

from modifiers.basemodifier import BaseModifier
from modifiers.text2image import SamplerParams, set_sampler


class Image2ImageParams(SamplerParams, forbid_unknown_fields=True, kw_only=True):
    """Parameters of Image2Image."""

    # The original defaulted to "" and let ComfyUI fail; here it is required.
    input_image: Annotated[
        str,
        Meta(
            min_length=1,
            description="an http(s) URL (downloaded) or the name of an input.images entry",
            examples=["https://example.com/photo.png"],
        ),
    ]
    sampler_name: Annotated[
        str, Meta(min_length=1, max_length=100, description="KSampler sampler")
    ] = "dpmpp_2m"


class Image2Image(BaseModifier):
    """Nodes: 3 KSampler, 6/7 prompts, 9 SaveImage, 10 LoadImage, 12 VAEEncode, 14 checkpoint."""

    WORKFLOW_JSON = "workflows/image2image.json"
    Params = Image2ImageParams
    EXAMPLE: ClassVar[dict[str, Any] | None] = {
        "input_image": "https://example.com/photo.png",
        "prompt": "oil painting",
    }
    params: Image2ImageParams

    async def apply_modifications(self) -> None:
        """Write prompt, sampler and input image, then download URLs and fill random ints."""
        p, wf = self.params, self.workflow
        set_sampler(self, p, wf["3"]["inputs"], denoise=0.87)
        wf["6"]["inputs"]["text"] = p.prompt
        wf["7"]["inputs"]["text"] = p.negative_prompt
        wf["10"]["inputs"]["image"] = p.input_image
        wf["14"]["inputs"]["ckpt_name"] = p.ckpt_name
        wf["9"]["inputs"]["filename_prefix"] = self.check_prefix(p.filename_prefix)
        await super().apply_modifications()
