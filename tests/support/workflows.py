"""Workflows the tests submit: the recorded invert run, and a small one with knobs."""

from __future__ import annotations

from typing import Any

# EmptyImage -> ImageInvert -> SaveImage: the recorded ComfyUI run (20_run_success_invert.json).
INVERT_WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 521401},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {
        "class_type": "SaveImage",
        "inputs": {"images": ["2", 0], "filename_prefix": "probe_invert"},
    },
}


def workflow(color: int = 0, *, blur: bool = False, prefix: str = "t") -> dict[str, Any]:
    """EmptyImage -> [ImageBlur ->] ImageInvert -> SaveImage. A distinct ``color`` per job keeps
    ComfyUI's cache from skipping the nodes; ImageBlur is the node the simulator can make slow and
    give progress steps (``simulator.node_durations = {"ImageBlur": s}``, ``progress_steps``)."""
    wf: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
    if blur:
        wf["4"] = {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0},
        }
        wf["2"]["inputs"]["image"] = ["4", 0]
    return wf
