"""The one place where what the store knows becomes Comfy API v2 fields.

A v2 job is a comfyq job: ``status``, ``progress``, ``metrics``, ``outputs``, ``error`` and the
times are derived here from the job row, its output rows and the live progress, and nowhere else.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from comfyq.store.assets import AssetRecord
from comfyq.store.model import Job, Stage, State
from comfyq.v2.progress import Live

PREFIX = "/api/v2"
TERMINAL = frozenset({"succeeded", "canceled", "failed", "expired"})
STATUSES = ("queued", "running", "succeeded", "canceling", "canceled", "failed", "expired")
NEVER = "9999-12-31T23:59:59Z"  # retention 0 keeps jobs: no deadline to report

# A v2 job read is the store's job summary (JobReads.summary): never the payload or the workflow
# (they can be large), plus v2_metadata and nodes_total taken out of them by the database.

_TIMEOUTS = frozenset({"timeout"})
_ERROR_CODES = {
    "validation_error": "invalid_workflow",
    "node_error": "node_execution_error",
    "comfyui_unreachable": "upstream_error",
    "prompt_lost": "upstream_error",
    "interrupted": "interrupted",
    "timeout": "timeout",
    "cancelled": "canceled",
    "input_error": "missing_asset",
    "modifier_error": "invalid_workflow",
    "output_error": "output_error",
}
_TYPES = {"images": "image", "gifs": "video", "video": "video", "videos": "video", "audio": "audio"}
_TYPES.update({"text": "text", "latents": "latent", "latent": "latent"})


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts).astimezone(UTC)


def status(job: Job) -> str:
    """The v2 status of a job (see ../shared/spec/comfy-api-v2.md, 'Mapping')."""
    state = job.state
    if state == State.COMPLETED:
        return "succeeded"
    if state == State.CANCELLED:
        return "canceled"
    if state == State.FAILED:
        err = job.error or {}
        # The per-job deadline passed before ComfyUI ever ran it: expired, not failed.
        if err.get("type") in _TIMEOUTS and not job.comfy_prompt_id:
            return "expired"
        return "failed"
    if job.cancel_requested:
        return "canceling"
    if job.stage == Stage.PREPROCESS or (job.stage == Stage.GENERATE and state == State.PENDING):
        return "queued"
    return "running"


def expires_at(job: Job, retention: float) -> str:
    """When pruning removes the job: its end (or its deadline, by which it ends) + retention."""
    if retention <= 0:
        return NEVER
    end = job.finished_at or job.deadline_at
    return iso(parse(end) + timedelta(seconds=retention))


def _ms(timings: dict[str, Any], *keys: str) -> int | None:
    vals = [timings.get(k) for k in keys]
    nums = [v for v in vals if isinstance(v, int | float)]
    return int(sum(nums)) if nums else None


def started_at(job: Job) -> str | None:
    """When the job reached ComfyUI: it entered generation and claimed a slot."""
    if job.stage == Stage.GENERATE and job.state == State.RUNNING:
        return job.stage_entered_at
    if job.stage == Stage.POSTPROCESS or (job.state == State.COMPLETED):
        before = _ms(job.timings, "queued_ms", "preprocess_ms", "generate_wait_ms") or 0
        return iso(parse(job.created_at) + timedelta(milliseconds=before))
    if job.terminal and job.comfy_prompt_id:
        t = job.timings
        before = _ms(t, "queued_ms", "preprocess_ms", "generate_wait_ms") or 0
        return iso(parse(job.created_at) + timedelta(milliseconds=before))
    return None


def metrics(job: Job) -> dict[str, int | None]:
    t = job.timings
    return {
        "queue_ms": _ms(t, "queued_ms", "generate_wait_ms"),
        "preprocess_ms": _ms(t, "preprocess_ms"),
        "execution_ms": _ms(t, "generation_ms"),
        "postprocess_ms": _ms(t, "postprocess_ms"),
        "total_ms": _ms(t, "total_ms"),
        "attempts": job.attempts,
    }


def progress(job: Job, live: Live | None, v2_status: str) -> dict[str, Any] | None:
    """A complete Progress snapshot, weighted by nodes and the running node's sampler steps."""
    total = int(getattr(job, "nodes_total", 0) or 0)
    if v2_status == "succeeded" or (job.stage == Stage.POSTPROCESS and not job.terminal):
        # Every node has run; postprocess only fetches the files.
        return {"value": 1.0, "nodes_done": total, "nodes_total": total, "message": "done"}
    if live is None:
        return None if v2_status in ("queued",) or v2_status in TERMINAL else _zero(total)
    done = len(live.done)
    total = max(total, done + (1 if live.current is not None else 0))
    part = 0.0
    message = live.current_class
    if live.steps:
        part = min(1.0, (live.step or 0) / live.steps)
        message = f"{live.current_class or live.current} {live.step}/{live.steps}"
    value = (done + part) / total if total else 0.0
    return {
        "value": round(min(1.0, max(0.0, value)), 4),
        "nodes_done": done,
        "nodes_total": total,
        "current_node": live.current,
        "current_node_class": live.current_class,
        "step": live.step,
        "steps": live.steps,
        "message": message,
    }


