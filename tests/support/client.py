"""Workflows and helpers shared by the ComfyUI client tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from comfyq.comfy.protocol import LiveEvent

Workflow = dict[str, dict[str, Any]]


def new_id() -> str:
    return str(uuid.uuid4())


def invert_workflow(prefix: str, color: int = 521401, size: int = 8) -> Workflow:
    """EmptyImage -> ImageInvert -> SaveImage, as in 20_run_success_invert.json."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def blur_chain_workflow(
    prefix: str, blurs: int = 2, size: int = 8, color: int = 521421, radius: int = 1
) -> Workflow:
    """EmptyImage -> ImageBlur x n -> SaveImage (node ids 100, 101, ... as in 50_*.json)."""
    wf: Workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        }
    }
    prev = "1"
    for i in range(blurs):
        nid = str(100 + i)
        wf[nid] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [prev, 0], "blur_radius": radius, "sigma": 10.0},
        }
        prev = nid
    wf["9"] = {
        "class_type": "SaveImage",
        "inputs": {"images": [prev, 0], "filename_prefix": prefix},
    }
    return wf


def websocket_save_workflow(batch: int = 2, color: int = 43775) -> Workflow:
    """EmptyImage -> SaveImageWebsocket, as in 26_*.json (progress plus preview frames)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 24, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


def image_size_workflow(prefix: str, color: int = 521510) -> Workflow:
    """GetImageSize sends a TEXT frame (25b_*.json)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 40, "height": 30, "batch_size": 2, "color": color},
        },
        "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "EmptyImage",
            "inputs": {"width": ["2", 0], "height": ["2", 1], "batch_size": 1, "color": 0},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def txt2img_workflow(prefix: str, steps: int = 4, seed: int = 42) -> Workflow:
    """The SD1.5 text-to-image graph (KSampler reports ``steps`` progress ticks)."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


# Every POST /prompt rejection kind recorded in 30_prompt_errors_all.json (a..i), as workflows.
VALIDATION_CASES: dict[str, tuple[Workflow, str]] = {
    "unknown_class_type": (
        {
            "1": {"class_type": "NoSuchNodeXYZ", "inputs": {}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        "invalid_prompt",
    ),
    "missing_required_input": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "missing_required_link": (
        {
            "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}},
        },
        "prompt_outputs_failed_validation",
    ),
    "wrong_type_string_for_int": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": "abc", "height": 64, "batch_size": 1, "color": 0},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "link_type_mismatch": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            },
            "2": {
                "class_type": "EmptyImage",
                "inputs": {"width": ["1", 0], "height": 8, "batch_size": 1, "color": 0},
            },
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "value_above_max": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 99999, "height": 8, "batch_size": 1, "color": 0},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "value_not_in_list": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            },
            "2": {
                "class_type": "ImageScale",
                "inputs": {
                    "image": ["1", 0],
                    "upscale_method": "magic",
                    "width": 16,
                    "height": 16,
                    "crop": "disabled",
                },
            },
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "loadimage_missing_file": (
        {
            "1": {"class_type": "LoadImage", "inputs": {"image": "no_such_file_123.png"}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "no_output_node": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            },
        },
        "prompt_no_outputs",
    ),
    "link_to_missing_node": (
        {
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["99", 0], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "bad_link_shape": (
        {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0, 5], "filename_prefix": "x"},
            },
        },
        "prompt_outputs_failed_validation",
    ),
    "node_without_class_type": (
        {
            "1": {"inputs": {}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "x"},
            },
        },
        "invalid_prompt",
    ),
}


class EventLog:
    """Collects LiveEvents and lets a test wait for one that matches."""

    def __init__(self) -> None:
        self.events: list[LiveEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, ev: LiveEvent) -> None:
        self.events.append(ev)
        self._changed.set()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[LiveEvent]:
        return [e for e in self.events if e.kind == kind]

    async def wait_for(
        self, match: Callable[[LiveEvent], bool], timeout: float = 10.0
    ) -> LiveEvent:
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.events:
                    if match(ev):
                        return ev
                self._changed.clear()
                await self._changed.wait()


def first_image(outputs: dict[str, dict[str, Any]], node: str) -> dict[str, Any]:
    images = outputs[node]["images"]
    assert isinstance(images, list) and images
    image: dict[str, Any] = images[0]
    assert set(image) >= {"filename", "subfolder", "type"}
    return image
