"""The chaos run's webhook receiver: a process of its own that writes down every delivery.

Each POST is verified (Standard Webhooks signature) and appended to a JSON-lines file before it is
answered, so the record survives whatever happens to the process that reads it later. With
``--error-rate`` some deliveries are answered 503 (recorded as such) to make comfyq retry; with
``--delay`` each answer takes up to that many seconds, so posts are in flight when comfyq is killed.
A post whose sender hung up meanwhile is recorded as ``answered: "disconnected"`` (no 2xx got out).

    python -m bench.chaos_receiver --port P --log FILE --secret whsec_... [--error-rate 0.05]
                                   [--delay 0.3] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    """Records deliveries; answers 204, or 503 for a random share of them."""

    def __init__(self, log: Path, secret: str, error_rate: float, delay: float, seed: int) -> None:
        self.fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.verifier = Webhook(secret)
        self.error_rate, self.delay = error_rate, delay
        self.rng = random.Random(seed)

    async def hook(self, request: web.Request) -> web.Response:
        """POST /hook: verify, record, answer."""
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            self.verifier.verify(body, headers)
            sig_ok = True
        except WebhookVerificationError:
            sig_ok = False
        try:
            data: dict[str, Any] = json.loads(body)
        except ValueError:
            data = {}
        status = 503 if self.rng.random() < self.error_rate else 204
        await asyncio.sleep(self.rng.uniform(0.0, self.delay))
        gone = request.transport is None or request.transport.is_closing()
        rec = {
            "at": time.time(),
            "webhook_id": headers.get("webhook-id"),
            "job_id": data.get("id"),
            "event": data.get("status"),
            "extra": data.get("extra"),
            "attempts": data.get("attempts"),
            "outputs": len(data.get("output") or []),
            "sig_ok": sig_ok,
            "answered": "disconnected" if gone else status,
        }
        # Written (one O_APPEND write, in the page cache at once) before the answer leaves: a 2xx
        # that comfyq saw is always on file.
        os.write(self.fd, (json.dumps(rec) + "\n").encode())
        return web.Response(status=status)


def main() -> None:
    """Serve until SIGTERM."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--error-rate", type=float, default=0.0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rec = Receiver(args.log, args.secret, args.error_rate, args.delay, args.seed)
    app = web.Application()
    app.router.add_post("/hook", rec.hook)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
