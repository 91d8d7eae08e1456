"""HTTP routes of the simulator (every route also under /api), wired to one simulated process."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import files as sim_files
from .generation import (
    INVALID_PROMPT_ID,
    dependency_cycles,
    is_canonical_uuid,
    modern_error,
    modern_object_info,
    replace_nodes,
    uuid4_text,
)
from .jobs import JobRoutes
from .nodedefs import NODES, object_info
from .queue import SENSITIVE_EXTRA_DATA_KEYS
from .validate import ServerCrash, validate_prompt
from .ws import SERVER_FEATURES, _dumps, json_num, json_str

if TYPE_CHECKING:
    from .process import SimProcess

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CRASH_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"


def crash_response() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises: text/plain 500, Connection: close."""
    resp = web.Response(status=500, text=CRASH_TEXT, content_type="text/plain")
    resp.force_close()
    return resp


def _injected(status: int, body: Any) -> web.Response:
    if isinstance(body, (dict, list)):
        resp = web.json_response(body, status=status)
    else:
        resp = web.Response(status=status, text=str(body), content_type="text/plain")
    if status >= 500:
        resp.force_close()
    return resp


def _no_prompt() -> web.Response:
    error = {
        "type": "no_prompt",
        "message": "No prompt provided",
        "details": "No prompt provided",
        "extra_info": {},
    }
    return web.json_response({"error": error, "node_errors": {}}, status=400)


async def _json_body(request: web.Request) -> Any:
    """``await request.json()`` (the body decoded with its charset, then json.loads) without
    the two coroutine layers aiohttp puts around it; POST /prompt reads one per job."""
    body = await request.read()
    return json.loads(body.decode(request.charset or "utf-8"))


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30, 4 << 30


