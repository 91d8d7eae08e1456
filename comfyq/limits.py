"""What one request may hold, and the names in it that must be whole and printable.

Bounded work: a JSON body is at most ``max_json_bytes`` and ``max_json_items`` values, a
workflow at most ``max_workflow_nodes`` nodes, 100 levels deep. Decoding a body is one C call that
holds the GIL, so moving it to a thread would not free the event loop: the item count is what
bounds it, and is measured before decoding by counting separators (a few ms for the largest body).

Names: a field that becomes a header, a path, a file name or a log field (the request_id, the
modifier, image names, S3 fields, node ids, class types, ``filename_prefix``) is checked whole
(``fullmatch``: no trailing newline) and may hold no control character.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from comfyq.errors import PayloadTooLarge

log = logging.getLogger("comfyq.limits")
MiB = 1024 * 1024
MAX_DEPTH = 100  # deeper JSON is no workflow; refusing it keeps encoders and SQLite's JSON safe
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same rule as the schema's pattern, checked whole: re's "$" also matches before a final "\n".
REQUEST_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
# Keys whose string value ComfyUI uses as (part of) a file path of its output.
_PATH_INPUTS = frozenset({"filename_prefix"})

FieldErrors = list[dict[str, str]]


@dataclass(frozen=True)
class BodyLimits:
    """The per-request limits of JSON bodies (from the ``max_json_*`` settings)."""

    json_bytes: int = 16 * MiB
    json_items: int = 100_000
    workflow_nodes: int = 5_000
    depth: int = MAX_DEPTH
    json_setting: str = "max_json_bytes"

    @classmethod
    def from_settings(cls, settings: Any) -> BodyLimits:
        json_bytes, setting = json_limit(settings)
        return cls(
            json_bytes=json_bytes,
            json_setting=setting,
            json_items=settings.max_json_items,
            workflow_nodes=settings.max_workflow_nodes,
        )


DEFAULT = BodyLimits()


# Bytes scanned per C call by ``count`` and ``contains``: a 16 MiB body is scanned in steps of
# well under a millisecond, between which another thread (the event loop's) can take the GIL;
# one call over the whole body held it 6-15 ms per pass, and validation makes several.
SCAN_STEP = 1 << 20


def count(body: bytes, *needles: bytes, over: int | None = None) -> int:
    """How often the one-byte ``needles`` occur in ``body``, scanned in ``SCAN_STEP`` steps; stops
    early once the total is over ``over``."""
    total = 0
    for at in range(0, len(body), SCAN_STEP):
        end = at + SCAN_STEP
        total += sum(body.count(n, at, end) for n in needles)
        if over is not None and total > over:
            break
    return total


def contains(body: bytes, needle: bytes) -> bool:
    """``needle in body``, scanned in ``SCAN_STEP`` steps (overlapping by the needle's length)."""
    overlap = len(needle) - 1
    return any(
        body.find(needle, max(0, at - overlap), at + SCAN_STEP) >= 0
        for at in range(0, max(len(body), 1), SCAN_STEP)
    )


def check_json_body(body: bytes, limits: BodyLimits) -> None:
    """413 naming the limit when ``body`` is over ``json_bytes`` or holds over ``json_items``
    values."""
    if len(body) > limits.json_bytes:
        raise too_large(len(body), limits.json_bytes, limits.json_setting)
    # Every value after the first is preceded by "," or ":" (a key's value): their count bounds
    # the values. Strings may hold them too, so this over-counts text, never under-counts values.
    if len(body) > limits.json_items and count(body, b",", b":", over=limits.json_items) > (
        limits.json_items
    ):
        raise PayloadTooLarge(
            f"the JSON body holds more than {limits.json_items} values (setting max_json_items)",
            details={"limit": limits.json_items, "setting": "max_json_items"},
        )


def too_large(size: int | None, limit: int, setting: str = "max_json_bytes") -> PayloadTooLarge:
    shown = f"{size} bytes" if size is not None else "the body"
    return PayloadTooLarge(
        f"{shown} is over the JSON body limit of {limit} bytes (setting {setting}); send"
        " files as multipart or by URL",
        details={"limit": limit, "setting": setting},
    )


def json_limit(settings: Any) -> tuple[int, str]:
    """The byte limit of a JSON body and the setting it comes from (the lower of the two)."""
    if settings.max_body_bytes < settings.max_json_bytes:
        return settings.max_body_bytes, "max_body_bytes"
    return settings.max_json_bytes, "max_json_bytes"


_NOT_PRINTABLE = "must not contain control characters"


def printable(value: Any, path: str, errors: FieldErrors) -> None:
    """Adds an error for ``path`` when ``value`` is a string holding a control character."""
    if isinstance(value, str) and CONTROL.search(value):
        errors.append({"path": path, "message": _NOT_PRINTABLE})


def request_id_errors(request_id: str) -> FieldErrors:
    if request_id and not REQUEST_ID.fullmatch(request_id):
        return [
            {
                "path": "$.input.request_id",
                "message": "must be 1-128 of A-Z a-z 0-9 . _ -, not starting with a dot",
            }
        ]
    return []


_SEPARATORS = re.compile(r"[/\\]")


def _path_value_error(value: str) -> str | None:
    if CONTROL.search(value):
        return "must not contain control characters"
    if value.startswith(("/", "\\")) or (".." in value and ".." in _SEPARATORS.split(value)):
        return "must stay inside the output folder (no leading /, no ..)"
    return None


def workflow_errors(workflow: dict[str, Any], limits: BodyLimits) -> FieldErrors:
    """Size, names and links of a workflow: node count, printable ids and class types, output
    paths, and no dependency cycle (ComfyUI would refuse each, after the job was accepted)."""
    if len(workflow) > limits.workflow_nodes:
        return [
            {
                "path": "$.input.workflow_json",
                "message": f"has {len(workflow)} nodes; the limit is {limits.workflow_nodes}"
                " (setting max_workflow_nodes)",
            }
        ]
    errors: FieldErrors = []
    links: dict[str, list[str]] = {}
    linked = False
    # One search over all the ids (joined) instead of one per id: nearly every workflow has none.
    bad_ids = CONTROL.search("".join(workflow)) is not None
    search = CONTROL.search
    for key, node in workflow.items():
        if bad_ids and search(key):
            errors.append(
                {"path": "$.input.workflow_json", "message": "a node id holds a control character"}
            )
            continue
        if type(node) is not dict:
            continue  # the typed conversion reports it
        class_type = node.get("class_type")
        if type(class_type) is str and search(class_type):
            path = f"$.input.workflow_json['{key}']"
            errors.append({"path": f"{path}.class_type", "message": _NOT_PRINTABLE})
        inputs = node.get("inputs")
        if type(inputs) is not dict:
            continue
        # Links are [node id, output index]; only the names in _PATH_INPUTS are output paths.
        out = [
            v[0]
            for v in inputs.values()
            if type(v) is list and len(v) == 2 and type(v[0]) is str and isinstance(v[1], int)
        ]
        for name in _PATH_INPUTS:
            value = inputs.get(name)
            if type(value) is str:
                why = _path_value_error(value)
                if why:
                    path = f"$.input.workflow_json['{key}']"
                    errors.append({"path": f"{path}.inputs.{name}", "message": why})
        if out:
            links[key] = out
            linked = True
    if not errors and linked:  # no link at all: no cycle
        cycle = find_cycle(links)
        if cycle is not None:
            errors.append(
                {
                    "path": f"$.input.workflow_json['{cycle}']",
                    "message": "the node's inputs link back to itself (a dependency cycle)",
                }
            )
    return errors


def find_cycle(links: dict[str, list[str]]) -> str | None:
    """A node on a dependency cycle of ``links`` (node -> the nodes it reads from), or None.

    Iterative three-colour depth-first search: linear in nodes and links, no recursion limit.
    A node absent from ``links`` reads from nothing."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root, first in links.items():
        if root in state:
            continue
        state[root] = 1
        path = [root]
        stack = [iter(first)]
        while stack:
            for nxt in stack[-1]:
                seen = state.get(nxt)
                if seen is None:
                    deps = links.get(nxt)
                    if deps is None:
                        state[nxt] = 2  # reads from nothing
                        continue
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(deps))
                    break
                if seen == 1:
                    return nxt
            else:
                state[path.pop()] = 2
                stack.pop()
    return None


def input_errors(raw_input: dict[str, Any], limits: BodyLimits) -> FieldErrors:
    """Every name of a (typed-valid) input that is not whole and printable, and the workflow's
    limits."""
    errors = request_id_errors(str(raw_input.get("request_id") or ""))
    printable(raw_input.get("modifier"), "$.input.modifier", errors)
    mods = raw_input.get("modifications")
    if isinstance(mods, dict):
        for key in mods:
            printable(key, "$.input.modifications", errors)
    for i, img in enumerate(raw_input.get("images") or ()):
        if isinstance(img, dict):
            printable(img.get("name"), f"$.input.images[{i}].name", errors)
    for block, names in (
        ("s3", ("endpoint_url", "bucket_name", "region", "access_key_id")),
        ("webhook", ("url",)),
    ):
        obj = raw_input.get(block)
        if isinstance(obj, dict):
            for name in names:
                printable(obj.get(name), f"$.input.{block}.{name}", errors)
    workflow = raw_input.get("workflow_json")
    if isinstance(workflow, dict) and workflow:
        errors += workflow_errors(workflow, limits)
    return errors


PR_SET_NAME = 15  # prctl(2): the calling thread's name as the kernel shows it (15 bytes kept)


def name_os_thread(name: str) -> bool:
    """Give the calling thread ``name`` in the kernel too (/proc/PID/task/TID/comm, top -H,
    py-spy): Python 3.11 names threads for itself only. False where there is no prctl."""
    import ctypes

    try:  # the symbols already loaded in this process: no library search
        prctl = getattr(ctypes.CDLL(None), "prctl", None)
    except OSError:
        return False
    if prctl is None:
        return False
    return bool(prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0)


def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


LARGE = 256 * 1024  # a body or stored payload above this is followed by a heap trim


class HeapTrim:
    """Gives the memory of large bodies back to the system a while after they were handled.

    A large workflow decodes into tens of thousands of small objects, at admission and again in
    each stage of its job; once they are freed, the heap keeps their pages. ``delay`` seconds
    after the last large body (``soon``) or the last stage of a job with a large payload
    (``after``), two things run, in order (no full garbage collection: 50-80 ms of loop time
    with ~64k objects, measured; what a large job decodes is freed when its stage ends):

    - the registered releases (``release_with``): SQLite's page cache of the writer holds the
      pages the large rows were written to (measured ~10 MB after ten 5,000-node jobs, up to its
      64 MB cache) and gives them back on ``PRAGMA shrink_memory``;
    - ``malloc_trim(0)`` in a thread (ctypes drops the GIL): glibc keeps free chunks between live
      ones (measured RSS 67 -> 97 MB after three 5,000-node bodies, and it stayed). A no-op
      without glibc.
    """

    def __init__(self, delay: float = 2.0) -> None:
        self.delay = delay
        self.trims = 0
        self._handle: Any = None
        self._releases: dict[int, Callable[[], Awaitable[Any]]] = {}
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None) if libc is not None else None

    def release_with(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], None]:
        """Run ``await fn()`` before each trim (a cache that can drop what it holds); returns the
        function that unregisters it."""
        key = id(fn)
        self._releases[key] = fn

        def unregister() -> None:
            self._releases.pop(key, None)

        return unregister

    def after(self, document: str | bytes | None) -> None:
        """``soon()`` when ``document`` (a job's stored payload, whose stage has just decoded
        and freed it) is a large one: each stage decodes it again, after admission's trim."""
        if document is not None and len(document) > LARGE:
            self.soon()

    def soon(self) -> None:
        """Note a large body: trim ``delay`` seconds from now (later large bodies push it on)."""
        loop = asyncio.get_running_loop()
        if self._handle is not None:
            self._handle.cancel()
        self._handle = loop.call_later(self.delay, self._start)

    def _start(self) -> None:
        self._handle = None
        task = asyncio.get_running_loop().create_task(self.run())
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)

    async def run(self) -> None:
        """Release and trim now."""
        for fn in list(self._releases.values()):
            try:
                await fn()
            except Exception:  # a closing store: nothing to release
                log.debug("heap trim: a release failed", exc_info=True)
        await asyncio.get_running_loop().run_in_executor(None, self.trim)

    def trim(self) -> bool:
        """Return free heap pages to the system now (blocking); False without glibc."""
        if self._trim is None:
            return False
        self._trim(0)
        self.trims += 1
        return True


_PENDING: set[Any] = set()
HEAP_TRIM = HeapTrim()


def fixed_mmap_threshold(threshold: int = 256 * 1024) -> bool:
    """Keep large buffers (request bodies, decoded inputs) in their own mappings, so that memory
    freed after a burst of large bodies goes back to the system.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB); after the
    first 16 MiB body, later ones come from the heap, whose free space stays resident (measured:
    RSS 50 -> 363 MB after three 16 MiB bodies, and it stayed there). Setting the threshold
    turns that adjustment off. False where there is no glibc (the default behaviour stays)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold)))
