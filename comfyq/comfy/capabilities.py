"""What one ComfyUI server can do, found by asking it, never assumed from its version number.

ComfyUI's version string is shown and logged only: intermediate releases carry partial feature
sets, so every capability comfyq acts on is probed (``shared/comfyui-protocol/NEWER.md`` §18):

* ``jobs_api``: ``GET /api/jobs?limit=1`` answers 200 with ``jobs`` and ``pagination``; then
  ``locate`` asks ``GET /api/jobs/{id}`` (one consistent answer) instead of ``/queue`` +
  ``/history``.
* ``atomic_cancel``: ``POST /api/jobs/cancel {"job_ids": []}`` answers 200 ``{"cancelled": false}``
  (an empty list acts on nothing); then ``cancel`` is one ``POST /api/jobs/{id}/cancel`` instead of
  ``/queue delete`` + ``/interrupt``.
* the rest comes from ``GET /features`` (the server's feature flags): ``assets``,
  ``node_replacements``, ``preview_metadata``.

A ComfyUI 0.3.64 answers both probes with 404/405, so it gets the old paths.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

# Probes, in the order the client sends them (concurrently).
JOBS_PROBE = "/api/jobs?limit=1"
CANCEL_PROBE = "/api/jobs/cancel"

Answer = tuple[int, str, bytes]  # status, content type, body
Request = Callable[..., Awaitable[Answer]]  # (method, path, json=...) -> Answer


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One probe's findings for one backend."""

    version: str | None = None
    jobs_api: bool = False
    atomic_cancel: bool = False
    features: dict[str, Any] = field(default_factory=dict)
    probed_at: float = 0.0  # wall clock, for /health

    @property
    def assets(self) -> bool:
        return self.features.get("assets") is True

    @property
    def node_replacements(self) -> bool:
        return self.features.get("node_replacements") is True

    @property
    def preview_metadata(self) -> bool:
        return self.features.get("supports_preview_metadata") is True

    def names(self) -> list[str]:
        """The capabilities that are on, sorted (the form /health shows)."""
        flags = {
            "jobs_api": self.jobs_api,
            "atomic_cancel": self.atomic_cancel,
            "assets": self.assets,
            "node_replacements": self.node_replacements,
            "preview_metadata": self.preview_metadata,
        }
        return sorted(name for name, on in flags.items() if on)

    def describe(self) -> str:
        """One line for the log."""
        return f"ComfyUI {self.version or '(version unknown)'}, capabilities: " + (
            ", ".join(self.names()) or "none beyond 0.3.64"
        )


def version_of(stats: dict[str, Any] | None) -> str | None:
    """``system.comfyui_version`` of a ``/system_stats`` answer."""
    system = (stats or {}).get("system")
    value = system.get("comfyui_version") if isinstance(system, dict) else None
    return value if isinstance(value, str) else None


def jobs_api_from(status: int, body: Any) -> bool:
    """The answer to ``GET /api/jobs?limit=1`` shows the jobs API."""
    return status == 200 and isinstance(body, dict) and "jobs" in body and "pagination" in body


def atomic_cancel_from(status: int, body: Any) -> bool:
    """The answer to ``POST /api/jobs/cancel {"job_ids": []}`` shows the cancel routes."""
    return status == 200 and isinstance(body, dict) and isinstance(body.get("cancelled"), bool)


def build(
    stats: dict[str, Any] | None,
    features: Any,
    jobs: tuple[int, Any],
    cancel: tuple[int, Any],
) -> Capabilities:
    """Capabilities from the probes' answers (status and decoded JSON, or None)."""
    return Capabilities(
        version=version_of(stats),
        jobs_api=jobs_api_from(*jobs),
        atomic_cancel=atomic_cancel_from(*cancel),
        features=dict(features) if isinstance(features, dict) else {},
        probed_at=time.time(),
    )


def json_of(answer: Answer) -> Any:
    """The decoded JSON body of an answer, or None (not JSON, or not decodable)."""
    if answer[1] != "application/json":
        return None
    try:
        return msgspec.json.decode(answer[2])
    except msgspec.DecodeError:
        return None


async def probe(request: Request, stats: dict[str, Any] | None) -> Capabilities:
    """Ask the server (``stats``: its ``/system_stats`` answer); raises what ``request`` raises."""
    features, jobs, cancel = await asyncio.gather(
        request("GET", "/features"),
        request("GET", JOBS_PROBE),
        # An empty list acts on nothing: 200 {"cancelled": false} where the route exists.
        request("POST", CANCEL_PROBE, json={"job_ids": []}),
    )
    return build(
        stats,
        json_of(features) if features[0] == 200 else None,
        (jobs[0], json_of(jobs)),
        (cancel[0], json_of(cancel)),
    )
