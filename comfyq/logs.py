"""Logging: one line per event, text or JSON, with the job id when there is one.

Job id: the stage runner, the webhook sender and the API middleware run each job's work inside
``job_context(id)``; a filter on the handler copies that id into every record logged meanwhile
(``extra={"job_id": ...}`` on a call wins). Tasks copy the context when they are created, so work
a job starts carries its id; shared work started on a job's behalf uses ``detached()``.

Secrets: call sites log URLs through ``netguard.redact_url`` and never log keys. As a safety net
every finished line goes through :class:`Redactor`: the configured secret values, URL userinfo and
query strings, ``Bearer`` tokens, ``whsec_`` secrets, sensitive query parameters and AWS
``Credential=``/``Signature=`` values are replaced. It cannot know a job's own secrets in free text.

Client text: every finished line, whichever logger wrote it (the access log, aiohttp, the
simulator), passes through :func:`clean`'s two rules in the formatter: control characters are
escaped (``\x00``, ``\n``, ``\u2028``), and the tokens log watchers act on (``WATCHED_TOKENS``)
are neutralised (``\x42ACKENDS_READY``). Only comfyq's own signal lines (``extra=SIGNAL``, the
message starting with the token) keep theirs.

Text format: the event on one line; a traceback follows on lines indented by two spaces, so a
line starting at column 0 is always a new event. JSON format: exactly one object per line,
traceback included (``exc``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Any

from comfyq.clock import parse_iso
from comfyq.store.model import TERMINAL, State

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "comfyq_job_id", default=None
)


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Lines logged inside (and by tasks created inside) carry ``job_id``; restored on exit."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


def emit(
    logger: logging.Logger, level: int, msg: str, args: tuple[Any, ...], extra: dict[str, Any]
) -> None:
    """``logger.log(level, msg, *args, extra=extra)`` for a line on a hot path (one per request,
    per job change), once ``logger.isEnabledFor(level)``: the same record, made without the stack
    walk that finds the caller's file and line (no format shows them; logging leaves them
    unknown the same way when ``logging._srcfile`` is None)."""
    logger.handle(
        logger.makeRecord(
            logger.name, level, "(unknown file)", 0, msg, args, None, "(unknown function)", extra
        )
    )


def detached() -> contextvars.Context:
    """A copy of the current context without a job id, for a task shared by several jobs."""
    ctx = contextvars.copy_context()
    ctx.run(job_id_var.set, None)
    return ctx


class JobIdFilter(logging.Filter):
    """Adds the context's job id to records that carry none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            job_id = job_id_var.get()
            if job_id is not None:
                record.job_id = job_id
        return True


# --- secrets ---------------------------------------------------------------------------------

_STOP = r"\s\"'\\<>`"  # ends a URL inside text, JSON (an escape starts with \) or markup
_USERINFO = re.compile(rf"(?P<s>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/{_STOP}@?#]+@")
_QUERY = re.compile(rf"(?P<u>://[^?#{_STOP}]*)[?#](?!<redacted>)[^{_STOP}]+")  # query and fragment
_PARAM = re.compile(
    rf"(?i)(?P<k>[?&](?:access_token|token|api[_-]?key|key|secret|password|passwd|sig|signature"
    rf"|x-amz-[a-z-]+)=)[^&#{_STOP}]+"
)
_BEARER = re.compile(r"(?i)\b(?P<k>bearer\s+)[A-Za-z0-9._~+/=-]+")
_WHSEC = re.compile(r"\bwhsec_[A-Za-z0-9+/=]+")
_CREDENTIAL = re.compile(r"(?P<k>\b(?:Credential|Signature)=)[A-Za-z0-9]+")  # SigV4 headers
MIN_SECRET = 6  # shorter configured values would blank ordinary words


