"""A real webhook receiver on loopback (aiohttp's TestServer) and the outbox helpers shared by
the webhook and output tests."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from comfyq.store import JobStore, NewJob
from comfyq.store.model import Stage
from comfyq.store.sqlite import SqliteStore, connect
from support import serve


@dataclass
class Hit:
    """One request the receiver got, and what it did with it."""

    headers: dict[str, str]
    body: bytes
    action: str
    at: float


class Receiver:
    """An HTTP server that answers each POST as its plan says: ok, 500, 410, 302, hang or drop.

    ``plan`` is consumed one action per request; when it is empty, ``by_path[name]`` applies to
    ``/hook/<name>`` and ``default`` to everything else.
    """

    def __init__(self, default: str = "ok") -> None:
        self.default = default
        self.by_path: dict[str, str] = {}  # /hook/<name> -> its own default action
        self.plan: deque[str] = deque()
        self.hits: list[Hit] = []
        self.hanging = 0
        self._changed = asyncio.Event()
        self._server: TestServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        app.router.add_post("/hook/{name}", self._handle)
        self._server = await serve.start(app, port=port)
        assert self._server.port is not None
        self.port = self._server.port
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        name = request.match_info.get("name", "")
        action = self.plan.popleft() if self.plan else self.by_path.get(name, self.default)
        self.hits.append(
            Hit(dict(request.headers), body, action, asyncio.get_running_loop().time())
        )
        self._changed.set()
        if action == "hang":
            self.hanging += 1
            try:
                await asyncio.sleep(3600)
            finally:
                self.hanging -= 1
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()  # the connection dies without any response
            return web.Response(status=200)
        status = {"ok": 204, "500": 500, "410": 410, "302": 302}[action]
        headers = {"Location": "http://127.0.0.1:1/elsewhere"} if status == 302 else None
        return web.Response(status=status, headers=headers)

    def ok_hits(self) -> list[Hit]:
        return [h for h in self.hits if h.action == "ok"]

    async def wait_hits(self, n: int, timeout: float = 15.0) -> list[Hit]:
        """Until at least ``n`` requests arrived (a hang guard, not a timing assertion)."""
        async with asyncio.timeout(timeout):
            while len(self.hits) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.hits


async def wait_until(fn: Any, timeout: float = 15.0, interval: float = 0.02) -> Any:
    """Poll ``await fn()`` until it returns something truthy (hang guard only)."""
    async with asyncio.timeout(timeout):
        while True:
            value = await fn()
            if value:
                return value
            await asyncio.sleep(interval)


async def deliveries(store: JobStore, job_id: str | None = None) -> list[dict[str, Any]]:
    sql = (
        "SELECT * FROM webhook_deliveries"
        + (" WHERE job_id = ?" if job_id else "")
        + " ORDER BY created_at, id"
    )
    return _rows(store, sql, (job_id,) if job_id else ())


async def attempts(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return _rows(store, "SELECT * FROM webhook_attempts WHERE job_id = ? ORDER BY id", (job_id,))


def _rows(store: JobStore, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """The rows as the database holds them, read on a connection of the test's own."""
    assert isinstance(store, SqliteStore)
    conn = connect(store.path, readonly=True)
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


async def delivery_ended(store: JobStore, job_id: str) -> dict[str, Any] | None:
    rows = await deliveries(store, job_id)
    return rows[-1] if rows and rows[-1]["state"] in ("delivered", "failed") else None


def hook_job(
    job_id: str,
    url: str,
    *,
    secret: str | None = None,
    extra: dict[str, Any] | None = None,
    base64: bool = False,
    timeout: float | None = None,
) -> NewJob:
    """A job whose request names a webhook (secret kept apart, as admission does)."""
    hook: dict[str, Any] = {"url": url}
    if extra is not None:
        hook["extra_params"] = extra
    if timeout is not None:
        hook["timeout"] = timeout
    inp: dict[str, Any] = {
        "webhook": hook,
        "workflow_json": {"1": {"class_type": "X", "inputs": {}}},
    }
    if base64:
        inp["return_outputs_as_base64"] = True
    return NewJob(
        id=job_id,
        payload={"input": inp},
        payload_hash=job_id,
        secrets={"webhook_secret": secret} if secret else None,
    )


async def complete(
    store: JobStore, job_id: str, files: list[tuple[str, Path]] | None = None
) -> None:
    """Walk a pending job through the three stages to completed, recording ``files`` as outputs."""
    for stage in Stage:
        claimed = await store.claim(stage, 1, 30, stage)
        assert [j.id for j in claimed] == [job_id]
        if stage == "postprocess":
            for name, path in files or []:
                await store.put_output(
                    job_id,
                    {
                        "filename": name,
                        "node_id": "9",
                        "mimetype": "image/png",
                        "size": path.stat().st_size,
                        "local_path": str(path),
                        "url": f"/outputs/{job_id}/{name}",
                    },
                )
        await store.advance(
            job_id, "Processing complete." if stage == "postprocess" else f"{stage} done"
        )