class Routes:
    """Request handlers bound to one SimProcess."""

    def __init__(self, proc: SimProcess) -> None:
        self.p = proc

    async def ws(self, request: web.Request) -> web.StreamResponse:
        """GET /ws?clientId=X."""
        return await self.p.hub.handle(request, self.p.on_ws_connect)

    async def system_stats(self, request: web.Request) -> web.Response:
        """GET /system_stats (shape of ComfyUI 0.3.64 on CPU)."""
        total, free = _memory()
        cpu = {
            "name": "cpu",
            "type": "cpu",
            "index": None,
            "vram_total": total,
            "vram_free": free,
            "torch_vram_total": total,
            "torch_vram_free": free,
        }
        # Newer ComfyUI lists every torch device, the primary first.
        modern = self.p.gen.modern_stats
        devices = [cpu, {**cpu, "name": "meta", "type": "meta"}] if modern else [cpu]
        return web.json_response(
            {
                "system": self.p.gen.system(
                    {
                        "os": os.name,
                        "ram_total": total,
                        "ram_free": free,
                        "comfyui_version": "0.3.64",
                        "required_frontend_version": "1.27.10",
                        "installed_templates_version": "0.1.95",
                        "required_templates_version": "0.1.95",
                        "python_version": sys.version,
                        "pytorch_version": "2.13.0+cpu",
                        "embedded_python": False,
                        "argv": [
                            "main.py",
                            "--cpu",
                            "--listen",
                            self.p.host,
                            "--port",
                            str(self.p.port),
                        ],
                    }
                ),
                "devices": devices,
            }
        )

    async def features(self, request: web.Request) -> web.Response:
        """GET /features."""
        return web.json_response(self.p.gen.features)

    async def get_prompt(self, request: web.Request) -> web.Response:
        """GET /prompt."""
        return web.json_response(self.p.queue.queue_info())

    async def object_info_all(self, request: web.Request) -> web.Response:
        """GET /object_info."""
        return web.json_response(
            {name: self._info(name, object_info(spec, self.p.env)) for name, spec in NODES.items()}
        )

    def _info(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        return modern_object_info(name, info) if self.p.gen.rich_executed else info

    async def object_info_one(self, request: web.Request) -> web.Response:
        """GET /object_info/{node_class}; unknown classes give {}."""
        name = request.match_info["node_class"]
        spec = NODES.get(name)
        if spec is None:
            return web.json_response({})
        return web.json_response({name: self._info(name, object_info(spec, self.p.env))})

    async def embeddings(self, request: web.Request) -> web.Response:
        """GET /embeddings."""
        return web.json_response([])

    async def models(self, request: web.Request) -> web.Response:
        """GET /models."""
        return web.json_response(["checkpoints", "embeddings"])

    async def models_folder(self, request: web.Request) -> web.Response:
        """GET /models/{folder}."""
        folder = request.match_info["folder"]
        if folder == "checkpoints":
            return web.json_response(self.p.env.checkpoints())
        if folder == "embeddings":
            return web.json_response([])
        return web.Response(status=404)

    async def history(self, request: web.Request) -> web.Response:
        """GET /history?max_items=&offset= (a bad number raises: 500 like ComfyUI)."""
        q = request.rel_url.query
        max_items = int(q["max_items"]) if "max_items" in q else None
        offset = int(q["offset"]) if "offset" in q else -1
        return web.json_response(self.p.queue.get_history(max_items=max_items, offset=offset))

    async def history_one(self, request: web.Request) -> web.Response:
        """GET /history/{prompt_id}: {} while pending/running or unknown."""
        return web.json_response(
            self.p.queue.get_history(prompt_id=request.match_info["prompt_id"])
        )

    async def get_queue(self, request: web.Request) -> web.Response:
        """GET /queue."""
        q = self.p.queue
        return web.json_response(
            {"queue_running": q.running_items(), "queue_pending": q.pending_items()}
        )

    async def post_prompt(self, request: web.Request) -> web.Response:
        """POST /prompt."""
        p = self.p
        if p.faults.reject_next:
            status, body = p.faults.reject_next.pop(0)
            return _injected(status, body)
        data = await _json_body(request)
        if not isinstance(data, dict):
            if isinstance(data, (list, str)) and not any(
                k in data for k in ("number", "front", "prompt")
            ):
                p.number += 1
                return _no_prompt()
            raise ServerCrash("body is not an object")
        if "number" in data:
            number: Any = float(data["number"])
        else:
            number = p.number
            if data.get("front"):
                number = -number
            p.number += 1
        if "prompt" not in data:
            return _no_prompt()
        prompt = data["prompt"]
        gen = p.gen
        if not gen.strict_prompt_ids:
            prompt_id = str(data.get("prompt_id", uuid.uuid4()))  # any string; null -> "None"
        elif data.get("prompt_id") is None:
            prompt_id = uuid4_text()
        elif is_canonical_uuid(data["prompt_id"]):
            prompt_id = data["prompt_id"]
        else:
            return web.json_response(INVALID_PROMPT_ID, status=400)
        if gen.jobs_api:  # node replacement came with the same server generation
            replace_nodes(prompt, p.replacements, NODES)
        partial = data.get("partial_execution_targets")
        ok, error, outputs, node_errors = validate_prompt(prompt, partial, p.env)
        if gen.dependency_cycle and isinstance(prompt, dict):
            ok, error, outputs = _refuse_cycles(prompt, partial, ok, error, outputs, node_errors)
        if gen.missing_node_type and error is not None:
            error = modern_error(error, prompt)
        extra = data.get("extra_data", {})
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        usage = request.headers.get("Comfy-Usage-Source")
        if gen.create_time and usage and isinstance(extra, dict):
            extra.setdefault("comfy_usage_source", usage)
        if not ok:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        if gen.hide_secrets_in_queue and isinstance(extra, dict):
            extra = {k: v for k, v in extra.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        if gen.create_time and isinstance(extra, dict):
            extra["create_time"] = int(time.time() * 1000)  # overwrites a client's value
        if not p.alive:
            raise ConnectionResetError("simulated server is gone")
        await p.queue.put([number, prompt_id, prompt, extra, outputs])
        p.prompts_received.append(prompt_id)
        if p.prompt_log is not None:
            p.prompt_log.write(prompt_id, number, extra.get("client_id"), prompt)
        # json_response of {"prompt_id", "number", "node_errors"}, the text written directly.
        errors = _dumps(node_errors) if node_errors else "{}"
        return web.Response(
            text=f'{{"prompt_id": {json_str(prompt_id)}, "number": {json_num(number)},'
            f' "node_errors": {errors}}}',
            content_type="application/json",
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        """POST /queue {"clear": true} / {"delete": [ids]}: pending items only."""
        data = await request.json()
        if data.get("clear"):
            await self.p.queue.wipe()
        if "delete" in data:
            for prompt_id in data["delete"]:
                await self.p.queue.delete(prompt_id)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        """POST /interrupt: global, or only if {"prompt_id"} is the running prompt."""
        try:
            data = await request.json()
        except json.JSONDecodeError:
            data = {}
        prompt_id = data.get("prompt_id")
        if not prompt_id or any(item[1] == prompt_id for item in self.p.queue.running_items()):
            self.p.executor.interrupted = True
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        """POST /free {"unload_models", "free_memory"}: free_memory empties the node cache."""
        data = await request.json()
        if data.get("unload_models", False):
            self.p.queue.flags["unload_models"] = data["unload_models"]
        if data.get("free_memory", False):
            self.p.queue.flags["free_memory"] = data["free_memory"]
        if not self.p.queue.running:
            self.p.executor.apply_flags()
        return web.Response(status=200)

    async def post_history(self, request: web.Request) -> web.Response:
        """POST /history {"clear": true} / {"delete": [ids]}."""
        data = await request.json()
        history = self.p.queue.history
        if data.get("clear"):
            history.clear()
        if "delete" in data:
            for prompt_id in data["delete"]:
                history.pop(prompt_id, None)
        return web.Response(status=200)

    async def upload_image(self, request: web.Request) -> web.Response:
        """POST /upload/image."""
        return await sim_files.upload(request, self.p.env, assets=self.p.gen.assets)

    async def upload_mask(self, request: web.Request) -> web.Response:
        """POST /upload/mask."""
        return await sim_files.upload(request, self.p.env, mask=True, assets=self.p.gen.assets)

    async def view(self, request: web.Request) -> web.StreamResponse:
        """GET /view."""
        return await sim_files.view(request, self.p.env, self.p.faults.view_delay, self.p.gen)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """Unknown GET paths: ComfyUI's static route answers an empty octet-stream 404."""
        resp = web.StreamResponse(status=404)
        resp.content_type = "application/octet-stream"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write_eof()
        return resp


def build_app(proc: SimProcess) -> web.Application:
    """The aiohttp application of one simulated ComfyUI process."""
    r = Routes(proc)
    table: list[tuple[str, str, Handler]] = [
        ("GET", "/ws", r.ws),
        ("GET", "/system_stats", r.system_stats),
        ("GET", "/features", r.features),
        ("GET", "/prompt", r.get_prompt),
        ("GET", "/object_info", r.object_info_all),
        ("GET", "/object_info/{node_class}", r.object_info_one),
        ("GET", "/embeddings", r.embeddings),
        ("GET", "/models", r.models),
        ("GET", "/models/{folder}", r.models_folder),
        ("GET", "/history", r.history),
        ("GET", "/history/{prompt_id}", r.history_one),
        ("GET", "/queue", r.get_queue),
        ("POST", "/prompt", r.post_prompt),
        ("POST", "/queue", r.post_queue),
        ("POST", "/interrupt", r.interrupt),
        ("POST", "/free", r.free),
        ("POST", "/history", r.post_history),
        ("POST", "/upload/image", r.upload_image),
        ("POST", "/upload/mask", r.upload_mask),
        ("GET", "/view", r.view),
    ]
    if proc.gen.jobs_api:
        jobs = JobRoutes(proc)
        table += [
            # Registered with a literal /api: served at /api/jobs and /api/api/jobs, not /jobs.
            ("GET", "/api/jobs", jobs.list),
            ("POST", "/api/jobs/cancel", jobs.cancel_many),
            ("GET", "/api/jobs/{job_id}", jobs.one),
            ("POST", "/api/jobs/{job_id}/cancel", jobs.cancel_one),
            ("GET", "/node_replacements", jobs.node_replacements),
        ]
    log = proc.faults.requests

    @web.middleware
    async def _log_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        log.append(f"{request.method} {request.path}")  # what the client asked, for tests
        # One middleware rather than two: each layer costs aiohttp a wrapper per request.
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:  # noqa: BLE001 - an escaping exception is ComfyUI's 500
            return crash_response()

    app = web.Application(
        client_max_size=SERVER_FEATURES["max_upload_size"], middlewares=[_log_request]
    )
    for prefix in ("/api", ""):
        for method, path, handler in table:
            app.router.add_route(method, prefix + path, handler)
    app.router.add_get("/{tail:.*}", r.not_found)
    return app


def _refuse_cycles(
    prompt: dict[str, Any],
    partial: Any,
    ok: bool,
    error: Any,
    outputs: list[str],
    node_errors: dict[str, Any],
) -> tuple[bool, Any, list[str]]:
    """Newer ComfyUI refuses link cycles at validation (``dependency_cycle`` node errors)."""
    candidates = [
        nid
        for nid, node in prompt.items()
        if isinstance(node, dict)
        and isinstance(node.get("class_type"), str)
        and getattr(NODES.get(node["class_type"]), "output_node", False)
        and (partial is None or nid in partial)
    ]
    cycles = dependency_cycles(prompt, candidates)
    if not cycles:
        return ok, error, outputs
    node_errors.update(cycles)
    blocked = {o for e in cycles.values() for o in e["dependent_outputs"]}
    outputs = [o for o in outputs if o not in blocked]
    if ok and not outputs:
        ok = False
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        }
    return ok, error, outputs
