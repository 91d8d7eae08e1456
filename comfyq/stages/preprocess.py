"""Preprocess: build the job's workflow (modifier or raw), fetch and decode its inputs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from comfyq.inputs import Downloader
from comfyq.inputs.prepare import prepare_job
from comfyq.stages.runner import JobContext, StageDone
from comfyq.store import Job
from modifiers import ModifierRegistry


class Preprocess:
    def __init__(self, registry: ModifierRegistry, downloader: Downloader) -> None:
        self.registry = registry
        self.downloader = downloader

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        prepared = await prepare_job(
            job.payload.get("input", job.payload),
            job.id,
            registry=self.registry,
            downloader=self.downloader,
        )
        inputs: list[dict[str, Any]] = []
        for item in prepared.inputs:
            d = asdict(item)
            d["path"] = str(item.path)
            inputs.append(d)
        return StageDone(
            "Preprocessing complete. Queued for generation.",
            {"prepared": {"workflow": prepared.workflow, "inputs": inputs}},
        )
