"""The floor of a job's cost in aiohttp: the same HTTP and websocket exchanges comfyq makes for a
trivial job, with nothing else.

A bare aiohttp server that answers the three requests of comfyq's ``POST /generate`` + SSE path
(``POST /generate``, ``GET /jobs/{id}/events``, ``GET /outputs/{id}/{name}``) and, for each job,
does what comfyq does with ComfyUI (``POST /prompt``, the prompt's messages on one shared
websocket, ``GET /view`` of each output). No queue, no database, no durability, no validation,
no logging, no metrics, no retries, outputs kept in memory: what is left is the price of the
exchanges themselves in aiohttp and asyncio on this machine, the part of comfyq's CPU per job
that no change inside comfyq can remove short of fewer exchanges or another HTTP stack.

    python -m bench.floor_server --port P --comfyui http://127.0.0.1:8188

Started by ``bench.bench_floor``; not a server for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

_decode = msgspec.json.decode
_encode = msgspec.json.encode
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class _Job:
    __slots__ = ("done", "images", "outputs")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.outputs: dict[str, bytes] = {}
        self.images: list[dict[str, Any]] = []


class Floor:
    def __init__(self, comfyui: str) -> None:
        self.comfyui = comfyui.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.jobs: dict[str, _Job] = {}
        self.by_prompt: dict[str, tuple[_Job, asyncio.Future[bool]]] = {}
        self.session: aiohttp.ClientSession | None = None
        self.reader: asyncio.Task[None] | None = None

    async def start(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession()
        ws = await self.session.ws_connect(f"{self.comfyui}/ws?clientId={self.client_id}")
        self.reader = asyncio.create_task(self._read(ws))

    async def stop(self, _app: web.Application) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.session is not None:
            await self.session.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = _decode(msg.data)
            data = m.get("data") or {}
            waiting = self.by_prompt.get(data.get("prompt_id", ""))
            if waiting is None:
                continue
            job, fut = waiting
            kind = m.get("type")
            if kind == "executed":
                job.images += (data.get("output") or {}).get("images") or []
            elif kind in ("execution_success", "execution_error") and not fut.done():
                fut.set_result(kind == "execution_success")

    async def _run(self, job_id: str, job: _Job, workflow: Any) -> None:
        assert self.session is not None
        prompt_id = str(uuid.uuid4())
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.by_prompt[prompt_id] = (job, fut)
        try:
            body = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id}
            async with self.session.post(
                self.comfyui + "/prompt",
                data=_encode(body),
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
            await fut
            for image in job.images:
                params = {
                    "filename": image["filename"],
                    "subfolder": image.get("subfolder", ""),
                    "type": image.get("type", "output"),
                }
                async with self.session.get(self.comfyui + "/view", params=params) as r:
                    job.outputs[image["filename"]] = await r.read()
        finally:
            self.by_prompt.pop(prompt_id, None)
            job.done.set()

    async def generate(self, request: web.Request) -> web.Response:
        doc = _decode(await request.read())
        job_id = uuid.uuid4().hex
        job = self.jobs[job_id] = _Job()
        asyncio.create_task(self._run(job_id, job, doc["input"]["workflow_json"]))
        return web.Response(
            status=202, body=_encode({"id": job_id}), content_type="application/json"
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["id"]
        job = self.jobs[job_id]
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        await job.done.wait()
        result = {
            "status": "completed" if job.outputs else "failed",
            "output": [{"url": f"/outputs/{job_id}/{name}"} for name in job.outputs],
        }
        await resp.write_eof(
            b"data: " + _encode({"status": "final_result", "result": result}) + b"\n\n"
        )
        return resp

    async def output(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        job = self.jobs[job_id]
        body = job.outputs.pop(request.match_info["name"])
        if not job.outputs:
            del self.jobs[job_id]  # every output fetched: nothing is kept
        return web.Response(body=body, content_type="image/png")


async def _health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--comfyui", required=True)
    args = ap.parse_args()
    floor = Floor(args.comfyui)
    app = web.Application()
    app.on_startup.append(floor.start)
    app.on_cleanup.append(floor.stop)
    app.router.add_get("/queue-info", _health)
    app.router.add_post("/generate", floor.generate)
    app.router.add_get("/jobs/{id}/events", floor.events)
    app.router.add_get("/outputs/{id}/{name}", floor.output)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
