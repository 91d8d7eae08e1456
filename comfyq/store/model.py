"""The job record and the values that describe a state change."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

import msgspec

STAGES = ("preprocess", "generate", "postprocess")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
NEXT_STAGE = {"preprocess": "generate", "generate": "postprocess", "postprocess": None}

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


def dumps(value: Any) -> str:
    """JSON text for a TEXT column."""
    return _json_encode(value).decode()


def loads(text: str | bytes | None) -> Any:
    return None if text is None else _json_decode(text)


def status_of(state: str, stage: str) -> str:
    """The Result ``status`` a client sees for a (state, stage) pair (same rule as jobs_overview)."""
    if state in TERMINAL:
        return state
    if stage == "preprocess":
        return "queued" if state == "pending" else "processing"
    if stage == "generate":
        return "processing" if state == "pending" else "generating"
    return "postprocessing"


@dataclass
class Job:
    """One row of ``jobs``, JSON columns decoded."""

    id: str
    state: str
    stage: str
    priority: int
    attempts: int
    max_attempts: int
    message: str
    kind: str
    payload: dict[str, Any]
    payload_hash: str
    prepared: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    timings: dict[str, Any]
    lease_owner: str | None
    lease_expires_at: str | None
    run_after: str
    deadline_at: str
    cancel_requested: bool
    comfy_prompt_id: str | None
    comfy_backend: str | None
    created_at: str
    updated_at: str
    stage_entered_at: str
    finished_at: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> Job:
        d = dict(row)
        for k in ("payload", "prepared", "result", "error", "timings"):
            d[k] = loads(d[k])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)

    @property
    def status(self) -> str:
        return status_of(self.state, self.stage)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass
class NewJob:
    """What admission knows about a job before it is written."""

    id: str
    payload: dict[str, Any]
    payload_hash: str
    priority: int = 0
    max_attempts: int = 3
    timeout: float = 3600.0
    kind: str = ""
    secrets: dict[str, Any] | None = None


@dataclass
class Transition:
    """A committed state or stage change: the ``job_events`` row, ready to publish."""

    event_id: int
    job_id: str
    from_state: str | None
    to_state: str
    stage: str
    attempt: int
    message: str
    at: str
    data: dict[str, Any] | None = None
    job: Job | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return status_of(self.to_state, self.stage)
