"""Schemathesis hooks for the fuzz run (loaded through ``SCHEMATHESIS_HOOKS``).

Tests reach only loopback: every generated string that looks like a URL is replaced by one on a
loopback port nothing listens on, which the server's address guard refuses (a 400), so the
URL-handling paths are still exercised and nothing is fetched or called outside the machine.
"""

from __future__ import annotations

from typing import Any

import schemathesis

LOOPBACK_URL = "http://127.0.0.1:9/fuzz"


def loopback(value: Any) -> Any:
    """``value`` with every URL-looking string pointed at loopback."""
    if isinstance(value, str):
        return LOOPBACK_URL if "://" in value or ":\\/" in value else value
    if isinstance(value, bytes):
        return LOOPBACK_URL.encode() if b"://" in value else value
    if isinstance(value, dict):
        return {k: loopback(v) for k, v in value.items()}
    if isinstance(value, list):
        return [loopback(v) for v in value]
    return value


SYNC_WAIT = 20  # seconds a /sync call may wait before its documented 202


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    case.body = loopback(case.body)
    if case.query:
        case.query = loopback(case.query)
    if str(case.path).endswith("/sync"):
        # A sync call waits for its job, which can sit behind hundreds the fuzzer queued: bound
        # the wait (the 202 that follows is documented) so that a run has a bounded length.
        query = dict(case.query or {})
        try:
            wait = float(query.get("timeout", "inf"))
        except (TypeError, ValueError):
            wait = 0.0  # not a number: the server answers 400 at once
        if not wait <= SYNC_WAIT:
            query["timeout"] = SYNC_WAIT
        case.query = query
