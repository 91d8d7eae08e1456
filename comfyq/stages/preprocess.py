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
    def __init__(
        self, registry: ModifierRegistry, downloader: Downloader, assets: Any = None
    ) -> None:
        self.registry = registry
        self.downloader = downloader
        self.assets = assets  # comfyq.v2.resolve.AssetResolver: core/ASSET refs of v2 jobs

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        job_input = job.payload.get("input", job.payload)
        files = []
        if self.assets is not None and "v2" in job.payload:
            job_input, files = await self.assets.resolve(job_input)
        prepared = await prepare_job(
            job_input,
            job.id,
            registry=self.registry,
            downloader=self.downloader,
        )
        inputs: list[dict[str, Any]] = []
        for item in [*prepared.inputs, *files]:
            d = asdict(item)
            d["path"] = str(item.path)
            inputs.append(d)
        return StageDone(
            "Preprocessing complete. Queued for generation.",
            {"prepared": {"workflow": prepared.workflow, "inputs": inputs}},
        )
