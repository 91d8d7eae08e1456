"""What the webhook outbox shows of a job: its deliveries and their attempts, for the Result.

The outbox itself (claims, attempts, recovery) is the store's (``JobStore.outbox_*``); the rows are
written by the database when a job ends.
"""

from __future__ import annotations

from typing import Any

from comfyq.netguard import redact_url
from comfyq.store import Attempt, JobStore

__all__ = ["Attempt", "history"]


async def history(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    """A job's deliveries, each with its attempts, oldest first (no secrets, URLs redacted)."""
    deliveries, attempts = await store.webhook_history(job_id)
    for d in deliveries:
        d.pop("host", None)
        d["url"] = redact_url(d["url"])
        d["attempt_log"] = [
            {k: v for k, v in a.items() if k != "delivery_id"}
            for a in attempts
            if a["delivery_id"] == d["id"]
        ]
        if d["state"] != "pending":
            d["next_attempt_at"] = None
    return deliveries