def _zero(total: int) -> dict[str, Any]:
    return {"value": 0.0, "nodes_done": 0, "nodes_total": total}


def error(job: Job) -> dict[str, Any] | None:
    err = job.error
    if not err or job.state == State.COMPLETED:
        return None
    details = err.get("details") if isinstance(err.get("details"), dict) else {}
    tb = details.get("traceback") if details else None
    if isinstance(tb, list):
        tb = "".join(str(x) for x in tb)
    return {
        "code": _ERROR_CODES.get(str(err.get("type")), str(err.get("type") or "error")),
        "message": str(err.get("message") or ""),
        "node_id": None if err.get("node_id") is None else str(err["node_id"]),
        "class_type": None if err.get("node_type") is None else str(err["node_type"]),
        "traceback": tb if isinstance(tb, str) else None,
    }


def urls(job_id: str) -> dict[str, str]:
    base = f"{PREFIX}/jobs/{quote(job_id, safe='')}"
    return {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}


def output_type(output_type_: str | None, mime: str) -> str:
    """ComfyUI's output key (images, gifs, audio...) and the MIME type as a v2 OutputType."""
    kind = _TYPES.get(output_type_ or "")
    if kind is None:
        head = mime.split("/", 1)[0]
        kind = {"image": "image", "video": "video", "audio": "audio", "text": "text"}.get(
            head, "file"
        )
    if kind == "image" and mime.startswith("video/"):
        return "video"
    return kind


def content_url(origin: str, asset_id: str) -> str:
    return f"{origin}{PREFIX}/assets/{quote(asset_id, safe='')}/content"


def output(row: dict[str, Any], job_id: str, origin: str, until: str) -> dict[str, Any] | None:
    """An output row as a v2 Output (None for a row without an asset id: it cannot be fetched)."""
    asset_id = row.get("asset_id")
    if not asset_id:
        return None
    mime = row.get("mimetype") or "application/octet-stream"
    return {
        "id": asset_id,
        "node_id": str(row.get("node_id") or ""),
        "name": row["filename"],
        "type": output_type(row.get("output_type"), mime),
        "content_type": mime,
        "size_bytes": int(row.get("size") or 0),
        "hash": f"blake3:{row['blake3']}" if row.get("blake3") else None,
        "url": content_url(origin, asset_id),
        "url_expires_at": until,
        "job_id": job_id,
    }


def job(
    job_: Job,
    outputs: list[dict[str, Any]],
    *,
    origin: str,
    retention: float,
    live: Live | None = None,
    queue_position: int | None = None,
) -> dict[str, Any]:
    """The v2 Job object."""
    st = status(job_)
    until = expires_at(job_, retention)
    body: dict[str, Any] = {
        "id": job_.id,
        "status": st,
        "created_at": job_.created_at,
        "started_at": started_at(job_),
        "completed_at": job_.finished_at,
        "expires_at": until,
        "queue_position": queue_position if st == "queued" else None,
        "progress": progress(job_, live, st),
        "outputs": [o for o in (output(r, job_.id, origin, until) for r in outputs) if o],
        "error": error(job_),
        "metrics": metrics(job_),
        "urls": urls(job_.id),
    }
    meta = getattr(job_, "v2_metadata", None)
    if isinstance(meta, str) and meta:
        from comfyq.store.model import loads

        body["metadata"] = loads(meta)
    return body


def asset(
    rec: AssetRecord, origin: str, *, created_new: bool | None = None, expires: str | None = None
) -> dict[str, Any]:
    """An asset record (uploaded, or a job's output) as a v2 Asset."""
    until = expires if expires is not None else rec.expires_at
    body: dict[str, Any] = {
        "id": rec.id,
        "hash": rec.hash,
        "size_bytes": rec.size_bytes,
        "content_type": rec.content_type,
        "file_path": rec.file_path,
        "created_at": rec.created_at,
        "url": content_url(origin, rec.id),
        # The content route checks the caller on every request: the URL lives as long as the asset.
        "url_expires_at": until or NEVER,
        "expires_at": until,
        "job_id": rec.job_id,
    }
    if rec.tags:
        body["tags"] = list(rec.tags)
    if created_new is not None:
        body["created_new"] = created_new
    return body
