"""The Result a client sees: built from the job row, its output rows and the live progress.

Secrets never get here: the job's payload is not part of a Result, and the secrets table is never
read. Output files are inlined as base64 only when the request asked for it, read in a thread.
"""

from __future__ import annotations

import asyncio
import base64
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import quote

import msgspec

from comfyq.outputs.inline import inline_file
from comfyq.schemas import (
    ErrorInfo,
    FieldError,
    OriginalFile,
    OutputFile,
    Progress,
    Result,
    Timings,
    WebhookDelivery,
)
from comfyq.store.model import Job, Stage, State


def output_url(job_id: str, filename: str) -> str:
    """Where ``GET /outputs/{id}/{filename}`` serves a job's file."""
    return f"/outputs/{quote(job_id, safe='')}/{quote(filename, safe='')}"


def _text(v: Any) -> str | None:
    return None if v is None else str(v)


def error_info(err: dict[str, Any] | None) -> ErrorInfo | None:
    """A job's stored error as the Result's ``error`` (tolerant of older or richer shapes)."""
    if not err:
        return None
    fields = err.get("fields")
    details = err.get("details")
    extra = {
        k: v
        for k, v in err.items()
        if k not in ("type", "message", "node_id", "node_type", "details", "fields")
    }
    if extra:  # e.g. ComfyUI's node_errors: keep them visible under details
        details = {**(details if isinstance(details, dict) else {}), **extra}
    return ErrorInfo(
        type=str(err.get("type") or "error"),
        message=str(err.get("message") or ""),
        node_id=_text(err.get("node_id")),
        node_type=_text(err.get("node_type")),
        details=details if isinstance(details, dict) and details else None,
        fields=[
            FieldError(str(f.get("path", "$")), str(f.get("message", "")))
            for f in fields
            if isinstance(f, dict)
        ]
        if isinstance(fields, list)
        else None,
    )


def timings(raw: dict[str, Any] | None) -> Timings:
    raw = raw or {}

    def ms(key: str) -> int:
        v = raw.get(key)
        return int(v) if isinstance(v, int | float) else 0

    total = raw.get("total_ms")
    return Timings(
        queued_ms=ms("queued_ms"),
        preprocess_ms=ms("preprocess_ms"),
        generation_ms=ms("generation_ms"),
        postprocess_ms=ms("postprocess_ms"),
        total_ms=int(total) if isinstance(total, int | float) else None,
        generate_wait_ms=ms("generate_wait_ms"),
        postprocess_wait_ms=ms("postprocess_wait_ms"),
    )


def progress_of(data: dict[str, Any] | None) -> Progress | None:
    if not data:
        return None
    try:
        return msgspec.convert(data, Progress, strict=False)
    except msgspec.ValidationError:
        return None


def _original(raw: Any) -> OriginalFile | None:
    if not isinstance(raw, dict):
        return None
    return OriginalFile(
        str(raw.get("filename") or ""), str(raw.get("mimetype") or ""), int(raw.get("size") or 0)
    )


def output_file(
    job_id: str, row: dict[str, Any], converted: dict[str, Any] | None = None
) -> OutputFile:
    return OutputFile(
        original=_original((converted or {}).get(row["filename"])),
        filename=row["filename"],
        url=row.get("url") or output_url(job_id, row["filename"]),
        type=row.get("comfy_type") or "output",
        subfolder=row.get("subfolder") or "",
        node_id=str(row.get("node_id") or ""),
        output_type=row.get("output_type") or "images",
        mimetype=row.get("mimetype") or "application/octet-stream",
        size=int(row.get("size") or 0),
        sha256=row.get("sha256"),
        local_path=row.get("local_path"),
        upload_error=row.get("upload_error"),
        error=row.get("error"),
    )


def to_result(
    job: Job, outputs: list[dict[str, Any]], progress: dict[str, Any] | None = None
) -> Result:
    """The Result of ``job`` (no base64 data; see :meth:`Results.inline`)."""
    warnings = (job.result or {}).get("warnings") or []
    return Result(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        message=job.message,
        created_at=job.created_at,
        updated_at=job.updated_at,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        priority=job.priority,
        progress=progress_of(progress)
        if job.state == State.RUNNING and job.stage == Stage.GENERATE
        else None,
        output=[output_file(job.id, r, (job.result or {}).get("converted")) for r in outputs],
        error=error_info(job.error),
        timings=timings(job.timings),
        finished_at=job.finished_at,
        warnings=[w for w in warnings if isinstance(w, dict)],
        comfyui_response=_comfyui_response(job),
    )


def _comfyui_response(job: Job) -> dict[str, Any]:
    body = (job.result or {}).get("comfyui_response")
    return body if isinstance(body, dict) else {}


class _Delivery(msgspec.Struct):
    return_outputs_as_base64: Any = None
    webhook: Any = None


class _DeliveryView(msgspec.Struct):
    input: _Delivery | None = None


def delivery_options(job: Job) -> tuple[bool, dict[str, Any]]:
    """(input.return_outputs_as_base64, input.webhook) of the job's payload, decoded without
    building the rest (the workflow: thousands of nodes); the whole payload when it is not the
    shape admission writes."""
    try:
        view = job.view("payload", _DeliveryView)
    except msgspec.ValidationError:
        inp = (job.payload or {}).get("input")
        inp = inp if isinstance(inp, dict) else {}
        flag, hook = inp.get("return_outputs_as_base64"), inp.get("webhook")
    else:
        if view is None or view.input is None:
            return False, {}
        flag, hook = view.input.return_outputs_as_base64, view.input.webhook
    return bool(flag), hook if isinstance(hook, dict) else {}


