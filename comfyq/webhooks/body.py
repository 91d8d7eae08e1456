"""What a delivery posts: the job's Result as JSON (outputs inlined as base64 when asked)."""

from __future__ import annotations

from typing import Any

import msgspec

from comfyq.outputs.inline import inline_outputs
from comfyq.store import Job, JobStore


async def build_body(
    store: JobStore, job: Job | None, delivery: dict[str, Any], base64_max_bytes: int
) -> bytes | None:
    """The JSON body for a delivery, or None when its job is gone or was retried since it ended."""
    # The API's Result builder: one shape everywhere (imported here: it pulls in the API schemas).
    from comfyq.result import to_result, wants_base64

    if job is None or job.finished_at != delivery["job_finished_at"]:
        return None
    rows: list[dict[str, Any]] = await store.outputs(job.id)
    result = msgspec.to_builtins(to_result(job, rows))
    outputs: list[dict[str, Any]] = result.get("output") or []
    if wants_base64(job):
        paths = {r["filename"]: r["local_path"] for r in rows}
        outputs = await inline_outputs(
            [{**o, "local_path": paths.get(o["filename"])} for o in outputs], base64_max_bytes
        )
    for o in outputs:
        o.pop("local_path", None)  # a server path is nobody's business outside
    hook = ((job.payload or {}).get("input") or {}).get("webhook") or {}
    body = {
        "id": job.id,
        "status": result["status"],
        "message": result["message"],
        "output": outputs,
        "error": result.get("error"),
        "timings": result.get("timings"),
        "extra": hook.get("extra_params") or {},
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "attempts": job.attempts,
        "warnings": result.get("warnings") or [],
    }
    return msgspec.json.encode(body)


def per_job_timeout(payload: dict[str, Any] | None, default: float) -> float:
    hook = ((payload or {}).get("input") or {}).get("webhook") or {}
    t = hook.get("timeout")
    return float(t) if isinstance(t, int | float) and t > 0 else default
