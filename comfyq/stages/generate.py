"""Generate: run the prepared workflow on a ComfyUI backend and follow it to its end.

The prompt id is ours and is stored on the job before ``POST /prompt`` goes out, so a job that
finds one recorded (after a restart, a retry, a lost connection) asks ComfyUI about it before
anything is submitted again: still queued or running -> follow it; finished -> take its outcome from
history; unknown (ComfyUI restarted and lost it) -> submit again, counting an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import msgspec

from comfyq.comfy.backends import Backend, BackendPool
from comfyq.comfy.feed import StoredWorkflow
from comfyq.comfy.protocol import LiveEvent
from comfyq.errors import ComfyUIUnreachable, Interrupted, PromptLost
from comfyq.netguard import redact_url
from comfyq.stages.runner import JobContext, StageDone
from comfyq.store import Job
from comfyq.store.model import prompt_message

log = logging.getLogger("comfyq.generate")

Workflow = dict[str, Any] | StoredWorkflow


class _PreparedView(msgspec.Struct):
    """The prepared column with its workflow left as JSON text (``Raw()`` when absent)."""

    workflow: msgspec.Raw = msgspec.Raw()
    inputs: list[Any] = []


async def _prepared(job: Job) -> tuple[Workflow, list[Any]]:
    """The job's prepared workflow and inputs. A workflow that is a JSON object stays the text
    the store holds (``StoredWorkflow``: submitted as is, read narrowly); anything else (absent,
    null, an odd shape) is decoded as before."""
    try:
        view = job.view("prepared", _PreparedView)
    except msgspec.ValidationError:  # not the shape preprocess writes (or decoded already)
        view = None
    else:
        if view is None:
            return {}, []
        if bytes(memoryview(view.workflow)[:1]) == b"{":
            return StoredWorkflow(view.workflow), view.inputs
    prepared = await job.decode_fresh("prepared") or {}
    return prepared.get("workflow") or {}, prepared.get("inputs", [])


class Generate:
    def __init__(self, pool: BackendPool, *, failover_after: float = 120.0) -> None:
        self.pool = pool
        self.failover_after = failover_after
        self._prompts: dict[str, JobContext] = {}  # prompt id -> job, for previews
        # Per-prompt extra_data by job id (a v2 partner-node key): memory only, never stored.
        self.extra_data: dict[str, dict[str, Any]] = {}

    def free_backend(self) -> str | None:
        """The backend ``slot`` would give now (healthy, a free slot, the least loaded), or None:
        a claim of generate jobs stores it with their prompt ids (comfyq.stages.runner)."""
        free = [b for b in self.pool.backends if b.healthy and b.in_flight + b.elsewhere < b.slots]
        if not free:
            return None
        return min(free, key=lambda b: b.in_flight / b.slots).url

    def assign(self, job: Job) -> dict[str, Any] | None:
        """The prompt id (and the backend) this job will be submitted under, stored by the commit
        that hands the job to this stage (comfyq.stages.runner), so that no write of its own
        has to precede the submission: when a backend has a free slot now (``free_backend``),
        else None (the stage stores them itself before submitting)."""
        url = self.free_backend()
        if url is None:
            return None
        prompt_id = str(uuid.uuid4())
        return {
            "comfy_prompt_id": prompt_id,
            "comfy_backend": url,
            "message": prompt_message(prompt_id),
        }

    def on_preview(self, ev: LiveEvent) -> None:
        """Route a backend's preview frames to the job whose prompt produced them."""
        ctx = self._prompts.get(ev.prompt_id or "")
        if ctx is not None:
            ctx.live(ev.kind, {"node": ev.node, "mime": ev.mime, **(ev.data or {})}, ev.image)

    async def __call__(self, job: Job, ctx: JobContext) -> StageDone:
        workflow, inputs = await _prepared(job)
        # Assigned by the hand-off that gave this process the job (``assign``): stored, never
        # submitted. Any other recorded prompt id may have reached ComfyUI: reconcile it.
        assigned = (ctx.assigned or {}).get("comfy_prompt_id")
        fresh = assigned is not None and job.comfy_prompt_id == assigned
        if job.comfy_prompt_id and job.comfy_backend and not fresh:
            run = await self._reconcile(job, ctx, workflow)
            if run is not None:
                be = self.pool.get(job.comfy_backend or "")
                history = await _history_if_asked(be, job, run) if be is not None else None
                return _done(run, ctx.job, history)
        async with self.pool.slot(prefer=job.comfy_backend if fresh else None) as be:
            for item in inputs:
                await be.client.upload(Path(item["path"]), item["name"], overwrite=True)
            if fresh and be.url == job.comfy_backend and job.comfy_prompt_id:
                prompt_id = job.comfy_prompt_id  # already durable, with this backend
            else:
                prompt_id = str(uuid.uuid4())
                # Durable before the request goes out: a crash from here on reconciles, never
                # re-runs blindly.
                await ctx.update(
                    comfy_prompt_id=prompt_id,
                    comfy_backend=be.url,
                    message=prompt_message(prompt_id),
                )
            try:
                submitted = await be.client.submit(
                    workflow, prompt_id, extra_data=self.extra_data.get(job.id)
                )
            except asyncio.CancelledError:
                await self._stop_prompt(be, prompt_id, ctx)
                raise
            if submitted.prompt_id != prompt_id:  # an old ComfyUI that picks its own ids
                prompt_id = submitted.prompt_id
                await ctx.update(comfy_prompt_id=prompt_id)
            log.info(
                "job %s: prompt %s submitted to %s",
                job.id,
                prompt_id,
                be.display_url,
                extra={"prompt_id": prompt_id, "backend": be.display_url},
            )
            if submitted.node_errors:
                warn = {
                    "type": "partial_node_errors",
                    "message": "ComfyUI skipped outputs that failed validation",
                    "node_errors": submitted.node_errors,
                }
                await ctx.update(result={"warnings": [warn]})
            run = await self._follow(be, prompt_id, workflow, ctx)
            history = await _history_if_asked(be, job, run)
        return _done(run, ctx.job, history)

    async def _reconcile(self, job: Job, ctx: JobContext, workflow: Workflow) -> Any:
        assert job.comfy_prompt_id and job.comfy_backend
        prompt_id, url = job.comfy_prompt_id, job.comfy_backend
        be = self.pool.get(url)
        shown = redact_url(url)
        if be is None:
            return await self._reconcile_foreign(job, ctx, prompt_id, url)
        if not await self._wait_healthy(be):
            log.warning("job %s: backend %s gone; submitting elsewhere", job.id, shown)
            await ctx.update(comfy_prompt_id=None, comfy_backend=None)
            raise PromptLost(f"backend {shown} did not come back within {self.failover_after:.0f}s")
        where, entry = await be.client.locate(prompt_id)
        log.info(
            "job %s: prompt %s is %s on %s",
            job.id,
            prompt_id,
            where,
            shown,
            extra={"prompt_id": prompt_id, "backend": shown},
        )
        if where == "done":
            return await self._from_history(be, entry, ctx)
        if where in ("pending", "running"):
            others = [b["url"] for b in self.pool.snapshot() if b["url"] != url]
            async with self.pool.slot(prefer=url, exclude=others) as be2:
                return await self._follow(be2, prompt_id, workflow, ctx)
        # Unknown: it never got in (the POST that failed ambiguously was already charged an attempt)
        # or ComfyUI restarted while comfyq was down (a restart, which recover does not charge
        # either). Either way nothing of it runs anywhere: submit afresh within this attempt, so
        # that one attempt is one prompt.
        log.warning(
            "job %s: ComfyUI at %s does not know prompt %s (never got in, or ComfyUI restarted); "
            "submitting it again",
            job.id,
            shown,
            prompt_id,
            extra={"prompt_id": prompt_id},
        )
        await ctx.update(comfy_prompt_id=None, comfy_backend=None)
        return None

    async def _reconcile_foreign(self, job: Job, ctx: JobContext, prompt_id: str, url: str) -> Any:
        """Several instances: the prompt went to a backend of another instance (which died or let
        go of the job). Finished there: take its outcome. Queued or running there: stop it and
        run it here within this attempt. Unknown or unreachable: run it here."""
        shown = redact_url(url)
        client = self.pool.client_for(url)
        where: str
        entry: dict[str, Any] | None
        try:
            where, entry = await client.locate(prompt_id)
        except ComfyUIUnreachable as exc:
            where, entry = "unreachable", None
            log.warning("job %s: backend %s of another instance: %s", job.id, shown, exc)
        log.info(
            "job %s: prompt %s is %s on %s (another instance's backend)",
            job.id,
            prompt_id,
            where,
            shown,
            extra={"prompt_id": prompt_id, "backend": shown},
        )
        if where == "done" and entry is not None:
            try:
                return await client.result_from_history(entry)
            except Interrupted:
                pass
        elif where in ("pending", "running"):
            try:
                await client.cancel(prompt_id)
            except Exception as exc:  # noqa: BLE001 - it may still run there; ours goes on anyway
                log.warning(
                    "job %s: could not stop prompt %s on %s: %s", job.id, prompt_id, shown, exc
                )
        await ctx.update(comfy_prompt_id=None, comfy_backend=None)
        return None

    async def _from_history(self, be: Backend, entry: Any, ctx: JobContext) -> Any:
        try:
            return await be.client.result_from_history(entry)
        except Interrupted:
            await ctx.update(comfy_prompt_id=None, comfy_backend=None)
            raise

    async def _wait_healthy(self, be: Backend) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.failover_after
        while not be.healthy and loop.time() < end:
            await asyncio.sleep(0.5)
        return be.healthy

    async def _stop_prompt(self, be: Backend, prompt_id: str, ctx: JobContext) -> None:
        """On cancel or deadline, remove or interrupt that prompt (only that one) in ComfyUI."""
        if ctx.cancel_reason not in ("cancel", "timeout"):
            return  # shutdown: leave it running; the next start reconciles it
        try:
            await asyncio.wait_for(asyncio.shield(be.client.cancel(prompt_id)), 10)
        # Best effort whatever goes wrong: the job ends either way; say why ComfyUI may still run
        # it.
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: could not stop prompt %s: %s", ctx.job.id, prompt_id, exc)

    async def _follow(
        self, be: Backend, prompt_id: str, workflow: Workflow, ctx: JobContext
    ) -> Any:
        self._prompts[prompt_id] = ctx
        try:
            run = await be.client.follow(
                prompt_id, workflow=workflow, on_event=lambda ev: _progress(ctx, ev)
            )
            log.debug(
                "job %s: prompt %s finished on %s (%d output node(s), %d cached)",
                ctx.job.id,
                prompt_id,
                be.display_url,
                len(run.outputs or {}),
                len(run.cached_nodes or ()),
            )
            return run
        except asyncio.CancelledError:
            await self._stop_prompt(be, prompt_id, ctx)
            raise
        except PromptLost:
            # ComfyUI forgot it (restarted): the retry submits a fresh prompt, not another lookup.
            await ctx.update(comfy_prompt_id=None, comfy_backend=None)
            raise
        except Interrupted:
            if ctx.cancel_reason is None:
                # Someone else interrupted ComfyUI: run it again, from a fresh prompt.
                await ctx.update(comfy_prompt_id=None, comfy_backend=None)
            raise
        finally:
            self._prompts.pop(prompt_id, None)


