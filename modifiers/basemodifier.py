"""BaseModifier: the base class of workflow modifiers, compatible with the original wrapper's.

A modifier loads an API-format workflow (``WORKFLOW_JSON``), writes request values into its nodes
in ``apply_modifications`` and then calls ``super().apply_modifications()``, which replaces URL
strings by the names of downloaded inputs and ``__RANDOM_INT__`` placeholders by random integers.

The admission check runs a modifier once without downloading anything and treats every
modification key it never read as unknown, so read every key you accept on every code path (or
list them in ``ACCEPTS``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgspec

UrlResolver = Callable[[str], Awaitable[str]]

DEFAULT_WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"
RANDOM_INT_PLACEHOLDER = "__RANDOM_INT__"
_MAX_URL_LENGTH = 8192
_REQUIRED: Any = object()
_PREFIX_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,127}")

# Parsed workflow files, keyed by path and invalidated by mtime/size, so a modifier run does not
# re-read its file from disk for every job.
_RECHECK_SECONDS = 2.0


@dataclass
class _CachedFile:
    mtime_ns: int
    size: int
    text: str
    checked_at: float


_workflow_cache: dict[Path, _CachedFile] = {}
_resolved_paths: dict[tuple[type, tuple[Path, ...]], Path] = {}


class ModificationError(ValueError):
    """A modification value is missing or unusable; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class MissingModification(ModificationError, IndexError):
    """A required modification is absent (IndexError for compatibility with the original)."""


class WorkflowFileError(RuntimeError):
    """A modifier's workflow file is missing or is not an API-format workflow object."""


