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


_JSON_COLS = ("payload", "prepared", "result", "error", "timings")


class Job:
    """One row of ``jobs``. Columns are read from the row on access and JSON columns are decoded
    on first use: a transition touches a few columns of rows whose workflows can be large."""

    __slots__ = ("_row", "_over", "_decoded")

    id: str
    state: str
    stage: str
    priority: int
    attempts: int
    max_attempts: int
    message: str
    kind: str
    payload_hash: str
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

    def __init__(self, row: sqlite3.Row | dict[str, Any]) -> None:
        object.__setattr__(self, "_row", row)
        object.__setattr__(self, "_over", {})
        object.__setattr__(self, "_decoded", {})

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> Job:
        return cls(row)

    def __getattr__(self, name: str) -> Any:
        over = object.__getattribute__(self, "_over")
        if name in over:
            return over[name]
        try:
            value = object.__getattribute__(self, "_row")[name]
        except (IndexError, KeyError):
            raise AttributeError(name) from None
        return bool(value) if name == "cancel_requested" else value

    def __setattr__(self, name: str, value: Any) -> None:
        self._over[name] = value

    def _json(self, key: str) -> Any:
        try:
            return self._decoded[key]
        except KeyError:
            value = self._decoded[key] = loads(self._row[key])
            return value

    @property
    def payload(self) -> dict[str, Any]:
        return self._json("payload")  # type: ignore[no-any-return]

    @property
    def prepared(self) -> dict[str, Any] | None:
        return self._json("prepared")  # type: ignore[no-any-return]

    @property
    def result(self) -> dict[str, Any] | None:
        return self._json("result")  # type: ignore[no-any-return]

    @property
    def error(self) -> dict[str, Any] | None:
        return self._json("error")  # type: ignore[no-any-return]

    @property
    def timings(self) -> dict[str, Any]:
        return self._json("timings")  # type: ignore[no-any-return]

    @property
    def status(self) -> str:
        return status_of(self.state, self.stage)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, state={self.state!r}, stage={self.stage!r}, attempts={self.attempts})"


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
