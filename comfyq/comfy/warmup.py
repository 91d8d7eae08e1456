"""Warm-up: a workflow run on a backend after every (re)start, before it takes jobs.

A backend that becomes reachable again (its websocket dropped and came back, or it answered for the
first time) is cold until the warm-up prompt has ended on it: the pool does not hand out its slots
meanwhile, and BACKENDS_READY and ``/ready`` wait for it. The first prompt on a fresh ComfyUI loads
models and compiles kernels; paying that here keeps it out of a client's job.

A warm-up that ComfyUI refuses or that fails in a node still ends the warm-up (the backend takes
jobs; the error is shown in /health): a broken warm-up file must not take a healthy box out of
service. One that cannot finish because the backend went away again is retried once it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfyq.errors import ComfyqError, ComfyUIUnreachable
from modifiers.basemodifier import replace_random_ints

log = logging.getLogger("comfyq.comfy.warmup")


class WarmupFileError(ValueError):
    """The warm-up file cannot be read or is not an API-format workflow."""


def load_workflow(path: str | Path) -> dict[str, Any]:
    """An API-format workflow from ``path`` (a JSON object of nodes with ``class_type``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WarmupFileError(f"warm-up workflow {p}: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise WarmupFileError(f"warm-up workflow {p}: not a JSON object of nodes")
    for key, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WarmupFileError(
                f"warm-up workflow {p}: node {key!r} has no class_type (API format needed:"
                " ComfyUI's 'Export (API)')"
            )
    return data


@dataclass
class Warmup:
    """The warm-up workflow and how long one run may take."""

    workflow: dict[str, Any]
    timeout: float = 600.0

    async def run(self, backend: Any) -> str | None:
        """Run the warm-up on ``backend``: None when it succeeded, else why it failed.

        Raises ComfyUIUnreachable when the backend went away (the warm-up is then retried)."""
        workflow = json.loads(json.dumps(self.workflow))  # a fresh copy per run
        replace_random_ints(workflow)
        prompt_id = str(uuid.uuid4())
        client = backend.client
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                await client.submit(workflow, prompt_id)
                await client.follow(prompt_id, workflow=workflow)
        except TimeoutError:
            return f"warm-up did not finish within {self.timeout:.0f}s"
        except ComfyUIUnreachable:
            raise
        except ComfyqError as exc:
            return f"warm-up failed: {exc.message}"
        log.info(
            "backend %s warmed up in %.1fs (prompt %s)",
            backend.display_url,
            time.monotonic() - started,
            prompt_id,
        )
        return None
