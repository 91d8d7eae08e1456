"""Webhooks: the durable outbox (``outbox``), Standard Webhooks signing (``signing``), the body
(``body``), one attempt (``delivery``) and the sender that claims and posts (``sender``)."""

from comfyq.webhooks.body import build_body
from comfyq.webhooks.config import WebhookConfig
from comfyq.webhooks.outbox import Attempt, history
from comfyq.webhooks.sender import WebhookSender
from comfyq.webhooks.signing import legacy_signature, sign, signing_key

__all__ = [
    "Attempt",
    "WebhookConfig",
    "WebhookSender",
    "build_body",
    "history",
    "legacy_signature",
    "sign",
    "signing_key",
]