def _progress(ctx: JobContext, ev: LiveEvent) -> None:
    if ev.kind == "progress" and ev.max:
        value = ev.value or 0
        ctx.progress(
            {
                "node": ev.node,
                "node_type": ev.node_type,
                "value": value,
                "max": ev.max,
                "percent": round(100.0 * value / ev.max, 1),
            }
        )
    elif ev.kind == "executing" and ev.node is not None:
        ctx.progress(
            {"node": ev.node, "node_type": ev.node_type, "value": 0, "max": 1, "percent": 0.0}
        )
    elif ev.kind in ("execution_start", "execution_cached"):
        ctx.live(ev.kind, {"nodes": (ev.data or {}).get("nodes", [])})


async def _history_if_asked(be: Backend, job: Job, run: Any) -> dict[str, Any] | None:
    """ComfyUI's history body for the prompt (the original wrapper's ``comfyui_response``), read
    only for jobs that asked for it; a failed read is a missing extra, never a failed job."""
    if not _asks_history(job):
        return None
    try:
        entry = await be.client.history_entry(run.prompt_id)
    except ComfyUIUnreachable as exc:
        log.warning("job %s: history of prompt %s not read: %s", job.id, run.prompt_id, exc)
        entry = None
    body: dict[str, Any] = dict(entry or {})
    raw_status = body.get("status")
    status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
    body["execution_details"] = {
        "prompt_id": run.prompt_id,
        "nodes_executed": list((run.outputs or {}).keys()),
        "cached": list(run.cached_nodes or ()),
        "completed": bool(status.get("completed", run.status == "success")),
        "error": None,
    }
    return body


class _HistoryFlag(msgspec.Struct):
    include_comfyui_response: Any = None


class _HistoryView(msgspec.Struct):
    input: _HistoryFlag | None = None


def _asks_history(job: Job) -> bool:
    """input.include_comfyui_response of the job's payload, read without building the rest of
    it (the workflow: thousands of nodes)."""
    try:
        view = job.view("payload", _HistoryView)
    except msgspec.ValidationError:  # not the shape admission writes: read it whole
        inp = (job.payload or {}).get("input")
        return isinstance(inp, dict) and bool(inp.get("include_comfyui_response"))
    return bool(view is not None and view.input is not None and view.input.include_comfyui_response)


def _done(run: Any, job: Job, history: dict[str, Any] | None = None) -> StageDone:
    result = dict(job.result or {})
    result.update(
        {"outputs": run.outputs, "cached_nodes": list(run.cached_nodes), "prompt_id": run.prompt_id}
    )
    if history is not None:
        result["comfyui_response"] = history
    if run.timing:  # ComfyUI's clock: queued (newer ComfyUI's create_time), started, ended
        result["comfy_timing"] = dict(run.timing)
    return StageDone("Generation complete. Queued for post-processing.", {"result": result})
