"""What every route handler shares: the services plus the API's own helpers, kept on the app."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from comfyq.api.auth import Keys
from comfyq.api.queue import QueueView
from comfyq.looplag import LoopLag
from comfyq.metrics import Metrics
from comfyq.result import Results
from comfyq.schemas import ErrorBody, ErrorInfo
from comfyq.store import JobReads
from comfyq.webhooks.outbox import history

_encode = msgspec.json.Encoder().encode


@dataclass
class ApiOptions:
    """HTTP-layer knobs that are not operator settings (tests shorten them)."""

    heartbeat: float = 15.0  # SSE comment heartbeat interval, seconds
    ws_heartbeat: float = 20.0  # websocket ping interval, seconds
    stream_buffer: int = 64  # events buffered per subscriber before progress is dropped
    stream_coalesce: float = 0.02  # seconds an SSE event may wait (setting sse_coalesce_ms)
    cancel_wait: float = 5.0  # how long POST /cancel waits for a running job to stop
    stream_setups: int = 16  # streams reading their replay at once (a burst of 1000 waits its turn)
    readme: Path | None = None  # the README rendered at /; None: the project's own


class Api:
    """The services and the API helpers built on them."""

    def __init__(self, services: Any, options: ApiOptions) -> None:
        self.services = services
        self.settings = services.settings
        self.store = services.store
        self.bus = services.bus
        self.pipeline = services.pipeline
        self.options = options
        self.keys = Keys(self.settings.api_keys, self.settings.api_keys_file)
        self.reads: JobReads = self.store.reads()
        self.results = Results(
            self.reads,
            self.bus,
            base64_max_bytes=self.settings.output_base64_max_bytes,
            webhook_history=partial(history, self.store),
        )
        self.results.remote = services.outputs.fetch
        self.queue = QueueView(
            self.store, self.reads, self.pipeline, max_queue_size=self.settings.max_queue_size
        )
        # Other instances' state changes move this instance's queue positions too.
        services.cluster.wake.append(self.queue.on_transitions)
        self.metrics = Metrics(services)
        self.loop_lag = LoopLag(self.metrics.registry)  # started with the app (needs its loop)
        # Bounds the reads of a connection burst, and with them the server's memory high-water mark.
        self.stream_setup = asyncio.Semaphore(options.stream_setups)


API: web.AppKey[Api] = web.AppKey("api", Api)


async def close_api(app: web.Application) -> None:
    """on_cleanup: close what the API layer opened itself."""
    await app[API].reads.close()


def get_api(request: web.Request) -> Api:
    return request.app[API]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded by msgspec (structs, dicts, lists)."""
    return web.Response(
        body=_encode(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(
    info: ErrorInfo, status: int, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(ErrorBody(info), status, headers)