class Redactor:
    """Replaces known secret values and secret-shaped text in a finished log line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values: set[str] = set()
        for s in secrets:
            if isinstance(s, str) and len(s) >= MIN_SECRET:
                values.add(s)
                values.add(json.dumps(s)[1:-1])  # the form it takes inside a JSON line
        self.secrets = sorted(values, key=len, reverse=True)  # longest first: no partial leftovers

    def __call__(self, line: str) -> str:
        for s in self.secrets:
            if s in line:
                line = line.replace(s, "***")
        if "://" in line:
            line = _USERINFO.sub(r"\g<s>***@", line)
            line = _QUERY.sub(r"\g<u>?<redacted>", line)
        if "=" in line:
            # Each pattern needs its own characters: most lines (an access line's "job=")
            # have none of them, and skip the scans.
            if "?" in line or "&" in line:
                line = _PARAM.sub(r"\g<k>***", line)
            if "Credential=" in line or "Signature=" in line:
                line = _CREDENTIAL.sub(r"\g<k>***", line)
        if "earer" in line or "EARER" in line:
            line = _BEARER.sub(r"\g<k>***", line)
        if "whsec_" in line:
            line = _WHSEC.sub("whsec_***", line)
        return line


def secret_values(settings: Any) -> list[str]:
    """Every value of a setting marked secret (API keys, S3 keys, the webhook secret)."""
    from comfyq.config import fields, is_secret

    out: list[str] = []
    for f in fields():
        if is_secret(f):
            value = getattr(settings, f.name)
            out.extend(value if isinstance(value, list) else [value])
    return [v for v in out if v]


# --- client text: control characters and watched tokens ---------------------------------------

# Log watchers (Vast.ai's worker, supervisors) take these for comfyq's own state; client text
# (a request_id, a URL path, ComfyUI's echo of a class_type) must never carry them into a line.
WATCHED_TOKENS = (
    "BACKENDS_READY_TIMEOUT",
    "BACKENDS_READY",
    "BACKEND_UNRECOVERABLE",
    "Application startup failed",
)
_WATCHED = re.compile(
    r"BACKENDS_READY|BACKEND_UNRECOVERABLE|Application startup failed", re.IGNORECASE
)
# Only comfyq's own signal lines pass ``extra=SIGNAL``: their message starts with the token,
# which is kept there; any other occurrence in the line is neutralised like client text.
SIGNAL: dict[str, Any] = {"signal": True}


def _neutral(m: re.Match[str]) -> str:
    text = m.group(0)
    return f"\\x{ord(text[0]):02x}{text[1:]}"  # "\x42ACKENDS_READY": readable, no longer the token


def _neutral_json(m: re.Match[str]) -> str:
    text = m.group(0)
    return f"\\\\x{ord(text[0]):02x}{text[1:]}"  # the same, inside a JSON string


def _escapes(keep_newline: bool) -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
    table |= {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}
    if keep_newline:
        del table[0x0A]
    return table


_ESCAPE = _escapes(keep_newline=False)
_ESCAPE_MULTILINE = _escapes(keep_newline=True)  # a traceback: its newlines are indented
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _maybe_watched(text: str) -> bool:
    """False only when ``text`` holds no watched token: each holds "backend" or "tartup", and
    every character the case-blind pattern takes for one of their letters lowers to it (checked
    over all of Unicode in the tests), so this is one lowering and two searches instead of the
    case-blind scan."""
    lowered = text.lower()
    return "backend" in lowered or "tartup" in lowered


def clean(text: str, *, multiline: bool = False) -> str:
    """``text`` safe for a log line: control characters escaped, watched tokens neutralised."""
    if _CONTROL.search(text):
        text = text.translate(_ESCAPE_MULTILINE if multiline else _ESCAPE)
    return _WATCHED.sub(_neutral, text) if _maybe_watched(text) else text


def neutralise(line: str, *, json_text: bool = False) -> str:
    """A finished line with every watched token neutralised."""
    if not _maybe_watched(line):
        return line
    return _WATCHED.sub(_neutral_json if json_text else _neutral, line)


def _signal_token(record: logging.LogRecord) -> str | None:
    if getattr(record, "signal", False) and isinstance(record.msg, str):
        m = _WATCHED.match(record.msg)
        if m is not None:
            return m.group(0)
    return None


def _restore_signal(line: str, record: logging.LogRecord, json_text: bool) -> str:
    """A signal line gets its own token back (the first occurrence: its message starts with it)."""
    token = _signal_token(record)
    if token is None:
        return line
    m = _WATCHED.search(token)
    assert m is not None
    return line.replace((_neutral_json if json_text else _neutral)(m), token, 1)


# --- formatters ------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, job_id (when any), extras, exc."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact or Redactor()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second of log lines
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            out["job_id"] = job_id
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        line = self.redact(json.dumps(out, default=str).replace("\x7f", "\\u007f"))
        return _restore_signal(neutralise(line, json_text=True), record, json_text=True)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: message job=<id>``; a traceback follows, indented."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.redact = redact or Redactor()
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's own ``asctime`` (local time, ``,`` and milliseconds), with one strftime per
        second of log lines."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
        return f"{self._stamp},{int(record.msecs):03d}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        job = getattr(record, "job_id", None)
        if job and str(job) not in record.message:
            line = f"{line} job={job}"
        if _CONTROL.search(line):  # the event stays on one line, whatever a client sent
            line = line.translate(_ESCAPE)
        return line

    def formatException(self, ei: Any) -> str:
        return "  " + super().formatException(ei).translate(_ESCAPE_MULTILINE).replace("\n", "\n  ")

    def formatStack(self, stack_info: str) -> str:
        return "  " + stack_info.translate(_ESCAPE_MULTILINE).replace("\n", "\n  ")

    def format(self, record: logging.LogRecord) -> str:
        line = self.redact(super().format(record))
        return _restore_signal(neutralise(line), record, json_text=False)


# --- setup -----------------------------------------------------------------------------------

# Loggers whose debug output is noise or carries job payloads (SQL parameters): never below WARNING.
QUIET_ALWAYS = ("aiosqlite", "markdown_it", "charset_normalizer", "multipart", "PIL")
# Wire-level chatter of the S3 and HTTP libraries: WARNING unless comfyq runs at debug.
QUIET_UNLESS_DEBUG = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3")


def setup(
    level: str = "info",
    fmt: str = "text",
    *,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Configure the root logger for the process: one handler, its level, the noisy loggers."""
    lvl = logging.getLevelNamesMapping().get(level.upper())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}")
    redact = Redactor(secrets)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    handler.addFilter(JobIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # aiohttp, asyncio and comfyq follow the root level; a level set on them earlier would not.
    for name in (
        "comfyq",
        "aiohttp",
        "aiohttp.access",
        "aiohttp.server",
        "aiohttp.web",
        "aiohttp.client",
        "aiohttp.websocket",
        "asyncio",
    ):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name in QUIET_ALWAYS:
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING))
    for name in QUIET_UNLESS_DEBUG:
        logging.getLogger(name).setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    # No format shows a record's process id or process name: a getpid() system call and a
    # multiprocessing lookup per line saved.
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.captureWarnings(True)  # warnings.warn becomes one log event, not raw stderr lines
    sys.excepthook = _log_uncaught
    return handler


