"""Preprocess one job: run its modifier (or take its raw workflow) and fetch its inputs.

Every input file (a URL in the workflow, or an ``input.images`` entry) is stored in the
downloader's content-hash cache and gets a per-job name, ``cq_{job hash}_{content hash}{ext}``;
the workflow is rewritten to use that name, and the generate stage uploads the file to ComfyUI
under exactly that name. Names depend on job and content only, so concurrent jobs never collide
and a retried job re-uploads identical bytes under the identical name.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from comfyq.errors import BadRequest, ComfyqError, InputError, ModifierError
from comfyq.inputs import Asset, Downloader, uploads
from comfyq.netguard import AddressGuard
from modifiers.basemodifier import (
    RANDOM_INT_PLACEHOLDER,
    BaseModifier,
    ModificationError,
    looks_like_url,
    replace_random_ints,
    replace_urls,
    string_slots,
)
from modifiers.registry import ModifierRegistry

log = logging.getLogger("comfyq.inputs.prepare")

_MAX_MESSAGE = 500
# Workflows with more nodes than this are prepared in steps: between the whole-workflow passes
# (copy, modifier, URL and placeholder search) the event loop runs other work, so a 5,000-node
# workflow never holds it for the sum of them (measured 80 ms of loop CPU in one step).
STEP_NODES = 500


async def _breathe(workflow: Any) -> None:
    if isinstance(workflow, dict) and len(workflow) > STEP_NODES:
        await asyncio.sleep(0)


@dataclass(frozen=True)
class PreparedInput:
    """One file the generate stage must upload to ComfyUI as ``name``."""

    name: str
    path: Path
    mime: str
    sha256: str
    size: int


@dataclass
class Prepared:
    """The workflow ready to submit (or its JSON as stored, when nothing in it changes: see
    ``payload_for_preprocess``), and the input files it refers to."""

    workflow: Any  # dict[str, Any]; msgspec.Raw when passed on as stored
    inputs: list[PreparedInput]


_split_payload = msgspec.json.Decoder(dict[str, dict[str, msgspec.Raw]]).decode
_decode = msgspec.json.Decoder().decode
_URL_START = re.compile(rb"(?i)https?://")
_PLACEHOLDER = RANDOM_INT_PLACEHOLDER.encode()


def payload_for_preprocess(text: str | bytes) -> dict[str, Any] | None:
    """A job's stored payload with its workflow left as JSON (``msgspec.Raw``) when preprocess
    has nothing to change in it: no modifier, no ``images``, no http(s) URL and no random-int
    placeholder anywhere in its text (the store writes it as msgspec encodes it: no "/" or
    letter is escaped). None otherwise, and for any other shape: decode it whole.

    The workflow then goes to ``prepared`` as it is: decoding a 5,000-node workflow here (and
    freeing it) was one of the three bursts of tens of thousands of small objects per large job
    (admission, preprocess, generate), each of which left heap arenas pinned by the few
    long-lived objects allocated meanwhile."""
    try:
        top = _split_payload(text)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    fields = top.get("input")
    if len(top) != 1 or fields is None:
        return None  # a v2 job, or another shape
    raw = fields.get("workflow_json")
    if raw is None or "modifier" in fields or "images" in fields:
        return None
    view = bytes(memoryview(raw))
    if not view.startswith(b"{") or _URL_START.search(view) or _PLACEHOLDER in view:
        return None
    job_input = {k: raw if k == "workflow_json" else _decode(v) for k, v in fields.items()}
    return {"input": job_input}


def input_name(job_id: str, asset: Asset) -> str:
    """The per-job file name of ``asset``."""
    job_tag = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    return f"cq_{job_tag}_{asset.sha256[:16]}{asset.ext}"


class _JobInputs:
    """Collects one job's input files and hands out their per-job names."""

    def __init__(self, job_id: str, downloader: Downloader) -> None:
        self._job_id = job_id
        self._downloader = downloader
        self._by_name: dict[str, PreparedInput] = {}
        self._url_names: dict[str, asyncio.Future[str]] = {}

    def add(self, asset: Asset) -> str:
        name = input_name(self._job_id, asset)
        if name not in self._by_name:
            self._by_name[name] = PreparedInput(
                name, asset.path, asset.mime, asset.sha256, asset.size
            )
        return name

    async def from_url(self, url: str) -> str:
        # One download per distinct URL within the job, however often the workflow repeats it.
        fut = self._url_names.get(url)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(url))
            self._url_names[url] = fut
        return await fut

    async def _fetch(self, url: str) -> str:
        return self.add(await self._downloader.fetch(url))

    async def from_inline(self, data: str) -> str:
        return self.add(await self._downloader.decode(data))

    async def from_upload(self, ref: str) -> str:
        return self.add(await asyncio.to_thread(uploads.resolve, ref, self._downloader.cache_dir))

    @property
    def names(self) -> set[str]:
        return set(self._by_name)

    def inputs(self) -> list[PreparedInput]:
        return list(self._by_name.values())