def wants_base64(job: Job) -> bool:
    return delivery_options(job)[0]


def has_webhook(job: Job) -> bool:
    return bool(delivery_options(job)[1].get("url"))


def deliveries(rows: list[dict[str, Any]]) -> list[WebhookDelivery]:
    """The outbox's history rows as Result entries (a row that does not fit is left out)."""
    out = []
    for row in rows:
        try:
            out.append(msgspec.convert(row, WebhookDelivery, strict=False))
        except msgspec.ValidationError:
            continue
    return out


_RETRY = object()  # Results.shared: the first caller's load failed; load again


class Results:
    """Builds Results; caches finished ones (they no longer change) for fan-out to many streams."""

    def __init__(
        self,
        reads: Any,
        bus: Any,
        *,
        base64_max_bytes: int,
        cache_size: int = 512,
        webhook_history: Callable[[str], Awaitable[list[dict[str, Any]]]] | None = None,
    ) -> None:
        self.reads = reads  # comfyq.store.JobReads: fresh reads
        self.webhook_history = webhook_history
        self.bus = bus
        self.base64_max_bytes = base64_max_bytes
        self._cache: OrderedDict[tuple[str, str], Result] = OrderedDict()
        self._cache_size = cache_size
        # Finished jobs' output files by job id (owner, filename -> row), from the Results built
        # for them: GET /outputs answers from here without a read (the bench's client, and most
        # others, fetch the files right after the final result).
        self._files: OrderedDict[str, tuple[str | None, dict[str, OutputFile]]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Any]] = {}
        # Several instances: fetches (bytes, error) of a file another instance holds.
        self.remote: (
            Callable[[Job, str, int], Awaitable[tuple[bytes | None, str | None]]] | None
        ) = None

    async def shared(self, job_id: str, job: Job | None = None) -> tuple[Job, Result] | None:
        """Job and Result, one load shared by every concurrent caller (a final event fans out).

        ``job``: the job as its last change committed it (the final event carries it), so
        that only its outputs are read; None: read it too. The first caller loads in its own
        task (no task of its own per load: its reads are usually answered without waiting);
        callers that come meanwhile wait for its outcome, and load for themselves if it failed
        or was cancelled."""
        while (fut := self._loading.get(job_id)) is not None:
            got = await asyncio.shield(fut)
            if got is not _RETRY:
                return got  # type: ignore[no-any-return]
        fut = self._loading[job_id] = asyncio.get_running_loop().create_future()
        try:
            value = (job, await self.of(job)) if job is not None else await self._load(job_id)
        except BaseException:
            fut.set_result(_RETRY)
            raise
        finally:
            self._loading.pop(job_id, None)
        fut.set_result(value)
        return value

    async def _load(self, job_id: str) -> tuple[Job, Result] | None:
        job = await self.reads.job(job_id)
        return None if job is None else (job, await self.of(job))

    async def get(self, job_id: str) -> Result | None:
        job = await self.reads.job(job_id)
        return None if job is None else await self.of(job)

    async def of(self, job: Job) -> Result:
        """The Result of ``job`` with its outputs (and base64 data when the job asked for it)."""
        key = (job.id, job.updated_at)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        rows = (await self.reads.outputs([job.id])).get(job.id, [])
        res = to_result(job, rows, self.bus.progress.get(job.id))
        hooked = job.terminal and has_webhook(job) and self.webhook_history is not None
        if hooked:
            res.webhooks = deliveries(await self.webhook_history(job.id))  # type: ignore[misc]
        if wants_base64(job) and res.output:
            await self.inline(res, job)
        elif job.terminal:
            owner = getattr(job, "owner", _RETRY)
            if owner is not _RETRY:  # a row read without its owner cannot vouch for access
                self._files[job.id] = (cast(str | None, owner), {o.filename: o for o in res.output})
                self._files.move_to_end(job.id)
                if len(self._files) > self._cache_size:
                    self._files.popitem(last=False)
            if not hooked:  # deliveries go on changing after the job's end
                self._cache[key] = res
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return res

    def known_file(self, job_id: str, filename: str) -> tuple[str | None, OutputFile] | None:
        """(owner, output) of a finished job's file from a Result built here, or None (unknown
        here: read the store). The file itself may be gone since (job deleted or pruned): look."""
        got = self._files.get(job_id)
        if got is None:
            return None
        out = got[1].get(filename)
        return None if out is None else (got[0], out)

    async def many(self, jobs: list[Job]) -> list[Result]:
        """Results of several jobs with one outputs query (no base64: lists stay small)."""
        rows = await self.reads.outputs([j.id for j in jobs])
        return [to_result(j, rows.get(j.id, []), self.bus.progress.get(j.id)) for j in jobs]

    async def inline(self, res: Result, job: Job | None = None) -> None:
        """Fill ``output[i].data`` with base64 of the local file, size-capped (a file another
        instance holds is fetched from it)."""
        for o in res.output:
            if o.local_path and o.data is None:
                o.data, err = await inline_file(o.local_path, self.base64_max_bytes)
                if err and job is not None and self.remote is not None:
                    raw, remote_err = await self.remote(job, o.filename, self.base64_max_bytes)
                    if raw is not None:
                        o.data, err = base64.b64encode(raw).decode("ascii"), None
                    elif remote_err:
                        err = f"{err}; {remote_err}"
                if err and not o.error:
                    o.error = err
