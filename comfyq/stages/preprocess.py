"""Preprocess: build the job's workflow (modifier or raw), fetch and decode its inputs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from comfyq.errors import InputError
from comfyq.inputs import Downloader
from comfyq.inputs.models import ModelStore
from comfyq.inputs.prepare import payload_for_preprocess, prepare_job
from comfyq.stages.runner import JobContext, StageDone
from comfyq.store import Job
from modifiers import ModifierRegistry


class Preprocess:
    def __init__(
        self,
        registry: ModifierRegistry,
        downloader: Downloader,
        assets: Any = None,
        *,
        models: ModelStore | None = None,
    ) -> None:
        self.registry = registry
        self.downloader = downloader
        self.assets = assets  # comfyq.v2.resolve.AssetResolver: core/ASSET refs of v2 jobs
        self.models = models  # input.models: fetched into COMFYUI_MODELS_DIR before the workflow

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        # Decoded once, for this stage alone (the modifier changes it in place: no copy needed),
        # but for a workflow with nothing to change in it, which is passed on as stored.
        stored = job.stored("payload")
        payload = payload_for_preprocess(stored) if stored is not None else None
        if payload is None:
            payload = await job.decode_fresh("payload")
        job_input = payload.get("input", payload)
        files = []
        if self.assets is not None and "v2" in payload:
            job_input, files = await self.assets.resolve(job_input)
        refs = job_input.get("models") if isinstance(job_input, dict) else None
        if refs:
            if self.models is None:  # admission refuses these; a job from before a config change
                raise InputError(
                    "input.models needs a local models directory (COMFYUI_MODELS_DIR)",
                    fields=[{"path": "$.input.models", "message": "no models directory"}],
                )
            await self.models.ensure_all(refs)
        prepared = await prepare_job(
            job_input,
            job.id,
            registry=self.registry,
            downloader=self.downloader,
            owned=True,
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
