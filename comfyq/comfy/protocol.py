"""ComfyUI's wire protocol: websocket message types, binary frames, and result shapes.

Everything here follows the traffic recorded from ComfyUI 0.3.64 (``shared/comfyui-protocol``).
Fields that a ComfyUI version may leave out have defaults, and unknown fields are ignored, so newer
servers that add fields keep working.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec

from comfyq.errors import Interrupted, NodeError

# Binary frame event types (u32 big-endian at the start of every binary frame).
PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

# Image type codes of a type-1 preview frame.
_LEGACY_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}

# LiveEvent kinds handed to callers (terminal messages are conveyed by return value or exception).
EVENT_KINDS = (
    "execution_start",
    "execution_cached",
    "executing",
    "progress",
    "progress_state",
    "executed",
    "preview",
    "text",
)

# Messages that end a prompt's execution.
TERMINAL_TYPES = frozenset({"execution_success", "execution_error", "execution_interrupted"})


class ProtocolError(ValueError):
    """A frame that does not follow ComfyUI's protocol."""


def canonical_prompt_id(value: str) -> str:
    """``value`` as a canonical lowercase hyphenated UUID; ValueError if it is no UUID.

    Newer ComfyUI refuses any other form with 400 ``invalid_prompt_id`` (0.3.64 took any string),
    and echoes ids in this form, so an id must be canonical before it is stored or watched.
    """
    return str(uuid.UUID(value))


# --- JSON text frames ---------------------------------------------------------------------


class Envelope(msgspec.Struct):
    """Every text frame: ``{"type": ..., "data": {...}}``; ``data`` is decoded by its type."""

    type: str
    data: msgspec.Raw = msgspec.Raw(b"{}")


class Status(msgspec.Struct):
    status: dict[str, Any] = msgspec.field(default_factory=dict)
    sid: str | None = None

    @property
    def queue_remaining(self) -> int | None:
        info = self.status.get("exec_info") or {}
        value = info.get("queue_remaining")
        return value if isinstance(value, int) else None


class ExecutionStart(msgspec.Struct):
    prompt_id: str | None = None
    timestamp: int | None = None


class ExecutionCached(msgspec.Struct):
    nodes: list[str] = msgspec.field(default_factory=list)
    prompt_id: str | None = None
    timestamp: int | None = None


class Executing(msgspec.Struct):
    # Sent without prompt_id (and display_node) when a socket reconnects mid-run.
    node: str | None = None
    display_node: str | None = None
    prompt_id: str | None = None


class Progress(msgspec.Struct):
    value: int | float = 0
    max: int | float = 0
    prompt_id: str | None = None
    node: str | None = None


class ProgressState(msgspec.Struct):
    # Only what routes it: the per-node states (every node of the workflow, in each message)
    # are skipped by the decoder, and decoded from ``WsMessage.data`` only when read.
    prompt_id: str | None = None


class Executed(msgspec.Struct):
    node: str | None = None
    display_node: str | None = None
    output: dict[str, Any] | None = None
    prompt_id: str | None = None


class ExecutionSuccess(msgspec.Struct):
    prompt_id: str | None = None
    timestamp: int | None = None


class ExecutionError(msgspec.Struct):
    prompt_id: str | None = None
    node_id: str | None = None
    node_type: str | None = None
    executed: list[str] = msgspec.field(default_factory=list)
    exception_message: str = ""
    exception_type: str = ""
    traceback: list[str] = msgspec.field(default_factory=list)
    current_inputs: dict[str, Any] | list[Any] = msgspec.field(default_factory=dict)
    current_outputs: dict[str, Any] | list[Any] = msgspec.field(default_factory=list)
    timestamp: int | None = None


class ExecutionInterrupted(msgspec.Struct):
    prompt_id: str | None = None
    node_id: str | None = None
    node_type: str | None = None
    executed: list[str] = msgspec.field(default_factory=list)
    timestamp: int | None = None


MESSAGE_TYPES: dict[str, type[msgspec.Struct]] = {
    "status": Status,
    "execution_start": ExecutionStart,
    "execution_cached": ExecutionCached,
    "executing": Executing,
    "progress": Progress,
    "progress_state": ProgressState,
    "executed": Executed,
    "execution_success": ExecutionSuccess,
    "execution_error": ExecutionError,
    "execution_interrupted": ExecutionInterrupted,
}

_envelope_decoder = msgspec.json.Decoder(Envelope)
_typed_decoders = {name: msgspec.json.Decoder(kind) for name, kind in MESSAGE_TYPES.items()}
_dict_decoder = msgspec.json.Decoder(dict[str, Any])
_NO_PROMPT_ID = object()


