"""ComfyUI's jobs API (``GET /api/jobs/{id}``, newer than 0.3.64) read as comfyq's locations.

One request answers where a prompt is, consistently: the old way needs ``/queue`` then
``/history/{id}`` and an ordering argument to not miss a prompt finishing in between. A finished
job's detail is turned into the shape of a ``/history`` entry, so one function
(``run_result_from_history``) reads outcomes of both generations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote

from comfyq.comfy.capabilities import Request, json_of
from comfyq.comfy.follow import Location

# The route answered 404/405 without the jobs API's JSON: ComfyUI restarted as an older version.
GONE: Literal["gone"] = "gone"
ErrorFor = Callable[[str, str, int, bytes], Exception]  # (method, path, status, body)
Located = tuple[Location, dict[str, Any] | None]


async def locate_job(request: Request, error: ErrorFor, prompt_id: str) -> Located | None | str:
    """``GET /api/jobs/{id}``: the location, None when the answer does not settle it (ask
    ``/queue`` and ``/history``), or GONE; other answers raise ``error(...)``."""
    path = f"/api/jobs/{quote(prompt_id, safe='')}"
    answer = await request("GET", path)
    status, body = answer[0], json_of(answer)
    if status == 404 and isinstance(body, dict) and "error" in body:
        # "Job not found": neither queued nor in history. A pending job removed by cancel or
        # /queue delete also vanishes this way (it never shows as cancelled).
        return "unknown", None
    if status == 200:
        return location_of_job(body)
    if status in (404, 405):
        return GONE
    raise error("GET", path, status, answer[2])


async def cancel_job(request: Request, error: ErrorFor, prompt_id: str) -> bool | str:
    """``POST /api/jobs/{id}/cancel``: whether it acted (a running job interrupted or a pending
    one removed; False for a finished or unknown id), or GONE; other answers raise."""
    path = f"/api/jobs/{quote(prompt_id, safe='')}/cancel"
    answer = await request("POST", path)
    if answer[0] == 200:
        body = json_of(answer)
        return isinstance(body, dict) and body.get("cancelled") is True
    if answer[0] in (404, 405):
        return GONE
    raise error("POST", path, answer[0], answer[2])


_DONE = frozenset({"completed", "failed", "cancelled"})


def location_of_job(job: Any) -> tuple[Location, dict[str, Any] | None] | None:
    """(location, history-shaped entry when done) of a job detail; None for a status we do not
    know (a newer server's), so the caller asks ``/queue`` and ``/history`` instead."""
    if not isinstance(job, dict):
        return None
    status = job.get("status")
    if status == "pending":
        return "pending", None
    if status == "in_progress":
        return "running", None
    if status in _DONE:
        return "done", history_entry_from_job(job)
    return None


def history_entry_from_job(job: dict[str, Any]) -> dict[str, Any]:
    """A ``/history/{id}`` entry built from a finished job's detail."""
    workflow = job.get("workflow") if isinstance(job.get("workflow"), dict) else {}
    assert isinstance(workflow, dict)
    extra = workflow.get("extra_data") if isinstance(workflow.get("extra_data"), dict) else {}
    status = job.get("execution_status")
    if not isinstance(status, dict):
        status = _status_for(job)
    else:
        status = dict(status)
        messages = list(status.get("messages") or [])
        error = job.get("execution_error")
        if isinstance(error, dict) and not any(
            isinstance(m, (list, tuple)) and m and m[0] == "execution_error" for m in messages
        ):
            messages.append(["execution_error", error])
        status["messages"] = messages
    outputs = job.get("outputs")
    return {
        "prompt": [
            job.get("priority", 0),
            job.get("id"),
            workflow.get("prompt") or {},
            extra,
            [],
        ],
        "outputs": outputs if isinstance(outputs, dict) else {},
        "status": status,
        "meta": {},
    }


def _status_for(job: dict[str, Any]) -> dict[str, Any]:
    """``status`` of a history entry for a job detail that carries no ``execution_status``."""
    kind = job.get("status")
    if kind == "completed":
        return {"status_str": "success", "completed": True, "messages": []}
    messages: list[Any] = []
    error = job.get("execution_error")
    if kind == "failed" and isinstance(error, dict):
        messages.append(["execution_error", error])
    elif kind == "cancelled":
        messages.append(["execution_interrupted", {"prompt_id": job.get("id")}])
    return {"status_str": "error", "completed": False, "messages": messages}
