"""The one retry delay of comfyq: capped exponential backoff (jobs, webhooks, the store, ComfyUI
restarts)."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float, *, jitter: bool = True) -> float:
    """Seconds to wait after attempt number ``attempt`` failed: ``base`` doubled per attempt after
    the first, capped at ``cap``, times a random 50-100 % so retries of many jobs spread out
    (``jitter=False``: the plain schedule, for one process restarting one child)."""
    exp: float = min(cap, base * 2.0 ** max(0, attempt - 1))
    return exp * random.uniform(0.5, 1.0) if jitter else exp
