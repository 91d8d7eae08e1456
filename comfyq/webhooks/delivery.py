"""One delivery attempt: build the body, sign it, POST it through the address guard, classify the
outcome, decide the next step (retry with backoff, or give up) and log it.

Nothing here touches the outbox's rows: the sender records the returned ``Attempt``.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from comfyq.backoff import backoff
from comfyq.clock import Clock, parse_iso
from comfyq.errors import ComfyqError
from comfyq.netguard import BlockedAddress, redact_url
from comfyq.store import JobStore
from comfyq.webhooks.body import build_body, per_job_timeout
from comfyq.webhooks.config import WebhookConfig
from comfyq.webhooks.outbox import Attempt
from comfyq.webhooks.signing import legacy_signature, sign

log = logging.getLogger("comfyq.webhooks")


def _scrub(text: str, url: str) -> str:
    """An error message with the URL (which may carry a token) replaced by its redacted form."""
    return text.replace(url, redact_url(url)) if url else text


class Poster:
    """Makes attempts for the sender: one HTTP session, the config, the clock."""

    def __init__(self, store: JobStore, cfg: WebhookConfig, clock: Clock) -> None:
        self.store = store
        self.cfg = cfg
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None

    async def attempt(self, delivery: dict[str, Any], started: float) -> Attempt:
        """Build, sign and post one delivery; the outcome, never an exception for HTTP trouble."""
        if started >= parse_iso(delivery["created_at"]) + self.cfg.max_age:
            return Attempt("gave_up", None, f"not sent: older than {self.cfg.max_age:g}s", started)
        job = await self.store.get(delivery["job_id"])
        body = await build_body(self.store, job, delivery, self.cfg.base64_max_bytes)
        if job is None or body is None:
            return Attempt(
                "gave_up", None, "not sent: the job was retried or deleted since it ended", started
            )
        timeout = per_job_timeout(job, self.cfg.timeout)
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
        assert self.session is not None, "sender not started"
        try:
            async with self.session.post(
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


def schedule(attempt: Attempt, delivery: dict[str, Any], cfg: WebhookConfig, now: float) -> None:
    """A retry without a time gets one (capped backoff, never past the age limit), or gives up."""
    if attempt.outcome != "retry" or attempt.next_at is not None:
        return
    deadline = parse_iso(delivery["created_at"]) + cfg.max_age
    if delivery["attempts"] >= cfg.max_attempts:
        attempt.outcome = "gave_up"
        attempt.error = f"{attempt.error}; gave up after {delivery['attempts']} attempt(s)"
    elif now >= deadline:
        attempt.outcome = "gave_up"
        attempt.error = f"{attempt.error}; gave up: older than {cfg.max_age:g}s"
    else:
        delay = backoff(delivery["attempts"], cfg.retry_base, cfg.retry_max)
        attempt.next_at = min(now + delay, deadline)


def log_attempt(delivery: dict[str, Any], attempt: Attempt, now: float) -> None:
    """One line per attempt; the receiver's host only (its path and query may carry a token)."""
    level = logging.INFO if attempt.outcome == "delivered" else logging.WARNING
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