def configure(settings: Any, *, stream: IO[str] | None = None) -> logging.Handler:
    """``setup`` from the settings: ``api_log_level``, ``log_format``, the secret settings."""
    return setup(
        settings.api_log_level, settings.log_format, secrets=secret_values(settings), stream=stream
    )


def _log_uncaught(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(tp, KeyboardInterrupt):
        sys.__excepthook__(tp, value, tb)
        return
    logging.getLogger("comfyq").critical("uncaught exception", exc_info=(tp, value, tb))


# --- job lifecycle lines ---------------------------------------------------------------------

_jobs_log = logging.getLogger("comfyq.jobs")


def log_transitions(transitions: Iterable[Any]) -> None:
    """A store listener: one line per job state change (info for queued and ends, else debug)."""
    for tr in transitions:
        _log_transition(tr)


def _log_transition(tr: Any) -> None:
    end = tr.to_state in TERMINAL
    level = logging.INFO if tr.from_state is None or end else logging.DEBUG
    if tr.to_state == State.FAILED:
        level = logging.WARNING
    if not _jobs_log.isEnabledFor(level):
        return  # this runs after every commit: nothing is built for a line nobody reads
    job = tr.job
    extra: dict[str, Any] = {
        "job_id": tr.job_id,
        "state": tr.to_state,
        "stage": tr.stage,
        "attempt": tr.attempt,
    }
    if tr.from_state is None:
        text = "queued"
        if job is not None:
            extra.update(kind=job.kind or "workflow", priority=job.priority)
    elif tr.to_state == State.RUNNING:
        text = f"{tr.stage} started (attempt {tr.attempt})"
    elif tr.to_state == State.PENDING:
        text = f"waiting for {tr.stage}: {tr.message}"
    elif end:
        text = tr.to_state
        if job is not None:
            timings = {
                k: round(v) for k, v in (job.timings or {}).items() if isinstance(v, int | float)
            }
            if job.finished_at:
                total = (parse_iso(job.finished_at) - parse_iso(job.created_at)) * 1000
                timings["total_ms"] = round(total)
                text += f" after {total / 1000:.2f}s"
            extra["timings"] = timings
            if tr.to_state == State.FAILED and (job.error or {}).get("type"):
                extra["error_type"] = (job.error or {})["type"]
        if tr.to_state != State.COMPLETED:
            text += f" in {tr.stage}: {tr.message}"
    else:
        text = f"{tr.to_state}: {tr.message}"
    emit(_jobs_log, level, "job %s: %s", (tr.job_id, text), extra)


def attach(services: Any) -> None:
    """Log the job lifecycle of a running Services (its store's transitions)."""
    services.store.listen(log_transitions)
