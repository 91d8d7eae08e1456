"""The newer ComfyUI's jobs API: ``GET /api/jobs``, ``GET /api/jobs/{id}``, both cancel routes.

Shapes and error texts follow ``shared/comfyui-protocol/NEWER.md`` §2-3: jobs are built from the
queue (running -> in_progress, pending -> pending) and the history (success -> completed, error ->
cancelled if interrupted, else failed); null values are omitted; a pending job that is cancelled
or deleted leaves no record (404), it never shows as cancelled.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .generation import is_canonical_uuid

if TYPE_CHECKING:
    from .process import SimProcess

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
_MEDIA = {"images": "images", "gifs": "images", "video": "video", "audio": "audio", "3d": "3d"}


def _error(text: str, status: int = 400, **extra: Any) -> web.Response:
    return web.json_response({"error": text, **extra}, status=status)


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _workflow_id(extra: dict[str, Any]) -> Any:
    png = extra.get("extra_pnginfo")
    wf = png.get("workflow") if isinstance(png, dict) else None
    return wf.get("id") if isinstance(wf, dict) else None


def _files(outputs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(node id, output key, entry) of every file entry, null items dropped."""
    out = []
    for nid, node_out in outputs.items():
        for key, items in (node_out or {}).items() if isinstance(node_out, dict) else []:
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    out.append((str(nid), key, item))
    return out


def _preview(outputs: dict[str, Any]) -> dict[str, Any] | None:
    files = [(n, k, i) for n, k, i in _files(outputs) if k in _MEDIA]
    saved = [f for f in files if f[2].get("type") == "output"]
    for nid, key, item in saved or files:
        return {**item, "nodeId": nid, "mediaType": _MEDIA[key]}
    return None


def _stamp(messages: list[Any], names: tuple[str, ...]) -> int | None:
    for name, data in messages:
        if name in names and isinstance(data, dict):
            value = data.get("timestamp")
            return value if isinstance(value, int) else None
    return None


def _from_queue(item: list[Any], status: str, detail: bool) -> dict[str, Any]:
    number, pid, prompt, extra = item[0], item[1], item[2], item[3]
    extra = extra if isinstance(extra, dict) else {}
    job = _compact(
        {
            "id": pid,
            "status": status,
            "priority": number,
            "create_time": extra.get("create_time"),
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": _workflow_id(extra),
        }
    )
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra}
    return job


def _from_history(entry: dict[str, Any], detail: bool) -> dict[str, Any]:
    number, pid, prompt, extra = entry["prompt"][:4]
    extra = extra if isinstance(extra, dict) else {}
    st = entry.get("status") or {}
    messages = st.get("messages") or []
    names = [m[0] for m in messages]
    if st.get("status_str", "success") == "success":
        status = "completed"
    else:
        status = "cancelled" if "execution_interrupted" in names else "failed"
    outputs = entry.get("outputs") or {}
    files = _files(outputs)
    error = next((d for n, d in messages if n == "execution_error"), None)
    job = _compact(
        {
            "id": pid,
            "status": status,
            "priority": number,
            "create_time": extra.get("create_time"),
            "execution_start_time": _stamp(messages, ("execution_start",)),
            "execution_end_time": _stamp(
                messages, ("execution_success", "execution_error", "execution_interrupted")
            ),
            "outputs_count": len(files),
            "previewable_outputs_count": sum(1 for f in files if f[1] in _MEDIA),
            "workflow_id": _workflow_id(extra),
            "preview_output": _preview(outputs),
            "execution_error": error if status == "failed" else None,
        }
    )
    if detail:
        job["outputs"] = {
            nid: {
                k: [i for i in v if i is not None] if isinstance(v, list) else v
                for k, v in (o or {}).items()
            }
            for nid, o in outputs.items()
        }
        job["execution_status"] = {
            "status_str": st.get("status_str"),
            "completed": st.get("completed"),
            "messages": messages,
        }
        job["workflow"] = {"prompt": prompt, "extra_data": extra}
    return job