def _frame_struct(name: str, kind: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """``{"type": name, "data": kind}`` as one struct, tagged by ``type``."""
    return msgspec.defstruct(
        f"{kind.__name__}Frame",
        [("data", kind, msgspec.field(default_factory=kind))],
        tag=name,
        tag_field="type",
    )


# A known frame in one pass over its bytes (a progress_state of a large workflow is tens of KB):
# the type picks the struct of its data. Anything this refuses takes the two-step path below,
# which tells an unknown type from a malformed known one.
_FRAMES = {_frame_struct(name, kind): name for name, kind in MESSAGE_TYPES.items()}
_frame_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(Union[tuple(_FRAMES)])  # noqa: UP007


class _FrameData(msgspec.Struct):
    data: dict[str, Any] = msgspec.field(default_factory=dict)


_frame_data_decoder = msgspec.json.Decoder(_FrameData)


class WsMessage:
    """A decoded text frame: its typed form when the type is known, and the raw ``data`` dict,
    decoded only when asked for (routing and most messages need only the typed form)."""

    __slots__ = ("_data", "_frame", "_raw", "parsed", "type")

    def __init__(
        self,
        type: str,
        data: dict[str, Any] | None,
        parsed: msgspec.Struct | None,
        raw: msgspec.Raw | None = None,
        *,
        frame: str | bytes | None = None,
    ) -> None:
        self.type = type
        self.parsed = parsed
        self._data = data
        self._raw = raw  # the data object's bytes
        self._frame = frame  # or the whole frame's

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            # The typed form decoded from these bytes, so they are (or hold) a JSON object.
            if self._raw is not None:
                self._data = _dict_decoder.decode(self._raw)
            elif self._frame is not None:
                self._data = _frame_data_decoder.decode(self._frame).data
            else:
                self._data = {}
        return self._data

    @property
    def prompt_id(self) -> str | None:
        value = getattr(self.parsed, "prompt_id", _NO_PROMPT_ID)
        if value is _NO_PROMPT_ID:
            value = self.data.get("prompt_id")
        return value if isinstance(value, str) else None

    def __repr__(self) -> str:
        return f"WsMessage(type={self.type!r}, data={self.data!r}, parsed={self.parsed!r})"


def parse_text_frame(raw: str | bytes) -> WsMessage:
    """Decode one JSON text frame; raises ProtocolError if it is not ``{"type", "data"}``."""
    try:
        frame = _frame_decoder.decode(raw)
    except msgspec.DecodeError:  # unknown type or malformed: the two-step path says which
        pass
    else:
        return WsMessage(_FRAMES[type(frame)], None, frame.data, frame=raw)
    try:
        env = _envelope_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad text frame: {exc}") from exc
    decoder = _typed_decoders.get(env.type)
    if decoder is None:  # a type we do not know: its data as a dict
        try:
            return WsMessage(env.type, _dict_decoder.decode(env.data), None)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"bad text frame: {exc}") from exc
    # Straight from the bytes into the typed form: no dict first (most frames never need it).
    try:
        return WsMessage(env.type, None, decoder.decode(env.data), env.data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad {env.type} message: {exc}") from exc


# --- binary frames --------------------------------------------------------------------------


@dataclass(slots=True)
class Preview:
    """A live preview image (binary type 1, or type 4 with metadata)."""

    event_type: int
    image: bytes
    mime: str
    metadata: dict[str, Any] | None = None

    @property
    def prompt_id(self) -> str | None:
        value = (self.metadata or {}).get("prompt_id")
        return value if isinstance(value, str) else None

    @property
    def node_id(self) -> str | None:
        value = (self.metadata or {}).get("node_id")
        return value if isinstance(value, str) else None


@dataclass(slots=True)
class Text:
    """Progress text a node sends (binary type 3); ComfyUI broadcasts it to every socket."""

    node_id: str
    text: str


def parse_binary_frame(data: bytes) -> Preview | Text:
    """Decode a binary frame; raises ProtocolError for unknown or truncated frames."""
    if len(data) < 8:
        raise ProtocolError(f"binary frame too short ({len(data)} bytes)")
    event, second = struct.unpack_from(">II", data, 0)
    if event == PREVIEW_IMAGE:
        mime = _LEGACY_IMAGE_TYPES.get(second)
        if mime is None:
            raise ProtocolError(f"unknown preview image type {second}")
        return Preview(event, data[8:], mime)
    if event == TEXT:
        end = 8 + second
        if end > len(data):
            raise ProtocolError("text frame node id runs past the end")
        node_id = data[8:end].decode("utf-8", errors="replace")
        return Text(node_id, data[end:].decode("utf-8", errors="replace"))
    if event == PREVIEW_IMAGE_WITH_METADATA:
        end = 8 + second
        if end > len(data):
            raise ProtocolError("preview metadata runs past the end")
        try:
            meta = msgspec.json.decode(data[8:end])
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"bad preview metadata: {exc}") from exc
        if not isinstance(meta, dict):
            raise ProtocolError("preview metadata is not an object")
        mime = meta.get("image_type") if isinstance(meta.get("image_type"), str) else None
        return Preview(event, data[end:], mime or "application/octet-stream", meta)
    raise ProtocolError(f"unknown binary event type {event}")


