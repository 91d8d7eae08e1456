"""Standard Webhooks signing (``webhook-signature``) and the original wrapper's legacy header."""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["legacy_signature", "sign", "signing_key"]


def signing_key(secret: str) -> bytes:
    """The HMAC key: a ``whsec_`` secret is base64 (Standard Webhooks); any other is its UTF-8
    bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :] + "==")
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body``."""
    mac = hmac.new(signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def legacy_signature(secret: str, body: bytes) -> str:
    """The original wrapper's ``X-Webhook-Signature`` (hex HMAC of the body), kept for old
    receivers."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
