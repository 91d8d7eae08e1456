"""Webhooks from a durable outbox, signed the Standard Webhooks way.

Delivery guarantee: a job that ends with a webhook URL is posted at least once, until a 2xx or
until its attempts or age run out, across restarts; receivers deduplicate on ``webhook-id``.

The delivery row is written by a trigger in the transaction that ends the job (migration 0002),
so no end is ever lost between "job finished" and "webhook queued". This sender claims due rows
(leased, ``state = 'sending'``), posts them through the address guard and records every attempt
(``webhook_attempts``) in the same transaction as the delivery's next state. Posting happens on
its own tasks with a cap on concurrent posts per receiver host: a slow or dead receiver delays
nothing but its own deliveries, and never a pipeline stage.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from comfyq.clock import parse_iso
from comfyq.errors import ComfyqError
from comfyq.logs import job_context
from comfyq.netguard import AddressGuard, BlockedAddress, redact_url
from comfyq.outputs.inline import inline_outputs
from comfyq.store import Attempt, Job, JobStore, Transition
from comfyq.store.model import TERMINAL
from comfyq.webhook_outbox import history

__all__ = [
    "Attempt",
    "WebhookConfig",
    "WebhookSender",
    "backoff",
    "build_body",
    "history",
    "legacy_signature",
    "sign",
    "signing_key",
]

log = logging.getLogger("comfyq.webhooks")

MiB = 1024 * 1024


@dataclass(frozen=True)
class WebhookConfig:
    """How the sender behaves; ``from_settings`` maps comfyq's settings onto it."""

    default_secret: str = field(default="", repr=False)
    timeout: float = 30.0  # per attempt, unless the request's webhook.timeout says otherwise
    max_attempts: int = 12
    max_age: float = 24 * 3600.0  # seconds after the job ended; then the delivery is given up
    retry_base: float = 5.0
    retry_max: float = 3600.0
    concurrency: int = 16  # posts in flight in total
    per_host: int = 8  # posts in flight to one receiver host...
    per_endpoint: int = 4  # ...and to one of its endpoints (URL without query)
    poll_interval: float = 5.0  # look for rows written by other processes (the CLI) this often
    lease_margin: float = 30.0
    base64_max_bytes: int = 10 * MiB
    user_agent: str = "comfyq-webhooks/1"

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> WebhookConfig:
        """From comfyq's Settings (``webhook_*``, ``output_base64_max_bytes``)."""
        values: dict[str, Any] = {
            "default_secret": settings.webhook_secret,
            "timeout": settings.webhook_timeout,
            "max_attempts": settings.webhook_max_attempts,
            "max_age": settings.webhook_max_age,
            "base64_max_bytes": settings.output_base64_max_bytes,
            "retry_base": settings.webhook_retry_base_delay,
            "retry_max": settings.webhook_retry_max_delay,
            "concurrency": settings.webhook_concurrency,
            "per_host": max(1, settings.webhook_concurrency // 2),
            "per_endpoint": max(1, settings.webhook_concurrency // 4),
            **overrides,
        }
        return cls(**values)


# --- signing ---------------------------------------------------------------------------------


def signing_key(secret: str) -> bytes:
    """The HMAC key: a ``whsec_`` secret is base64 (Standard Webhooks); any other is its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :] + "==")
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body``."""
    mac = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def legacy_signature(secret: str, body: bytes) -> str:
    """The original wrapper's ``X-Webhook-Signature`` (hex HMAC of the body), kept for old receivers."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempt: int, base: float, cap: float) -> float:
    """Capped exponential delay after attempt number ``attempt``, with jitter (50-100 %)."""
    exp: float = base * 2.0 ** max(0, attempt - 1)
    return min(cap, exp) * random.uniform(0.5, 1.0)


# --- the body --------------------------------------------------------------------------------


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


def _per_job_timeout(payload: dict[str, Any] | None, default: float) -> float:
    hook = ((payload or {}).get("input") or {}).get("webhook") or {}
    t = hook.get("timeout")
    return float(t) if isinstance(t, int | float) and t > 0 else default


def _scrub(text: str, url: str) -> str:
    """An error message with the URL (which may carry a token) replaced by its redacted form."""
    return text.replace(url, redact_url(url)) if url else text


# --- the sender ------------------------------------------------------------------------------


class WebhookSender:
    """Claims due deliveries and posts them; start after the store opens, stop before it closes."""

    def __init__(
        self,
        store: JobStore,
        guard: AddressGuard,
        config: WebhookConfig | None = None,
        *,
        on_attempt: Any = None,
    ) -> None:
        self.store = store
        self.guard = guard
        self.cfg = config or WebhookConfig()
        self.clock = store.clock
        self.on_attempt = on_attempt  # e.g. Metrics.webhook_delivery(outcome)
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0
        store.listen(self._on_transitions)

    def _on_transitions(self, trs: list[Transition]) -> None:
        if self._loop_task is not None and any(t.to_state in TERMINAL for t in trs):
            self._wake.set()

    def wake(self) -> None:
        """Look for due deliveries now (e.g. after another process wrote some)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Posts being sent right now."""
        return len(self._inflight)

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Requeue what a dead process left mid-attempt, then start sending."""
        self._open_session()
        n = await self.store.outbox_recover(self.cfg.max_attempts)
        if n:
            log.info("requeued %d webhook delivery(ies) interrupted by a previous stop", n)
        self._loop_task = asyncio.create_task(self._run(), name="webhook-sender")

    def _open_session(self) -> None:
        if self._session is None:
            self._session = self.guard.session(headers={"User-Agent": self.cfg.user_agent})

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; give posts in flight ``grace`` seconds, then interrupt them (they resume)."""
        if self._loop_task is not None:
            # Not cancelled: a claim cut short would leave rows leased with no task to send them.
            self._stopping = True
            self._wake.set()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
            self._stopping = False
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self.cfg.concurrency - len(self._inflight)
            if free > 0:
                try:
                    claimed = await self._claim(free)
                except Exception:
                    log.exception("claiming webhook deliveries failed")
                    claimed = []
                if claimed and len(claimed) == free or self._stopping:
                    continue  # there may be more; a finishing post wakes the loop when slots are full
            try:
                delay = self.cfg.poll_interval if free <= 0 else await self._until_next_due()
            except Exception:
                log.exception("reading the webhook outbox failed")
                delay = self.cfg.poll_interval
            if self._stopping:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _claim(self, n: int) -> list[dict[str, Any]]:
        rows = await self.store.outbox_claim(
            n, self.cfg.per_host, self._lease(), self.cfg.per_endpoint
        )
        for row in rows:
            task = asyncio.create_task(self._deliver(row), name=f"webhook:{row['id']}")
            self._inflight[row["id"]] = task
            task.add_done_callback(self._done)
        return rows

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task.get_name().removeprefix("webhook:"), None)
        self._wake.set()

    def _lease(self) -> float:
        # The longest an attempt can take (the per-request timeout is capped at 300 s) plus a margin.
        return max(self.cfg.timeout, 300.0) + self.cfg.lease_margin

    async def _until_next_due(self) -> float:
        now = self.clock.now()
        due = await self.store.outbox_next_due()
        if due is None:
            return self.cfg.poll_interval
        return max(0.001, min(self.cfg.poll_interval, parse_iso(due) - now + 0.001))

    async def deliver_due(self) -> int:
        """Burst mode: deliver every delivery due now (without the background loop); return how many.

        Opens the HTTP session if needed; ``stop()`` closes it."""
        self._open_session()
        total = 0
        while True:
            rows = await self._claim(self.cfg.concurrency)
            if not rows:
                return total
            total += len(rows)
            await asyncio.gather(
                *(self._inflight[r["id"]] for r in rows if r["id"] in self._inflight),
                return_exceptions=True,
            )

    # --- one attempt -------------------------------------------------------------------------

    async def _deliver(self, delivery: dict[str, Any]) -> None:
        with job_context(delivery["job_id"]):
            await self._deliver_one(delivery)

    async def _deliver_one(self, delivery: dict[str, Any]) -> None:
        started = self.clock.now()
        t0 = asyncio.get_running_loop().time()
        try:
            attempt = await self._attempt(delivery, started)
        except asyncio.CancelledError:
            attempt = Attempt(
                "retry", None, "interrupted: comfyq is stopping", started, next_at=started
            )
            await self._finish(delivery, attempt, t0)
            raise
        except Exception as exc:  # a bug must not leave the row leased until the lease expires
            log.exception(
                "webhook %s: unexpected error", delivery["id"], extra={"webhook_id": delivery["id"]}
            )
            attempt = Attempt("retry", None, f"internal error: {type(exc).__name__}", started)
        await self._finish(delivery, attempt, t0)

    async def _finish(self, delivery: dict[str, Any], attempt: Attempt, t0: float) -> None:
        now = self.clock.now()
        attempt.duration_ms = int((asyncio.get_running_loop().time() - t0) * 1000)
        if attempt.outcome == "retry" and attempt.next_at is None:
            deadline = parse_iso(delivery["created_at"]) + self.cfg.max_age
            if delivery["attempts"] >= self.cfg.max_attempts:
                attempt.outcome = "gave_up"
                attempt.error = f"{attempt.error}; gave up after {delivery['attempts']} attempt(s)"
            elif now >= deadline:
                attempt.outcome = "gave_up"
                attempt.error = f"{attempt.error}; gave up: older than {self.cfg.max_age:g}s"
            else:
                delay = backoff(delivery["attempts"], self.cfg.retry_base, self.cfg.retry_max)
                attempt.next_at = min(now + delay, deadline)
        ok = await self.store.outbox_record(delivery, attempt)
        if not ok:
            log.warning(
                "webhook %s: lease lost before its attempt could be recorded",
                delivery["id"],
                extra={"webhook_id": delivery["id"]},
            )
            return
        if attempt.outcome == "delivered":
            self.delivered += 1
        elif attempt.outcome == "gave_up":
            self.failed += 1
        level = logging.INFO if attempt.outcome == "delivered" else logging.WARNING
        # The host only: the URL's path and query may carry the receiver's token.
        nxt = (
            f"; next attempt in {max(0.0, attempt.next_at - now):.0f}s"
            if attempt.outcome == "retry" and attempt.next_at is not None
            else ""
        )
        log.log(
            level,
            "webhook %s for job %s to %s: attempt %d %s%s%s",
            delivery["id"],
            delivery["job_id"],
            delivery["host"],
            delivery["attempts"],
            attempt.outcome,
            f" ({attempt.error})" if attempt.error else f" (HTTP {attempt.status})",
            nxt,
            extra={
                "webhook_id": delivery["id"],
                "event": delivery.get("event"),
                "host": delivery["host"],
                "attempt": delivery["attempts"],
                "outcome": attempt.outcome,
                "http_status": attempt.status,
                "duration_ms": attempt.duration_ms,
            },
        )
        if self.on_attempt is not None:
            try:
                self.on_attempt(attempt.outcome)
            except Exception:
                log.exception("webhook metrics callback failed")

    async def _attempt(self, delivery: dict[str, Any], started: float) -> Attempt:
        if started >= parse_iso(delivery["created_at"]) + self.cfg.max_age:
            return Attempt("gave_up", None, f"not sent: older than {self.cfg.max_age:g}s", started)
        job = await self.store.get(delivery["job_id"])
        body = await build_body(self.store, job, delivery, self.cfg.base64_max_bytes)
        if job is None or body is None:
            return Attempt(
                "gave_up", None, "not sent: the job was retried or deleted since it ended", started
            )
        timeout = _per_job_timeout(job.payload, self.cfg.timeout)
        msg_id, ts = delivery["id"], int(self.clock.now())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
        }
        secret = delivery["secret"] or self.cfg.default_secret
        if secret:
            headers["webhook-signature"] = sign(secret, msg_id, ts, body)
            headers["X-Webhook-Signature"] = legacy_signature(secret, body)
        return await self._post(delivery["url"], body, headers, timeout, started)

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float, started: float
    ) -> Attempt:
        assert self._session is not None, "sender not started"
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                status = resp.status
                await resp.content.read(64 * 1024)  # a little, so the connection can be reused
        except BlockedAddress as exc:
            return Attempt("gave_up", None, f"refused by the address guard: {exc.message}", started)
        except ComfyqError as exc:  # e.g. the host does not resolve (yet)
            return Attempt("retry", None, exc.message, started)
        except TimeoutError:
            return Attempt("retry", None, f"timed out after {timeout:g}s", started)
        except aiohttp.ClientResponseError as exc:
            return Attempt(
                "retry",
                exc.status or None,
                _scrub(f"{type(exc).__name__}: {exc.message}", url),
                started,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return Attempt("retry", None, _scrub(f"{type(exc).__name__}: {exc}", url), started)
        if 200 <= status < 300:
            return Attempt("delivered", status, None, started)
        if status == 410:
            return Attempt(
                "gave_up", status, "HTTP 410: the receiver asked not to be called again", started
            )
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        return Attempt("retry", status, f"HTTP {status}{note}", started)