class JobRoutes:
    """Request handlers of the jobs API, bound to one simulated process."""

    def __init__(self, proc: SimProcess) -> None:
        self.p = proc

    def all_jobs(self) -> list[dict[str, Any]]:
        q = self.p.queue
        jobs = [_from_queue(i, "in_progress", False) for i in q.running_items()]
        jobs += [_from_queue(i, "pending", False) for i in q.pending_items()]
        jobs += [_from_history(e, False) for e in q.history.values()]
        return jobs

    async def list(self, request: web.Request) -> web.Response:
        """GET /api/jobs?status=&workflow_id=&sort_by=&sort_order=&limit=&offset="""
        query = request.rel_url.query
        wanted: set[str] | None = None
        if query.get("status"):
            asked = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
            bad = [s for s in asked if s not in STATUSES]
            if bad:
                return _error(
                    f"Invalid status value(s): {', '.join(bad)}. "
                    f"Valid values: {', '.join(STATUSES)}"
                )
            wanted = set(asked)
        sort_by = query.get("sort_by", "created_at")
        if sort_by not in ("created_at", "execution_duration"):
            return _error("sort_by must be 'created_at' or 'execution_duration'")
        order = query.get("sort_order", "desc")
        if order not in ("asc", "desc"):
            return _error("sort_order must be 'asc' or 'desc'")
        limit: int | None = None
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                return _error("limit must be an integer")
            if limit <= 0:
                return _error("limit must be a positive integer")
        offset = 0
        if "offset" in query:
            try:
                offset = max(0, int(query["offset"]))
            except ValueError:
                return _error("offset must be an integer")
        jobs = self.all_jobs()
        if wanted is not None:
            jobs = [j for j in jobs if j["status"] in wanted]
        if query.get("workflow_id"):
            jobs = [j for j in jobs if j.get("workflow_id") == query["workflow_id"]]

        def key(job: dict[str, Any]) -> int:
            if sort_by == "created_at":
                return int(job.get("create_time") or 0)
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            return end - start if start is not None and end is not None else 0

        jobs.sort(key=key, reverse=order == "desc")
        total = len(jobs)
        page = jobs[offset : offset + limit if limit is not None else None]
        return web.json_response(
            {
                "jobs": page,
                "pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": total,
                    "has_more": offset + len(page) < total,
                },
            }
        )

    async def one(self, request: web.Request) -> web.Response:
        """GET /api/jobs/{job_id}: the id is not validated; unknown -> 404."""
        pid = request.match_info["job_id"]
        q = self.p.queue
        for item in q.running_items():
            if item[1] == pid:
                return web.json_response(_from_queue(item, "in_progress", True))
        for item in q.pending_items():
            if item[1] == pid:
                return web.json_response(_from_queue(item, "pending", True))
        entry = q.history.get(pid)
        if entry is not None:
            return web.json_response(_from_history(entry, True))
        return _error("Job not found", 404)

    async def cancel_one(self, request: web.Request) -> web.Response:
        """POST /api/jobs/{job_id}/cancel: atomic, idempotent, id not validated."""
        acted = await self.p.cancel_job(request.match_info["job_id"])
        return web.json_response({"cancelled": acted})

    async def cancel_many(self, request: web.Request) -> web.Response:
        """POST /api/jobs/cancel {"job_ids": [...]}: all ids checked before any is cancelled."""
        try:
            body = json.loads(await request.text())
        except ValueError:
            return _error("Request body must be valid JSON")
        ids = body.get("job_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            return _error("job_ids must be a list")
        invalid = [i for i in ids if not is_canonical_uuid(i)]
        if invalid:
            return _error("job_ids contains invalid id(s)", invalid_ids=invalid)
        acted = False
        for pid in ids:
            acted = await self.p.cancel_job(pid) or acted
        return web.json_response({"cancelled": acted})

    async def node_replacements(self, request: web.Request) -> web.Response:
        """GET /node_replacements: old class -> its replacements (none registered here)."""
        return web.json_response(dict(self.p.replacements))
