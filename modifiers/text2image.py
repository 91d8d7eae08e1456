"""Text2Image: the SD1.5 text-to-image workflow (workflows/text2image.json)."""

from __future__ import annotations

import random
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta

from modifiers.basemodifier import BaseModifier, ModificationError

DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SEED_MAX = 2**64 - 1  # KSampler's own limit
PREFIX_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,127}$"

Seed = Annotated[
    # msgspec bounds stop at int64: the upper limit is checked in set_sampler.
    Annotated[int, Meta(ge=0)] | Literal["__RANDOM_INT__"] | None,
    Meta(description="KSampler seed (0 to 2^64-1); absent or __RANDOM_INT__: a random one per job"),
]


class SamplerParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The KSampler values both checkpoint modifiers take."""

    prompt: Annotated[
        str, Meta(description="positive prompt", examples=["a lighthouse at dusk"])
    ] = ""
    negative_prompt: Annotated[str, Meta(description="negative prompt")] = ""
    seed: Seed = None
    steps: Annotated[int, Meta(ge=1, le=10000, description="sampling steps")] = 20
    cfg_scale: Annotated[
        float, Meta(ge=0.0, le=100.0, description="classifier-free guidance (cfg wins if both)")
    ] = 8.0
    cfg: Annotated[
        Annotated[float, Meta(ge=0.0, le=100.0)] | None, Meta(description="same as cfg_scale")
    ] = None
    sampler_name: Annotated[
        str, Meta(min_length=1, max_length=100, description="KSampler sampler")
    ] = "euler"
    scheduler: Annotated[
        str, Meta(min_length=1, max_length=100, description="KSampler scheduler")
    ] = "normal"
    denoise: Annotated[
        Annotated[float, Meta(ge=0.0, le=1.0)] | None,
        Meta(description="denoise strength (default: the workflow's)"),
    ] = None
    ckpt_name: Annotated[
        str, Meta(min_length=1, max_length=255, description="checkpoint file in models/checkpoints")
    ] = DEFAULT_CHECKPOINT
    filename_prefix: Annotated[
        str, Meta(pattern=PREFIX_PATTERN, description="SaveImage prefix (relative, no '..')")
    ] = "ComfyUI"


class Text2ImageParams(SamplerParams, forbid_unknown_fields=True, kw_only=True):
    """Parameters of Text2Image."""

    width: Annotated[int, Meta(ge=16, le=16384, description="latent width in pixels")] = 512
    height: Annotated[int, Meta(ge=16, le=16384, description="latent height in pixels")] = 512
    batch_size: Annotated[int, Meta(ge=1, le=4096, description="images per run")] = 1


def set_sampler(
    mod: BaseModifier, p: SamplerParams, sampler: dict[str, Any], *, denoise: float
) -> None:
    """Write seed, steps, cfg, sampler, scheduler and denoise into a KSampler's inputs."""
    seed = p.seed
    if isinstance(seed, int) and seed > SEED_MAX:
        raise ModificationError("seed", f"modification 'seed' must be between 0 and {SEED_MAX}")
    if seed is None:
        seed = random.randint(mod.RANDOM_INT_MIN, mod.RANDOM_INT_MAX)
    sampler["seed"] = seed  # "__RANDOM_INT__" stays for super() to fill
    sampler["steps"] = p.steps
    sampler["cfg"] = p.cfg if p.cfg is not None else p.cfg_scale
    sampler["sampler_name"] = p.sampler_name
    sampler["scheduler"] = p.scheduler
    sampler["denoise"] = p.denoise if p.denoise is not None else denoise


class Text2Image(BaseModifier):
    """Nodes: 3 KSampler, 4 checkpoint, 5 empty latent, 6/7 prompts, 9 SaveImage."""

    WORKFLOW_JSON = "workflows/text2image.json"
    Params = Text2ImageParams
    EXAMPLE: ClassVar[dict[str, Any] | None] = {
        "prompt": "a lighthouse at dusk",
        "steps": 20,
        "width": 512,
        "height": 512,
    }
    params: Text2ImageParams

    async def apply_modifications(self) -> None:
        """Write prompt, sampler and size values, then download URLs and fill random ints."""
        p, wf = self.params, self.workflow
        set_sampler(self, p, wf["3"]["inputs"], denoise=1.0)
        wf["4"]["inputs"]["ckpt_name"] = p.ckpt_name
        wf["5"]["inputs"].update(width=p.width, height=p.height, batch_size=p.batch_size)
        wf["6"]["inputs"]["text"] = p.prompt
        wf["7"]["inputs"]["text"] = p.negative_prompt
        wf["9"]["inputs"]["filename_prefix"] = self.check_prefix(p.filename_prefix)
        await super().apply_modifications()