def _copy(value: Any) -> Any:
    # A JSON round trip is a fast deep copy, and proves the workflow is plain JSON data.
    return msgspec.json.decode(msgspec.json.encode(value))


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


async def _prepare_images(images: Any, inputs: _JobInputs) -> dict[str, str]:
    """Fetch or decode ``input.images``; returns {client name: per-job name}."""
    if images is None:
        return {}
    if not isinstance(images, list):
        raise InputError(
            "input.images must be a list",
            fields=[{"path": "$.input.images", "message": "must be a list"}],
        )
    entries: list[tuple[int, str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(images):
        path = f"$.input.images[{i}]"
        if not isinstance(item, dict):
            raise InputError(
                f"{path} must be an object", fields=[{"path": path, "message": "must be an object"}]
            )
        name, data = item.get("name"), item.get("image")
        if not isinstance(name, str) or not name:
            raise InputError(
                f"{path}.name must be a non-empty string",
                fields=[{"path": f"{path}.name", "message": "must be a non-empty string"}],
            )
        if name in seen:
            raise InputError(
                f"{path}.name {name!r} is used twice",
                fields=[{"path": f"{path}.name", "message": "duplicate name"}],
            )
        if not isinstance(data, str) or not data:
            raise InputError(
                f"{path}.image must be base64, a data: URI or an http(s) URL",
                fields=[{"path": f"{path}.image", "message": "must be a non-empty string"}],
            )
        seen.add(name)
        entries.append((i, name, data))

    async def one(i: int, name: str, data: str) -> tuple[str, str]:
        try:
            if looks_like_url(data):
                return name, await inputs.from_url(data)
            if uploads.is_ref(data):  # a multipart file part, already stored
                return name, await inputs.from_upload(data)
            return name, await inputs.from_inline(data)
        except InputError as exc:
            path = f"$.input.images[{i}].image"
            raise InputError(
                f"image {name!r}: {exc.message}",
                details=exc.details,
                fields=[{"path": path, "message": exc.message}],
            ) from None

    tasks = [asyncio.ensure_future(one(*e)) for e in entries]
    try:
        pairs = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return dict(pairs)


async def _run_modifier(modifier: BaseModifier, label: str, workflow: dict[str, Any] | None) -> Any:
    try:
        await modifier.load_workflow(workflow)
        return await modifier.get_modified_workflow()
    except ComfyqError:
        raise  # InputError from a download keeps its type
    except ModificationError as exc:
        raise ModifierError(
            f"{label}: {exc.message}",
            fields=[{"path": f"$.input.modifications.{exc.key}", "message": exc.message}],
        ) from None
    except (Exception, SystemExit) as exc:
        # A broken modifier fails its job, with enough detail to fix it; it never takes the
        # stage worker down.
        log.warning("%s raised %s", label, type(exc).__name__, exc_info=True)
        raise ModifierError(
            _short(f"{label} failed: {type(exc).__name__}: {exc}"),
            details={"exception_type": type(exc).__name__},
        ) from None


async def prepare_job(
    job_input: dict[str, Any],
    job_id: str,
    *,
    registry: ModifierRegistry,
    downloader: Downloader,
    owned: bool = False,
) -> Prepared:
    """Build the workflow for ``job_input`` and fetch every input file it needs.

    ``owned``: ``job_input`` was just decoded from JSON for this call alone, so its workflow is
    plain JSON data that may be changed in place; otherwise the modifier works on a copy."""
    if not isinstance(job_input, dict):
        raise InputError("job input must be an object")
    inputs = _JobInputs(job_id, downloader)
    images = await _prepare_images(job_input.get("images"), inputs)

    name = job_input.get("modifier")
    raw = job_input.get("workflow_json")
    if isinstance(raw, msgspec.Raw) and name is None and not images:
        # Nothing to change in it (payload_for_preprocess): submitted as it was stored.
        return Prepared(workflow=raw, inputs=inputs.inputs())
    if isinstance(raw, msgspec.Raw):
        raw = _decode(raw)
    await _breathe(raw)  # after the stage decoded the job's payload
    if name is not None:
        try:
            modifier = registry.create(name, job_input.get("modifications"))
        except BadRequest as exc:
            raise ModifierError(exc.message, fields=exc.fields, details=exc.details) from None
        except ModificationError as exc:  # typed parameters that do not convert
            raise ModifierError(
                f"modifier {name}: {exc.message}",
                fields=[{"path": f"$.input.modifications.{exc.key}", "message": exc.message}],
            ) from None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code must not kill us
            raise ModifierError(
                _short(f"modifier {name} could not be created: {type(exc).__name__}: {exc}")
            ) from None
        label = f"modifier {name}"
        # Only used by a modifier without WORKFLOW_JSON, as in the original wrapper.
        workflow_arg = (raw if owned else _copy(raw)) if isinstance(raw, dict) else None
    elif isinstance(raw, dict):
        modifier = BaseModifier()
        label = "workflow_json processing"
        try:
            workflow_arg = raw if owned else _copy(raw)
        except (msgspec.EncodeError, TypeError, ValueError):
            raise InputError("workflow_json is not plain JSON data") from None
    else:
        raise InputError(
            "input needs either a workflow_json object or a modifier",
            fields=[{"path": "$.input", "message": "needs workflow_json or modifier"}],
        )
    modifier.bind_url_resolver(inputs.from_url)
    await _breathe(workflow_arg)
    workflow = await _run_modifier(modifier, label, workflow_arg)
    if not isinstance(workflow, dict):
        raise ModifierError(f"{label} produced a {type(workflow).__name__}, not a workflow object")

    # Whatever the modifier did or skipped (e.g. it never called super()), the submitted
    # workflow holds no URL and no placeholder.
    await _breathe(workflow)
    await replace_urls(workflow, inputs.from_url)
    await _breathe(workflow)
    replace_random_ints(workflow)
    await _breathe(workflow)

    if images:
        generated = inputs.names
        for container, key, value in list(string_slots(workflow)):
            if value in images and value not in generated:
                container[key] = images[value]
    files = inputs.inputs()
    log.debug(
        "job %s: %s built a workflow of %d node(s) with %d input file(s) (%d bytes)",
        job_id,
        label,
        len(workflow),
        len(files),
        sum(f.size for f in files),
    )
    return Prepared(workflow=workflow, inputs=files)


def _child_path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{parent}.{key}"
    return f"{parent}[{key!r}]"


def check_input_urls(job_input: dict[str, Any], guard: AddressGuard, *, limit: int = 20) -> None:
    """Admission check of every URL a job would fetch (syntax and literal IPs, no DNS).

    Raises BadRequest with one ``fields`` entry per refused URL, so a client learns at once
    that e.g. ``http://169.254.169.254/`` will never be fetched, instead of from a failed job.
    """
    problems: list[dict[str, str]] = []
    stack: list[tuple[str, Any]] = [
        ("$.input.workflow_json", job_input.get("workflow_json")),
        ("$.input.modifications", job_input.get("modifications")),
    ]
    images = job_input.get("images")
    if isinstance(images, list):
        stack += [
            (f"$.input.images[{i}].image", item.get("image"))
            for i, item in enumerate(images)
            if isinstance(item, dict)
        ]
    while stack and len(problems) < limit:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack += [(_child_path(path, k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(_child_path(path, i), v) for i, v in enumerate(value)]
        elif looks_like_url(value):
            try:
                guard.check_url_syntax(value)
            except InputError as exc:
                problems.append({"path": path, "message": exc.message})
    if problems:
        problems.sort(key=lambda p: p["path"])
        noun = "URL" if len(problems) == 1 else "URLs"
        raise BadRequest(
            f"{len(problems)} input {noun} refused: {problems[0]['message']}", fields=problems
        )
