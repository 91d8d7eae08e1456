"""The simulated node classes and their /object_info descriptions (as ComfyUI 0.3.64 sends them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import nodes as n
from .env import SimEnv
from .types import InputSpec, NodeSpec

MAX_RES = 16384


class Dyn:
    """A combo whose options depend on the installation (files in input/, checkpoints)."""

    def __init__(self, fn: Callable[[SimEnv], list[str]]) -> None:
        self.fn = fn


SAMPLERS = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]

_PREFIX_TIP = (
    "The prefix for the file to save. This may include formatting information such as "
    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
)
_SAVE_DESC = "Saves the input images to your ComfyUI output directory."
_IMG_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_CFG_TIP = (
    "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. "
    "Higher values result in images more closely matching the prompt however too high "
    "values will negatively impact quality."
)


def _int(default: int, lo: int, hi: int, step: int | None = 1, **extra: Any) -> InputSpec:
    opts: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        opts["step"] = step
    opts.update(extra)
    return ("INT", opts)


def _specs() -> list[NodeSpec]:
    return [
        NodeSpec(
            "EmptyImage",
            {
                "width": _int(512, 1, MAX_RES),
                "height": _int(512, 1, MAX_RES),
                "batch_size": _int(1, 1, 4096, None),
                "color": _int(0, 0, 0xFFFFFF, 1, display="color"),
            },
            ("IMAGE",),
            n.run_empty_image,
        ),
        NodeSpec(
            "ImageInvert",
            {"image": ("IMAGE",)},
            ("IMAGE",),
            n.run_invert,
            display_name="Invert Image",
        ),
        NodeSpec(
            "SaveImage",
            {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": _PREFIX_TIP}),
            },
            (),
            n.run_save_image,
            hidden=dict(_IMG_HIDDEN),
            output_node=True,
            display_name="Save Image",
            description=_SAVE_DESC,
        ),
        NodeSpec(
            "PreviewImage",
            {"images": ("IMAGE",)},
            (),
            n.run_preview_image,
            hidden=dict(_IMG_HIDDEN),
            output_node=True,
            display_name="Preview Image",
            description=_SAVE_DESC,
        ),
        NodeSpec(
            "LoadImage",
            {"image": (Dyn(SimEnv.input_images), {"image_upload": True})},
            ("IMAGE", "MASK"),
            n.run_load_image,
            display_name="Load Image",
            custom_validate=("image",),
            is_changed=n.file_hash,
        ),
        NodeSpec(
            "LoadImageMask",
            {
                "image": (Dyn(SimEnv.input_files), {"image_upload": True}),
                "channel": (["alpha", "red", "green", "blue"],),
            },
            ("MASK",),
            n.run_load_image_mask,
            category="mask",
            display_name="Load Image (as Mask)",
            custom_validate=("image",),
            is_changed=n.file_hash,
        ),
        NodeSpec(
            "ImageScale",
            {
                "image": ("IMAGE",),
                "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                "width": _int(512, 0, MAX_RES),
                "height": _int(512, 0, MAX_RES),
                "crop": (["disabled", "center"],),
            },
            ("IMAGE",),
            n.run_scale,
            category="image/upscaling",
            display_name="Upscale Image",
            slow=True,
        ),
        NodeSpec(
            "ImageBlur",
            {
                "image": ("IMAGE", {}),
                "blur_radius": _int(1, 1, 31),
                "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            },
            ("IMAGE",),
            n.run_passthrough_image,
            category="image/postprocessing",
            display_name=None,
            python_module="comfy_extras.nodes_post_processing",
            output_tooltips=(None,),
            v3=True,
            slow=True,
        ),
        NodeSpec(
            "GetImageSize",
            {"image": ("IMAGE",)},
            ("INT", "INT", "INT"),
            n.run_get_size,
            hidden={"unique_id": "UNIQUE_ID"},
            output_names=("width", "height", "batch_size"),
            display_name="Get Image Size",
            description="Returns width and height of the image, and passes it through unchanged.",
            python_module="comfy_extras.nodes_images",
        ),
        NodeSpec(
            "SaveImageWebsocket",
            {"images": ("IMAGE",)},
            (),
            n.run_save_websocket,
            output_node=True,
            category="api/image",
            python_module="custom_nodes.websocket_image_save",
            is_changed=lambda env, inputs: time.time(),
            own_progress=True,
        ),
        NodeSpec(
            "CheckpointLoaderSimple",
            {
                "ckpt_name": (
                    Dyn(SimEnv.checkpoints),
                    {"tooltip": "The name of the checkpoint (model) to load."},
                )
            },
            ("MODEL", "CLIP", "VAE"),
            n.run_checkpoint,
            category="loaders",
            display_name="Load Checkpoint",
            description="Loads a diffusion model checkpoint, diffusion models are used to "
            "denoise latents.",
            output_tooltips=(
                "The model used for denoising latents.",
                "The CLIP model used for encoding text prompts.",
                ("The VAE model used for encoding and decoding images to and from latent space."),
            ),
            slow=True,
        ),
        NodeSpec(
            "CLIPTextEncode",
            {
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The text to be encoded.",
                    },
                ),
                "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."}),
            },
            ("CONDITIONING",),
            n.run_clip_encode,
            category="conditioning",
            display_name="CLIP Text Encode (Prompt)",
            description="Encodes a text prompt using a CLIP model into an embedding that can be "
            "used to guide the diffusion model towards generating specific images.",
            output_tooltips=(
                ("A conditioning containing the embedded text used to guide the diffusion model."),
            ),
        ),
        NodeSpec(
            "EmptyLatentImage",
            {
                "width": _int(
                    512, 16, MAX_RES, 8, tooltip="The width of the latent images in pixels."
                ),
                "height": _int(
                    512, 16, MAX_RES, 8, tooltip="The height of the latent images in pixels."
                ),
                "batch_size": _int(
                    1, 1, 4096, None, tooltip="The number of latent images in the batch."
                ),
            },
            ("LATENT",),
            n.run_empty_latent,
            category="latent",
            display_name="Empty Latent Image",
            description="Create a new batch of empty latent images to be denoised via sampling.",
            output_tooltips=("The empty latent image batch.",),
        ),
        NodeSpec(
            "KSampler",
            {
                "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ),
                "steps": _int(
                    20, 1, 10000, None, tooltip="The number of steps used in the denoising process."
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": _CFG_TIP,
                    },
                ),
                "sampler_name": (
                    SAMPLERS,
                    {
                        "tooltip": "The algorithm used when sampling, this can "
                        "affect the quality, speed, and style of the "
                        "generated output."
                    },
                ),
                "scheduler": (
                    SCHEDULERS,
                    {
                        "tooltip": "The scheduler controls how noise is gradually "
                        "removed to form the image."
                    },
                ),
                "positive": (
                    "CONDITIONING",
                    {
                        "tooltip": "The conditioning describing the attributes "
                        "you want to include in the image."
                    },
                ),
                "negative": (
                    "CONDITIONING",
                    {
                        "tooltip": "The conditioning describing the attributes "
                        "you want to exclude from the image."
                    },
                ),
                "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
                "denoise": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The amount of denoising applied, lower values will "
                        "maintain the structure of the initial image "
                        "allowing for image to image sampling.",
                    },
                ),
            },
            ("LATENT",),
            n.run_ksampler,
            category="sampling",
            display_name="KSampler",
            description="Uses the provided model, positive and negative conditioning to denoise "
            "the latent image.",
            output_tooltips=("The denoised latent.",),
            own_progress=True,
        ),
        NodeSpec(
            "VAEDecode",
            {
                "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
            },
            ("IMAGE",),
            n.run_vae_decode,
            category="latent",
            display_name="VAE Decode",
            description="Decodes latent images back into pixel space images.",
            output_tooltips=("The decoded image.",),
            slow=True,
        ),
    ]


NODES: dict[str, NodeSpec] = {spec.name: spec for spec in _specs()}


def resolve_input(spec: InputSpec, env: SimEnv) -> InputSpec:
    """Turn a dynamic combo into its current option list."""
    if spec and isinstance(spec[0], Dyn):
        return (spec[0].fn(env),) + tuple(spec[1:])
    return spec


def input_types(node: NodeSpec, env: SimEnv) -> dict[str, dict[str, Any]]:
    """INPUT_TYPES() of a node: required/optional(/hidden) with dynamic combos resolved."""
    out: dict[str, dict[str, Any]] = {
        "required": {k: resolve_input(v, env) for k, v in node.required.items()}
    }
    if node.optional:
        out["optional"] = {k: resolve_input(v, env) for k, v in node.optional.items()}
    if node.hidden:
        out["hidden"] = dict(node.hidden)
    return out


def object_info(node: NodeSpec, env: SimEnv) -> dict[str, Any]:
    """One node's /object_info entry, keys in ComfyUI's order."""
    inputs = input_types(node, env)
    info: dict[str, Any] = {
        "input": {
            k: {name: list(s) if isinstance(s, tuple) else s for name, s in v.items()}
            for k, v in inputs.items()
        },
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": list(node.outputs),
        "output_is_list": [False] * len(node.outputs),
        "output_name": list(node.output_names or node.outputs),
    }
    if node.v3 and node.output_tooltips is not None:
        info["output_tooltips"] = list(node.output_tooltips)
    info.update(
        {
            "name": node.name,
            "display_name": node.name if node.display_name == "" else node.display_name,
            "description": node.description,
            "python_module": node.python_module,
            "category": node.category,
            "output_node": node.output_node,
        }
    )
    if node.v3:
        info.update({"deprecated": False, "experimental": False, "api_node": False})
    elif node.output_tooltips is not None:
        info["output_tooltips"] = list(node.output_tooltips)
    return info
