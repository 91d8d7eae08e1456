"""The job record and the values that describe a state change."""

from __future__ import annotations

import asyncio
import enum
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec


class State(enum.StrEnum):
    """A job's state (the ``jobs.state`` column; the schema's CHECK lists the same values)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Stage(enum.StrEnum):
    """The stage a job is in or waits for (the ``jobs.stage`` column), in pipeline order."""

    PREPROCESS = "preprocess"
    GENERATE = "generate"
    POSTPROCESS = "postprocess"


STAGES = tuple(Stage)
TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})
NEXT_STAGE: dict[Stage, Stage | None] = {
    Stage.PREPROCESS: Stage.GENERATE,
    Stage.GENERATE: Stage.POSTPROCESS,
    Stage.POSTPROCESS: None,
}
# The key of each stage's duration (milliseconds) in a job's ``timings``.
STAGE_MS = {
    Stage.PREPROCESS: "preprocess_ms",
    Stage.GENERATE: "generation_ms",
    Stage.POSTPROCESS: "postprocess_ms",
}
# The job's message once its ComfyUI prompt id is chosen (the generate stage, or a claim or
# hand-off that chose it for the stage: comfyq.stages.runner).
PROMPT_MESSAGE = "Generation started (ComfyUI job: {})"


def prompt_message(prompt_id: str) -> str:
    return PROMPT_MESSAGE.format(prompt_id)


# Column text to member: a dict lookup, several times cheaper than ``State(text)`` (every row read).
_STATE_OF = {s.value: s for s in State}
_STAGE_OF = {s.value: s for s in Stage}

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
_TYPED: dict[Any, Callable[[str | bytes], Any]] = {}  # decoders of partial views (Job.view)
# A column larger than this is decoded in pieces, yielding to the event loop between them
# (Job.decode_fresh): one decode of a 5,000-node payload held the loop 43 ms (CPU) when the heap
# had just been trimmed (page faults), measured in bench_hostile.
DECODE_IN_PIECES = 64 * 1024
_PIECE = 64 * 1024  # an object or array larger than this is split into its members
# Member names typed with a constraint stay out of msgspec's cache of dict keys (512 slots, kept
# until every 10th full collection): a large workflow's node ids, allocated in the middle of its
# decode, kept heap arenas pinned there long after the workflow was freed.
_decode_members = msgspec.json.Decoder(
    dict[Annotated[str, msgspec.Meta(max_length=1 << 30)], msgspec.Raw]
).decode
_decode_items = msgspec.json.Decoder(list[msgspec.Raw]).decode


class _Pieces:
    """Decodes a large JSON document in pieces of about ``_PIECE`` bytes (runs of an object's
    members or an array's items, decoded together), yielding to the loop between pieces: the
    same value as one decode, key order kept."""

    async def decode(self, buf: bytes | msgspec.Raw, depth: int = 0) -> Any:
        view = memoryview(buf)
        if len(view) <= _PIECE or depth >= 8:
            return _json_decode(buf)
        head = _first(view)
        if head == b"{":
            members = _decode_members(buf)
            values = await self._run(list(members.values()), depth)
            return dict(zip(members, values, strict=True))
        if head == b"[":
            return await self._run(_decode_items(buf), depth)
        return _json_decode(buf)  # one long string or number

    async def _run(self, raws: list[msgspec.Raw], depth: int) -> list[Any]:
        out: list[Any] = []
        batch: list[msgspec.Raw] = []
        size = 0
        for raw in raws:
            n = len(memoryview(raw))
            if n > _PIECE:  # a large member: in pieces of its own
                out += await self._flush(batch)
                batch, size = [], 0
                out.append(await self.decode(raw, depth + 1))
                continue
            batch.append(raw)
            size += n
            if size >= _PIECE:
                out += await self._flush(batch)
                batch, size = [], 0
        out += await self._flush(batch)
        return out

    async def _flush(self, batch: list[msgspec.Raw]) -> list[Any]:
        if not batch:
            return []
        await asyncio.sleep(0)  # let the loop run between two pieces
        values: list[Any] = _json_decode(b"[" + b",".join(batch) + b"]")
        return values


def _first(view: memoryview) -> bytes:
    """The first byte of a JSON document that is not white space."""
    for i in range(min(len(view), 64)):
        c = bytes(view[i : i + 1])
        if c not in b" \t\r\n":
            return c
    return b""


def dumps(value: Any) -> str:
    """JSON text for a TEXT column."""
    return _json_encode(value).decode()


def loads(text: str | bytes | None) -> Any:
    return None if text is None else _json_decode(text)


def status_of(state: State, stage: Stage) -> str:
    """The Result ``status`` a client sees for a (state, stage) pair (the rule of jobs_overview)."""
    if state in TERMINAL:
        return str(state)
    if stage == Stage.PREPROCESS:
        return "queued" if state == State.PENDING else "processing"
    if stage == Stage.GENERATE:
        return "processing" if state == State.PENDING else "generating"
    return "postprocessing"


_JSON_COLS = ("payload", "prepared", "result", "error", "timings")
_PLAIN_COLS = (
    "id",
    "state",
    "stage",
    "priority",
    "attempts",
    "max_attempts",
    "message",
    "kind",
    "payload_hash",
    "lease_owner",
    "lease_expires_at",
    "run_after",
    "deadline_at",
    "comfy_prompt_id",
    "comfy_backend",
    "created_at",
    "updated_at",
    "stage_entered_at",
    "finished_at",
    "owner",
)
# Where from_row puts each column: plain columns in their own slot, JSON columns (decoded on first
# use) and cancel_requested (a bool on read) in a private one behind a property.
_SLOT = {
    **{c: c for c in _PLAIN_COLS},
    **{c: f"_{c}" for c in _JSON_COLS},
    "cancel_requested": "_cancel_requested",
}


_Builder = Callable[["Job", Any], None]
_BUILDERS: dict[tuple[str, ...], _Builder] = {}


def _builder(keys: tuple[str, ...]) -> _Builder:
    """A function that copies a row with these columns into a Job's slots in one unpacking.

    Generated once per column list (a query's shape; a handful exist), like dataclasses does.
    ``state`` and ``stage`` become their enum members.
    """
    fn = _BUILDERS.get(keys)
    if fn is None:
        targets = [f"job.{_SLOT[k]}" if k in _SLOT else f"extra[{k!r}]" for k in keys]
        extra = len(targets) > sum(k in _SLOT for k in keys)
        body = ["extra = {}" if extra else "extra = None", "job._extra = extra"]
        if targets:
            body.append(", ".join(targets) + (", = values" if len(targets) == 1 else " = values"))
        if "state" in keys:
            body.append("job.state = _STATE_OF[job.state]")
        if "stage" in keys:
            body.append("job.stage = _STAGE_OF[job.stage]")
        namespace: dict[str, Any] = {"_STATE_OF": _STATE_OF, "_STAGE_OF": _STAGE_OF}
        exec("def build(job, values):\n    " + "\n    ".join(body), namespace)  # noqa: S102 - our text
        fn = namespace["build"]
        if len(_BUILDERS) < 256:
            _BUILDERS[keys] = fn
    return fn


class Job:
    """One row of ``jobs`` (or of some of its columns). Columns are copied into slots once, so
    reading one is a plain attribute read; JSON columns are decoded on first use (a transition
    touches a few columns of rows whose workflows can be large). Columns a query did not select
    raise AttributeError, like any missing attribute."""

    __slots__ = (
        *_PLAIN_COLS,
        *(f"_{c}" for c in _JSON_COLS),
        "_cancel_requested",
        "_decoded",
        "_extra",
    )

    id: str
    state: State
    stage: Stage
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
    comfy_prompt_id: str | None
    comfy_backend: str | None
    created_at: str
    updated_at: str
    stage_entered_at: str
    finished_at: str | None
    owner: str | None  # the creating API key's id (comfyq.api.auth), never the key

    def __init__(self, row: sqlite3.Row | dict[str, Any]) -> None:
        if isinstance(row, dict):
            _builder(tuple(row))(self, tuple(row.values()))
        else:
            _builder(tuple(row.keys()))(self, row)
        self._decoded: dict[str, Any] = {}

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict[str, Any]) -> Job:
        return cls(row)

    def __getattr__(self, name: str) -> Any:  # only for names that are not slots
        extra = object.__getattribute__(self, "_extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(name)

    @property
    def cancel_requested(self) -> bool:
        return bool(self._cancel_requested)

    @cancel_requested.setter
    def cancel_requested(self, value: bool) -> None:
        self._cancel_requested = value

    def _json(self, key: str) -> Any:
        try:
            return self._decoded[key]
        except KeyError:
            value = self._decoded[key] = loads(object.__getattribute__(self, "_" + key))
            return value

    def stored(self, key: str) -> str | bytes | None:
        """JSON column ``key`` as stored (its text, not decoded); None when it is NULL or the
        query did not select it."""
        try:
            return object.__getattribute__(self, "_" + key)  # type: ignore[no-any-return]
        except AttributeError:
            return None

    def view(self, key: str, type_: Any) -> Any:
        """JSON column ``key`` decoded as ``type_``, typically a msgspec Struct naming the few
        fields a caller reads: the rest of the document is only scanned, never built (a
        5,000-node payload: ~0.4 ms instead of 4-12 ms for the whole). Not cached; None for NULL.
        Raises msgspec.ValidationError when the document does not fit ``type_``."""
        if key in self._decoded:  # already decoded whole: reuse it
            value = self._decoded[key]
            return None if value is None else msgspec.convert(value, type_)
        text = object.__getattribute__(self, "_" + key)
        if text is None:
            return None
        decode = _TYPED.get(type_)
        if decode is None:
            decode = _TYPED[type_] = msgspec.json.Decoder(type_).decode
        return decode(text)

    async def decode_fresh(self, key: str) -> Any:
        """JSON column ``key`` decoded into a new object the caller owns (may change), not
        cached; in pieces, yielding to the event loop between them, when the column is over
        ``DECODE_IN_PIECES``."""
        text = object.__getattribute__(self, "_" + key)
        if text is not None and len(text) > DECODE_IN_PIECES:
            return await _Pieces().decode(text.encode() if isinstance(text, str) else text)
        return loads(text)

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
        return (
            f"Job(id={self.id!r}, state={self.state.value!r}, stage={self.stage.value!r},"
            f" attempts={self.attempts})"
        )


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
    owner: str | None = None  # the creating API key's id (comfyq.api.auth.key_id)


@dataclass
class Transition:
    """A committed state or stage change: the ``job_events`` row, ready to publish."""

    event_id: int
    job_id: str
    from_state: State | None
    to_state: State
    stage: Stage
    attempt: int
    message: str
    at: str
    data: dict[str, Any] | None = None
    job: Job | None = field(default=None, repr=False)

    @property
    def status(self) -> str:
        return status_of(self.to_state, self.stage)