def encode_binary_frame(frame: Preview | Text) -> bytes:
    """The wire form of a frame (inverse of parse_binary_frame; used by tests and relays)."""
    if isinstance(frame, Text):
        node = frame.node_id.encode()
        return struct.pack(">II", TEXT, len(node)) + node + frame.text.encode()
    if frame.event_type == PREVIEW_IMAGE:
        codes = {v: k for k, v in _LEGACY_IMAGE_TYPES.items()}
        return struct.pack(">II", PREVIEW_IMAGE, codes.get(frame.mime, 2)) + frame.image
    meta = msgspec.json.encode(frame.metadata or {})
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + frame.image


# --- what callers see -----------------------------------------------------------------------


class LiveEvent:
    """One progress event of a prompt, with ``node_type`` filled in from the workflow.

    ``data`` is the message's data object; for an event made from a websocket message
    (``source``) it is decoded only when read, since most listeners never read it (a
    ``progress_state`` of a large workflow lists every node, on every change of any of them).
    """

    __slots__ = (
        "_data",
        "_source",
        "image",
        "kind",
        "max",
        "mime",
        "node",
        "node_type",
        "prompt_id",
        "value",
    )

    def __init__(
        self,
        kind: str,
        prompt_id: str | None,
        node: str | None = None,
        node_type: str | None = None,
        value: int | None = None,
        max: int | None = None,
        data: dict[str, Any] | None = None,
        image: bytes | None = None,
        mime: str | None = None,
        *,
        source: WsMessage | None = None,
    ) -> None:
        self.kind = kind
        self.prompt_id = prompt_id
        self.node = node
        self.node_type = node_type
        self.value = value
        self.max = max
        self._data = data if data is not None or source is not None else {}
        self._source = source
        self.image = image
        self.mime = mime

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._source.data if self._source is not None else {}
        return self._data

    @data.setter
    def data(self, value: dict[str, Any]) -> None:
        self._data = value

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.kind,
            self.prompt_id,
            self.node,
            self.node_type,
            self.value,
            self.max,
            self.data,
            self.image,
            self.mime,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LiveEvent):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"LiveEvent(kind={self.kind!r}, prompt_id={self.prompt_id!r}, node={self.node!r}, "
            f"node_type={self.node_type!r}, value={self.value!r}, max={self.max!r}, "
            f"data={self.data!r}, mime={self.mime!r})"
        )


@dataclass(slots=True)
class SubmitResult:
    """ComfyUI's answer to ``POST /prompt``; non-empty ``node_errors``: only some outputs run."""

    prompt_id: str
    number: float
    node_errors: dict[str, Any]


@dataclass(slots=True)
class RunResult:
    """A finished prompt: ``outputs`` maps node id to ComfyUI's output dict, unchanged."""

    prompt_id: str
    outputs: dict[str, dict[str, Any]]
    cached_nodes: list[str] = field(default_factory=list)
    status: str = "success"
    messages: list[Any] = field(default_factory=list)
    source: str = "websocket"  # or "history": where the outcome was read
    # ComfyUI's own clock, epoch ms: queued_at (the server's create_time; newer ComfyUI only),
    # started_at and ended_at (execution_start and the final message).
    timing: dict[str, int] = field(default_factory=dict)


def _file_key(item: Any) -> Any:
    """What makes two output entries the same file: newer ComfyUI re-sends ``executed`` for
    cached nodes with fresh ``id``/``preview_id``/``metadata``, so whole-dict equality is not it."""
    if isinstance(item, dict) and isinstance(item.get("filename"), str):
        return ("file", item["filename"], item.get("subfolder") or "", item.get("type") or "")
    return ("value", msgspec.json.encode(item))


def merge_output(outputs: dict[str, dict[str, Any]], node: str, output: dict[str, Any]) -> None:
    """Merge one ``executed`` output into ``outputs`` (lists are extended, without duplicates).

    An entry naming a file already listed replaces it in place (the later one carries the ids
    ComfyUI registered for this prompt), so a re-sent ``executed`` never adds a second copy.
    """
    target = outputs.setdefault(node, {})
    for key, value in output.items():
        if not isinstance(value, list):
            target[key] = value
            continue
        current = target.get(key)
        if not isinstance(current, list):
            current = target[key] = []
        index = {_file_key(item): i for i, item in enumerate(current)}
        for item in value:
            k = _file_key(item)
            if k in index:
                current[index[k]] = item
            else:
                index[k] = len(current)
                current.append(item)


