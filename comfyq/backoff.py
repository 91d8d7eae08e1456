"""The one retry delay of comfyq: capped exponential backoff with jitter (jobs and webhooks)."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after attempt number ``attempt`` failed: ``base`` doubled per attempt after
    the first, capped at ``cap``, times a random 50-100 % so retries of many jobs spread out."""
    exp: float = base * 2.0 ** max(0, attempt - 1)
    return min(cap, exp) * random.uniform(0.5, 1.0)
