"""Text2Image: the SD1.5 text-to-image workflow (workflows/text2image.json)."""

from __future__ import annotations

import random
from typing import Any

from modifiers.basemodifier import BaseModifier

DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SEED_MAX = 2**64 - 1  # KSampler's own limit


async def set_sampler(
    mod: BaseModifier, sampler: dict[str, Any], *, sampler_name: str, denoise: float
) -> None:
    """The KSampler values both checkpoint modifiers take: seed, steps, cfg, sampler, scheduler,
    denoise."""
    sampler["seed"] = await mod.int_value(
        "seed", random.randint(mod.RANDOM_INT_MIN, mod.RANDOM_INT_MAX), 0, SEED_MAX
    )
    sampler["steps"] = await mod.int_value("steps", 20, 1, 10000)
    # cfg_scale is what the original wrapper's example payload sends (it ignored it).
    cfg_scale = await mod.float_value("cfg_scale", 8.0, 0.0, 100.0)
    sampler["cfg"] = await mod.float_value("cfg", cfg_scale, 0.0, 100.0)
    sampler["sampler_name"] = await mod.str_value("sampler_name", sampler_name)
    sampler["scheduler"] = await mod.str_value("scheduler", "normal")
    sampler["denoise"] = await mod.float_value("denoise", denoise, 0.0, 1.0)


class Text2Image(BaseModifier):
    """Nodes: 3 KSampler, 4 checkpoint, 5 empty latent, 6/7 prompts, 9 SaveImage."""

    WORKFLOW_JSON = "workflows/text2image.json"

    def __init__(self, modifications: dict[str, Any] | None = None) -> None:
        super().__init__(modifications)

    async def apply_modifications(self) -> None:
        """Write prompt, sampler and size values, then download URLs and fill random ints."""
        wf = self.workflow
        await set_sampler(self, wf["3"]["inputs"], sampler_name="euler", denoise=1.0)
        wf["4"]["inputs"]["ckpt_name"] = await self.str_value("ckpt_name", DEFAULT_CHECKPOINT)
        latent = wf["5"]["inputs"]
        latent["width"] = await self.int_value("width", 512, 16, 16384)
        latent["height"] = await self.int_value("height", 512, 16, 16384)
        latent["batch_size"] = await self.int_value("batch_size", 1, 1, 4096)
        wf["6"]["inputs"]["text"] = await self.str_value("prompt", "")
        wf["7"]["inputs"]["text"] = await self.str_value("negative_prompt", "")
        wf["9"]["inputs"]["filename_prefix"] = await self.filename_prefix_value()
        await super().apply_modifications()