class TrackingDict(dict[str, Any]):
    """A dict that remembers which keys were read (for the admission check)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accessed: set[str] = set()

    def _all(self) -> None:
        self.accessed.update(super().keys())

    def __getitem__(self, key: str) -> Any:
        self.accessed.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.accessed.add(key)
        return super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.accessed.add(key)
        return super().get(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        self.accessed.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.accessed.add(key)
        return super().setdefault(key, default)

    # Code that walks every item consumes every key.
    def keys(self) -> Any:
        self._all()
        return super().keys()

    def items(self) -> Any:
        self._all()
        return super().items()

    def values(self) -> Any:
        self._all()
        return super().values()

    def __iter__(self) -> Iterator[str]:
        self._all()
        return super().__iter__()


def looks_like_url(value: object) -> bool:
    """True for whole-string http(s) URLs (the strings that get downloaded)."""
    if not isinstance(value, str) or len(value) > _MAX_URL_LENGTH:
        return False
    head = value[:8].lower()
    if not head.startswith(("http://", "https://")):
        return False
    return not any(c.isspace() for c in value)


_URL_START = re.compile(rb"(?i)https?://")
_JSON_ESCAPED = re.compile(rb'["\\\x00-\x1f]')


def _json_text(workflow: Any) -> bytes | None:
    """The workflow as JSON, to look for a string in it at C speed instead of walking every value
    in Python (5,000 nodes: ~50 ms per walk); None when it cannot be encoded (then walk)."""
    try:
        return msgspec.json.encode(workflow)
    except (msgspec.EncodeError, TypeError, ValueError):
        return None


def string_slots(obj: Any) -> Iterator[tuple[dict[Any, Any] | list[Any], Any, str]]:
    """Every (container, key, string value) in a nested dict/list structure."""
    stack: list[Any] = [obj]
    while stack:
        node = stack.pop()
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in pairs:
            if isinstance(v, str):
                yield node, k, v
            elif isinstance(v, (dict, list)):
                stack.append(v)


async def replace_urls(workflow: Any, resolve: UrlResolver) -> None:
    """Replace every whole-string http(s) URL in ``workflow`` by ``await resolve(url)``."""
    text = _json_text(workflow)
    if text is not None and not _URL_START.search(text):
        return
    slots = [(c, k, v) for c, k, v in string_slots(workflow) if looks_like_url(v)]
    if not slots:
        return
    unique = list(dict.fromkeys(v for _, _, v in slots))
    tasks = [asyncio.ensure_future(resolve(u)) for u in unique]
    try:
        names = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    mapping = dict(zip(unique, names))
    for container, key, value in slots:
        container[key] = mapping[value]


def replace_random_ints(
    workflow: Any,
    lo: int = 0,
    hi: int = 2**32 - 1,
    placeholder: str = RANDOM_INT_PLACEHOLDER,
) -> None:
    """Replace ``placeholder`` values: whole strings become ints, embedded ones are substituted."""
    pattern = re.compile(re.escape(placeholder))
    literal = placeholder.encode()
    text = _json_text(workflow)
    if text is not None and not _JSON_ESCAPED.search(literal) and literal not in text:
        return  # (a placeholder JSON would escape is looked for the slow way)
    for container, key, value in list(string_slots(workflow)):
        if value == placeholder:
            container[key] = random.randint(lo, hi)
        elif placeholder in value:
            container[key] = pattern.sub(lambda _m: str(random.randint(lo, hi)), value)


def _read_if_changed(path: Path, cached: _CachedFile | None) -> tuple[int, int, str | None]:
    """(mtime_ns, size, text), the text None when ``cached`` still holds it (blocking)."""
    st = path.stat()
    if cached is not None and (cached.mtime_ns, cached.size) == (st.st_mtime_ns, st.st_size):
        return st.st_mtime_ns, st.st_size, None
    return st.st_mtime_ns, st.st_size, path.read_text(encoding="utf-8")


async def read_workflow_file(path: Path) -> dict[str, Any]:
    """Load an API-format workflow JSON file (cached by mtime; a fresh object every call)."""
    now = time.monotonic()
    cached = _workflow_cache.get(path)
    if cached is not None and now - cached.checked_at < _RECHECK_SECONDS:
        text = cached.text  # edits show up within _RECHECK_SECONDS, without a stat per job
    else:
        if cached is not None:
            cached.checked_at = now  # concurrent loads keep using the text meanwhile
        # One thread hop: the stat, and the read only when the file changed.
        mtime_ns, size, fresh = await asyncio.to_thread(_read_if_changed, path, cached)
        if fresh is None:
            assert cached is not None  # None only when the cached stat matched
            text = cached.text
        else:
            text = fresh
        _workflow_cache[path] = _CachedFile(mtime_ns, size, text, now)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowFileError(f"workflow file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WorkflowFileError(f"workflow file {path} does not hold a JSON object")
    return data


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED = re.compile(r"`([^`]*)`")


class ParamsError(ModificationError):
    """A typed parameter is unknown, missing, of the wrong type or out of range.

    ``key`` is the JSONPath tail below the parameters object (``width``, ``loras[0].url``)."""


def parse_params(params_type: type[Any], modifications: dict[str, Any]) -> Any:
    """``modifications`` converted to the modifier's ``Params`` Struct, or ParamsError naming the
    field. Numbers and booleans sent as strings are accepted, as the untyped helpers did."""
    try:
        return msgspec.convert(modifications, params_type, strict=False)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        assert m is not None  # the pattern matches any text
        msg, tail = m.group("msg"), (m.group("path") or "").lstrip(".")
        named = _NAMED.search(msg)
        if msg.startswith("Object contains unknown field") and named:
            key = ".".join(p for p in (tail, named.group(1)) if p)
            raise ParamsError(key, f"unknown parameter '{key}'") from None
        if msg.startswith("Object missing required field") and named:
            key = ".".join(p for p in (tail, named.group(1)) if p)
            raise ParamsError(key, f"parameter '{key}' is required") from None
        raise ParamsError(tail, f"parameter '{tail or '$'}': {msg}") from None


class BaseModifier:
    """Loads a workflow, applies request values, downloads URLs and fills random ints.

    A typed modifier declares ``Params``, a msgspec Struct of its parameters (types, defaults,
    bounds, enums, descriptions): requests are checked against it before any job is created, the
    OpenAPI document shows it, and ``self.params`` holds the converted values.
    """

    # The modifier's parameters (a msgspec Struct, ``forbid_unknown_fields=True``); None = untyped.
    Params: ClassVar[type[Any] | None] = None
    # A complete, valid parameters object: the example /docs shows and "Try it out" sends.
    EXAMPLE: ClassVar[dict[str, Any] | None] = None

    WORKFLOW_JSON: ClassVar[str] = ""
    RANDOM_INT_PLACEHOLDER: ClassVar[str] = RANDOM_INT_PLACEHOLDER
    RANDOM_INT_MIN: ClassVar[int] = 0
    RANDOM_INT_MAX: ClassVar[int] = 2**32 - 1
    # Optional explicit list of accepted modification keys; None = learn them by a dry run.
    ACCEPTS: ClassVar[Collection[str] | None] = None

    def __init__(self, modifications: dict[str, Any] | None = None) -> None:
        self.modifications: TrackingDict = TrackingDict(modifications or {})
        self.params: Any = (
            parse_params(self.Params, dict(modifications or {}))
            if self.Params is not None
            else None
        )
        self.workflow: dict[str, Any] = {}
        self.workflow_dirs: tuple[Path, ...] = (DEFAULT_WORKFLOWS_DIR,)
        self._url_resolver: UrlResolver | None = None
        self._loaded = False

    # --- wiring (the framework calls these) -------------------------------------------------

    def bind_url_resolver(self, resolver: UrlResolver | None) -> None:
        """Set how URLs become input names; without one, URLs are left as they are."""
        self._url_resolver = resolver

    # --- seed-compatible API ---------------------------------------------------------------

    async def load_workflow(self, workflow: dict[str, Any] | None = None) -> None:
        """Load ``WORKFLOW_JSON``, or use ``workflow`` when the class names no file."""
        if not self.WORKFLOW_JSON:
            if workflow is None:
                raise WorkflowFileError(
                    f"{type(self).__name__} has no WORKFLOW_JSON and no workflow"
                )
            self.workflow = workflow
        else:
            try:
                self.workflow = await read_workflow_file(await self.workflow_path())
            except FileNotFoundError:
                # The remembered location went away (file moved): look it up once more.
                _resolved_paths.pop((type(self), self.workflow_dirs), None)
                self.workflow = await read_workflow_file(await self.workflow_path())
        self._loaded = True

    async def modify_workflow_value(self, key: str, default: Any = None) -> Any:
        """The request's value for ``key``, else ``default``; missing with no default raises."""
        if key in self.modifications:
            return self.modifications[key]
        if default is None:
            raise MissingModification(key, f"modification '{key}' is required")
        return default

    async def apply_modifications(self) -> None:
        """Replace URLs by downloaded input names, then ``__RANDOM_INT__`` placeholders."""
        await self.replace_workflow_urls(self.workflow)
        await self.replace_random_ints(self.workflow)

    async def get_modified_workflow(self) -> dict[str, Any]:
        """Apply the modifications and return the workflow."""
        if not self._loaded:
            await self.load_workflow()
        result = self.apply_modifications()
        # Tolerate user modifiers that wrote a plain (non-async) apply_modifications.
        if inspect.isawaitable(result):
            await result
        return self.workflow

    async def replace_workflow_urls(self, workflow: Any) -> None:
        """Replace every http(s) URL string in ``workflow`` by its downloaded input's name."""
        if self._url_resolver is not None:
            await replace_urls(workflow, self._url_resolver)

    async def replace_random_ints(self, workflow: Any) -> None:
        """Replace ``RANDOM_INT_PLACEHOLDER`` values by random ints."""
        replace_random_ints(
            workflow, self.RANDOM_INT_MIN, self.RANDOM_INT_MAX, self.RANDOM_INT_PLACEHOLDER
        )

    async def get_url_content(self, url: str) -> str:
        """Download ``url`` and return the input name the workflow should use."""
        if self._url_resolver is None:
            return url
        return await self._url_resolver(url)

    # --- workflow file lookup --------------------------------------------------------------

    async def workflow_path(self) -> Path:
        """Where ``WORKFLOW_JSON`` is: next to the modifier, in a workflows dir, or the CWD."""
        key = (type(self), self.workflow_dirs)
        found = _resolved_paths.get(key)
        if found is None:
            found = await asyncio.to_thread(self._find_workflow_file)
            _resolved_paths[key] = found
        return found

    def _find_workflow_file(self) -> Path:
        rel = Path(self.WORKFLOW_JSON)
        candidates: list[Path] = []
        if rel.is_absolute():
            candidates.append(rel)
        else:
            module_file = inspect.getfile(type(self))
            here = Path(module_file).resolve().parent
            candidates += [here / rel, here.parent / rel]
            for d in self.workflow_dirs:
                candidates += [d / rel, d / rel.name]
            candidates.append(Path.cwd() / rel)
            # a non-editable install puts the shipped workflows in <prefix>/share/comfyq/workflows
            candidates.append(Path(sys.prefix) / "share" / "comfyq" / rel)
        for c in candidates:
            if c.is_file():
                return c
        looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise WorkflowFileError(
            f"workflow file {self.WORKFLOW_JSON!r} of {type(self).__name__} not found "
            f"(looked in: {looked})"
        )

    # --- typed value helpers (raise ModificationError naming the key) -----------------------

    async def _value(self, key: str, default: Any) -> Any:
        if key in self.modifications:
            return self.modifications[key]
        if default is _REQUIRED:
            raise MissingModification(key, f"modification '{key}' is required")
        return default

    async def int_value(
        self, key: str, default: Any = _REQUIRED, lo: int | None = None, hi: int | None = None
    ) -> Any:
        """An integer modification (``__RANDOM_INT__`` passes through); None default = optional."""
        v = await self._value(key, default)
        if v is None or v == self.RANDOM_INT_PLACEHOLDER:
            return v
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModificationError(key, f"modification '{key}' must be an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ModificationError(key, f"modification '{key}' must be between {lo} and {hi}")
        return v

    async def float_value(
        self, key: str, default: Any = _REQUIRED, lo: float | None = None, hi: float | None = None
    ) -> Any:
        """A number modification; None default = optional."""
        v = await self._value(key, default)
        if v is None:
            return v
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ModificationError(key, f"modification '{key}' must be a number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ModificationError(key, f"modification '{key}' must be between {lo} and {hi}")
        return v

    async def str_value(
        self, key: str, default: Any = _REQUIRED, choices: Collection[str] | None = None
    ) -> Any:
        """A string modification, optionally one of ``choices``; None default = optional."""
        v = await self._value(key, default)
        if v is None:
            return v
        if not isinstance(v, str):
            raise ModificationError(key, f"modification '{key}' must be a string")
        if choices is not None and v not in choices:
            raise ModificationError(
                key, f"modification '{key}' must be one of: {', '.join(sorted(choices))}"
            )
        return v

    async def bool_value(self, key: str, default: Any = _REQUIRED) -> Any:
        """A boolean modification (also "true"/"false", 1/0); None default = optional."""
        v = await self._value(key, default)
        if v is None or isinstance(v, bool):
            return v
        if v in (0, 1) and isinstance(v, int):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.strip().lower() in ("true", "yes", "1")
        raise ModificationError(key, f"modification '{key}' must be true or false")

    @staticmethod
    def check_prefix(value: str, key: str = "filename_prefix") -> str:
        """``value`` if it is a safe SaveImage ``filename_prefix``, else ModificationError."""
        if not _PREFIX_RE.fullmatch(value) or ".." in value.split("/"):
            raise ModificationError(
                key,
                f"modification '{key}' must be 1-128 characters of letters, digits, '.', '_', '-' "
                "and '/' (no leading '/', no '..')",
            )
        return value

    async def filename_prefix_value(
        self, key: str = "filename_prefix", default: Any = "ComfyUI"
    ) -> Any:
        """A SaveImage ``filename_prefix``: relative, no ``..``, no odd characters."""
        v = await self.str_value(key, default)
        if v is None:
            return v
        if not _PREFIX_RE.fullmatch(v) or ".." in v.split("/"):
            raise ModificationError(
                key,
                f"modification '{key}' must be 1-128 characters of letters, digits, '.', '_', '-' "
                "and '/' (no leading '/', no '..')",
            )
        return v
