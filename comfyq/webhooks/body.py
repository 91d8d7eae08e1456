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
    from comfyq.result import delivery_options, to_result

    if job is None or job.finished_at != delivery["job_finished_at"]:
        return None
    rows: list[dict[str, Any]] = await store.outputs(job.id)
    result = msgspec.to_builtins(to_result(job, rows))
    outputs: list[dict[str, Any]] = result.get("output") or []
    base64_outputs, hook = delivery_options(job)
    if base64_outputs:
        paths = {r["filename"]: r["local_path"] for r in rows}
        outputs = await inline_outputs(
            [{**o, "local_path": paths.get(o["filename"])} for o in outputs], base64_max_bytes
        )
    for o in outputs:
        o.pop("local_path", None)  # a server path is nobody's business outside
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


def per_job_timeout(job: Job, default: float) -> float:
    """The job's own ``input.webhook.timeout`` when it set one, else ``default``."""
    from comfyq.result import delivery_options

    t = delivery_options(job)[1].get("timeout")
    return float(t) if isinstance(t, int | float) and t > 0 else default
