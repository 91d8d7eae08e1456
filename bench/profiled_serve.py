"""``comfyq serve`` under pyinstrument, for ``python -m bench --profile`` (bench/bench_profile.py).

The profiler samples the event-loop thread only while it is switched on: SIGUSR1 starts it,
SIGUSR2 stops it and writes three files next to ``COMFYQ_PROFILE_OUT`` (a path prefix): an HTML
call tree (flame view), a text call tree, and ``.layers.json``, the sampled time split by comfyq's
layers (each sample goes to the innermost comfyq module on its stack; library time goes to the
comfyq code that called it; time with no comfyq frame at all is aiohttp's HTTP machinery or the
event loop itself; idle time in the selector is left out).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pyinstrument import Profiler

from comfyq.cli import main

# Innermost-match order matters: the first prefix that matches a file path names its layer.
LAYERS: list[tuple[str, str]] = [
    ("comfyq/api/middleware", "HTTP parsing and middleware"),
    ("comfyq/api/generate", "admission"),
    ("comfyq/admission", "admission"),
    ("comfyq/api/sse", "events, SSE and websockets"),
    ("comfyq/api/stream", "events, SSE and websockets"),
    ("comfyq/api/ws", "events, SSE and websockets"),
    ("comfyq/events", "events, SSE and websockets"),
    ("comfyq/result", "result building"),
    ("comfyq/api/", "other API routes (reads, queue, ETA)"),
    ("comfyq/store/", "store (loop side)"),
    ("comfyq/stages/runner", "stage runner and hand-offs"),
    ("comfyq/stages/preprocess", "preprocess and inputs"),
    ("comfyq/inputs/", "preprocess and inputs"),
    ("comfyq/comfy/transfer", "output fetch"),
    ("comfyq/stages/postprocess", "output fetch"),
    ("comfyq/outputs/", "output fetch"),
    ("comfyq/stages/generate", "ComfyUI client and websocket feed"),
    ("comfyq/comfy/", "ComfyUI client and websocket feed"),
    ("comfyq/webhooks/", "webhooks"),
    ("comfyq/metrics", "metrics"),
    ("comfyq/logs", "logging"),
    ("comfyq/", "other comfyq"),
]
NO_COMFYQ_HTTP = "HTTP parsing and middleware"
NO_COMFYQ_LOOP = "event loop itself"
IDLE_FILES = ("selectors.py",)


def layer_of(path: str) -> str | None:
    """The layer of a comfyq source file, None for library code."""
    p = path.replace("\\", "/")
    at = p.rfind("/comfyq/")
    if at < 0 or "/site-packages/" in p[:at] and "/comfyq/" not in p[at:]:
        return None
    rel = p[at + 1 :]
    for prefix, name in LAYERS:
        if rel.startswith(prefix):
            return name
    return None


def split_by_layer(root: Any) -> dict[str, float]:
    """Seconds of sampled (non-idle) time per layer under the pyinstrument frame ``root``."""
    out: dict[str, float] = {}
    stack: list[tuple[Any, str | None, bool]] = [(root, None, False)]
    while stack:
        frame, layer, http = stack.pop()
        path = frame.file_path or ""
        own = layer_of(path)
        if own is not None:
            layer = own
        http = http or "/aiohttp/" in path
        children_time = sum(c.time for c in frame.children)
        self_time = frame.time - children_time
        if self_time > 0 and not path.endswith(IDLE_FILES):
            name = layer or (NO_COMFYQ_HTTP if http else NO_COMFYQ_LOOP)
            out[name] = out.get(name, 0.0) + self_time
        for child in frame.children:
            stack.append((child, layer, http))
    return out


def run() -> int:
    prefix = Path(os.environ["COMFYQ_PROFILE_OUT"])
    profiler = Profiler(interval=0.0005, async_mode="disabled")

    def start(*_: object) -> None:
        if not profiler.is_running:
            profiler.start()

    def stop(*_: object) -> None:
        if not profiler.is_running:
            return
        session = profiler.stop()
        prefix.with_suffix(".html").write_text(profiler.output_html())
        prefix.with_suffix(".txt").write_text(
            profiler.output_text(unicode=True, color=False, show_all=False)
        )
        root = session.root_frame()
        layers = split_by_layer(root) if root is not None else {}
        prefix.with_suffix(".layers.json").write_text(
            json.dumps({"sampled_s": session.duration, "layers_s": layers}, indent=1)
        )

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