def node_error_from(data: dict[str, Any], prompt_id: str | None = None) -> NodeError:
    """The NodeError for an ``execution_error`` message (from the websocket or from history)."""
    try:
        err = msgspec.convert(data, ExecutionError, str_keys=True)
    except msgspec.ValidationError:
        err = ExecutionError()
    message = err.exception_message.strip() or err.exception_type or "node failed"
    details: dict[str, Any] = {
        "exception_type": err.exception_type,
        "exception_message": err.exception_message,
        "traceback": err.traceback,
        "current_inputs": err.current_inputs,
        "executed": err.executed,
    }
    if prompt_id or err.prompt_id:
        details["prompt_id"] = prompt_id or err.prompt_id
    return NodeError(message, node_id=err.node_id, node_type=err.node_type, details=details)


def interrupted_from(data: dict[str, Any], prompt_id: str | None = None) -> Interrupted:
    """The Interrupted error for an ``execution_interrupted`` message."""
    try:
        info = msgspec.convert(data, ExecutionInterrupted, str_keys=True)
    except msgspec.ValidationError:
        info = ExecutionInterrupted()
    where = f" at node {info.node_id} ({info.node_type})" if info.node_id else ""
    return Interrupted(
        f"ComfyUI interrupted the prompt{where}",
        node_id=info.node_id,
        node_type=info.node_type,
        details={"executed": info.executed, "prompt_id": prompt_id or info.prompt_id},
    )


def run_result_from_history(prompt_id: str, entry: dict[str, Any]) -> RunResult:
    """Turn a ``GET /history/{id}`` entry into a RunResult, or raise NodeError / Interrupted."""
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    cached: list[str] = []
    error: dict[str, Any] | None = None
    interrupted: dict[str, Any] | None = None
    for item in messages:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict)):
            continue
        name, data = item
        if name == "execution_cached":
            cached.extend(str(n) for n in data.get("nodes") or [])
        elif name == "execution_error":
            error = data
        elif name == "execution_interrupted":
            interrupted = data
    if error is not None:
        raise node_error_from(error, prompt_id)
    if interrupted is not None:
        raise interrupted_from(interrupted, prompt_id)
    status_str = status.get("status_str")
    # Very old ComfyUI versions wrote no status at all; an entry then only exists on success.
    if status_str not in (None, "success"):
        raise NodeError(
            f"ComfyUI finished the prompt with status {status_str!r} and no error details",
            details={"prompt_id": prompt_id, "status": status},
        )
    outputs = entry.get("outputs") or {}
    return RunResult(
        prompt_id=prompt_id,
        outputs={str(k): v for k, v in outputs.items() if isinstance(v, dict)},
        cached_nodes=cached,
        status="success",
        messages=list(messages),
        source="history",
        timing=timing_from_history(entry),
    )


def timing_from_history(entry: dict[str, Any]) -> dict[str, int]:
    """``RunResult.timing`` of a history entry (or of a jobs-API detail in that shape)."""
    timing: dict[str, int] = {}
    prompt = entry.get("prompt")
    extra = prompt[3] if isinstance(prompt, list) and len(prompt) > 3 else None
    created = extra.get("create_time") if isinstance(extra, dict) else None
    if isinstance(created, int) and not isinstance(created, bool):
        timing["queued_at"] = created
    status = entry.get("status")
    for item in (status.get("messages") or []) if isinstance(status, dict) else []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict)):
            continue
        stamp = item[1].get("timestamp")
        if not isinstance(stamp, int) or isinstance(stamp, bool):
            continue
        if item[0] == "execution_start":
            timing["started_at"] = stamp
        elif item[0] in TERMINAL_TYPES:
            timing["ended_at"] = stamp
    return timing


def queue_ids(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Prompt ids of ``GET /queue``: (running, pending sorted by ``number``)."""

    def entries(key: str) -> list[tuple[float, str]]:
        out: list[tuple[float, str]] = []
        for item in body.get(key) or []:
            if isinstance(item, (list, tuple)) and len(item) > 1 and isinstance(item[1], str):
                number = item[0] if isinstance(item[0], (int, float)) else 0
                out.append((float(number), item[1]))
        return out

    running = [pid for _, pid in entries("queue_running")]
    # The pending list comes in raw heap order, not sorted.
    pending = [pid for _, pid in sorted(entries("queue_pending"))]
    return running, pending
