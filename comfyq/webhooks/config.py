"""How the webhook sender behaves: limits, timeouts and retry policy, mapped from comfyq's
settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
