"""The webhook sender: claims due deliveries from the durable outbox and posts them.

Delivery guarantee: a job that ends with a webhook URL is posted at least once, until a 2xx or
until its attempts or age run out, across restarts; receivers deduplicate on ``webhook-id``.

The delivery row is written by a trigger in the transaction that ends the job (migration 0002),
so no end is ever lost between "job finished" and "webhook queued". This sender claims due rows
(leased, ``state = 'sending'``), hands each to a ``Poster`` (``delivery.py``) on its own task, and
records every attempt (``webhook_attempts``) in the same transaction as the delivery's next state.
A cap on concurrent posts per receiver host means a slow or dead receiver delays nothing but its
own deliveries, and never a pipeline stage.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from comfyq.backoff import backoff
from comfyq.clock import parse_iso
from comfyq.logs import job_context
from comfyq.netguard import AddressGuard
from comfyq.store import Attempt, JobStore, Transition
from comfyq.store.model import TERMINAL
from comfyq.webhooks.config import WebhookConfig
from comfyq.webhooks.delivery import Poster, log_attempt, schedule

log = logging.getLogger("comfyq.webhooks")


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
        self._closing = False  # stop() runs: attempts are recorded once, not retried
        self.poster = Poster(store, self.cfg, self.clock)
        self.delivered = 0
        self.failed = 0
        store.listen(self._on_transitions)

    def _on_transitions(self, trs: list[Transition]) -> None:
        if self._loop_task is not None and any(_may_notify(t) for t in trs):
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
        if self.poster.session is None:
            self.poster.session = self.guard.session(headers={"User-Agent": self.cfg.user_agent})

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; give posts in flight ``grace`` seconds, then interrupt them (they
        resume)."""
        self._closing = True  # an attempt not recorded now is left to the lease, as before
        try:
            await self._stop(grace)
        finally:
            self._closing = False

    async def _stop(self, grace: float) -> None:
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
        if self.poster.session is not None:
            await self.poster.session.close()
            self.poster.session = None

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
                    # there may be more; a finishing post wakes the loop when slots are full
                    continue
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
        # The longest an attempt can take (the per-request timeout is capped at 300 s) plus a
        # margin.
        return max(self.cfg.timeout, 300.0) + self.cfg.lease_margin

    async def _until_next_due(self) -> float:
        now = self.clock.now()
        due = await self.store.outbox_next_due()
        if due is None:
            return self.cfg.poll_interval
        return max(0.001, min(self.cfg.poll_interval, parse_iso(due) - now + 0.001))

    async def deliver_due(self) -> int:
        """Burst mode: deliver every delivery due now (without the background loop); return how
        many.

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
            attempt = await self.poster.attempt(delivery, started)
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
        schedule(attempt, delivery, self.cfg, now)
        ok = await self._record(delivery, attempt)
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
        log_attempt(delivery, attempt, now)
        if self.on_attempt is not None:
            try:
                self.on_attempt(attempt.outcome)
            except Exception:
                log.exception("webhook metrics callback failed")

    async def _record(self, delivery: dict[str, Any], attempt: Attempt) -> bool:
        """Record the attempt (False: the lease was lost). While the database is away, keep
        trying for as long as the row's lease lasts: the row stays leased to this instance, so
        no other sends it meanwhile, and an exception here would leave it leased, unsent, until
        the lease expires (minutes)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._lease()
        tries = 0
        while True:
            try:
                return await self.store.outbox_record(delivery, attempt)
            except Exception as exc:  # the database may be away: keep trying
                tries += 1
                delay = backoff(tries, 0.25, 5.0)
                if self._closing or loop.time() + delay >= until:
                    raise
                log.warning(
                    "webhook %s: its attempt is not recorded yet (%s); retrying in %.2gs",
                    delivery["id"],
                    type(exc).__name__,
                    delay,
                    extra={"webhook_id": delivery["id"]},
                )
                await asyncio.sleep(delay)


def _may_notify(tr: Transition) -> bool:
    """Whether a committed change may have queued a delivery (the outbox trigger's condition: a
    job ending with a webhook URL). A job without one wakes nobody: waking claimed (a write) and
    read the outbox once per finished job for nothing. Unknown payload: wake, to be safe."""
    if tr.to_state not in TERMINAL:
        return False
    try:
        # input.webhook.url alone: the rest of the payload (a workflow of thousands of nodes) is
        # scanned, never built (decoding it whole at every job's end was one more burst of small
        # objects per large job, after its stages had freed theirs).
        view = tr.job.view("payload", _HookView) if tr.job is not None else None
    except Exception:  # noqa: BLE001 - a row read without its payload, or unreadable: wake
        view = None
    if view is None:
        return True
    hook = view.input.webhook if view.input is not None else None
    url = hook.url if hook is not None else None
    return isinstance(url, str) and url != ""


class _HookUrl(msgspec.Struct):
    url: Any = None


class _HookInput(msgspec.Struct):
    webhook: _HookUrl | None = None


class _HookView(msgspec.Struct):
    input: _HookInput | None = None
