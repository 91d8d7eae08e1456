"""Admission: a generate request body becomes a durable job, or a 4xx naming what is wrong.

Validation runs in the order a client can act on: media type (415), JSON syntax and nesting (400),
unknown fields (all of them at once), field types and ranges (msgspec, with the field's path),
then the rules that span fields, then the modifier's own check of its modifications. Only then is
the job written, in one transaction, and the caller answers 202 after the commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from yarl import URL

from comfyq import limits as lim
from comfyq.errors import BadRequest, ComfyqError, UnsupportedMediaType
from comfyq.inputs import uploads
from comfyq.inputs.models import admission_errors
from comfyq.inputs.prepare import check_input_urls
from comfyq.outputs.s3 import S3ConfigError
from comfyq.schemas import GenerateRequest, Input
from comfyq.store.model import Job, NewJob

TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
MAX_DEPTH = lim.MAX_DEPTH
# Bodies above this are validated in a worker thread: the Python-level walks then share the GIL
# with the event loop (switched every 5 ms) instead of holding it for their whole length.
THREAD_ABOVE = lim.LARGE

_INPUT_FIELDS = frozenset(f.name for f in msgspec.structs.fields(Input))
_HOLD: Any = {"": None}  # see build()
_NO_INPUTS: dict[str, Any] = {}
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)
_FIELD_NAME = re.compile(r"`([^`]*)`")


@dataclass
class Admitted:
    """What admission made of a request, ready for ``JobStore.create``."""

    new: NewJob
    input: Input


def bad(path: str, message: str, summary: str | None = None) -> BadRequest:
    """A 400 for one field."""
    return BadRequest(summary or f"{path}: {message}", fields=[{"path": path, "message": message}])


def _bad_many(errors: list[dict[str, str]]) -> BadRequest:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return BadRequest(f"{first['path']}: {first['message']}{more}", fields=errors)


def check_media_type(content_type: str | None) -> None:
    """415 unless the body is declared as JSON (no Content-Type at all is read as JSON)."""
    if not content_type:
        return
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in ("application/json", "text/json") or mime.endswith("+json"):
        return
    raise UnsupportedMediaType(
        f"request body must be JSON (Content-Type: application/json), got {mime!r}",
        details={"content_type": mime},
    )


def _depth_ok(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether no value in ``value`` sits deeper than ``limit`` (the top value is at depth 1)."""
    # Level by level, each level's containers gathered by one comprehension (a workflow's values
    # are mostly numbers and strings; only containers are kept): a container's children, whatever
    # they are, sit one level below it.
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 1
    while level:
        if depth >= limit and any(level):  # a non-empty container here has children too deep
            return False
        level = [
            x
            for v in level
            for x in (v.values() if type(v) is dict else v)
            if type(x) is dict or type(x) is list
        ]
        depth += 1
    return True


def _from_msgspec(exc: msgspec.ValidationError) -> BadRequest:
    m = _AT.match(str(exc))
    assert m is not None  # the pattern matches any text
    msg, path = m.group("msg"), m.group("path") or "$"
    name = _FIELD_NAME.search(msg)
    if msg.startswith("Object contains unknown field") and name:
        return bad(f"{path}.{name.group(1)}", "unknown field")
    if msg.startswith("Object missing required field") and name:
        return bad(f"{path}.{name.group(1)}", "required field is missing")
    return bad(path, msg)


def _check_workflow(workflow: Any) -> list[dict[str, str]]:
    # Checked by hand so that errors name the node id (msgspec reports dict keys as [...]).
    # The rules of schemas.WorkflowNode: an object, a non-empty class_type, inputs an object.
    if not isinstance(workflow, dict):
        return []  # the typed conversion reports it
    errors = []
    for key, node in workflow.items():
        if type(node) is dict:
            class_type = node.get("class_type")
            if type(class_type) is str and class_type:
                inputs = node.get("inputs", _NO_INPUTS)
                if type(inputs) is dict:
                    continue
                what, message = ".inputs", "must be an object"
            else:
                what, message = ".class_type", "required: the node's class name"
        else:
            what, message = "", "a node must be an object with class_type and inputs"
        errors.append({"path": f"$.input.workflow_json['{key}']{what}", "message": message})
    return errors


def _http_url(value: str) -> str | None:
    """Why ``value`` is not a usable http(s) URL, or None when it is."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        return "not a valid URL"
    if url.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not url.host:
        return "URL has no host"
    return None


def _cross_field(inp: Input) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = []
    if bool(inp.workflow_json) == bool(inp.modifier):
        errors.append(
            {"path": "$.input", "message": "give exactly one of workflow_json and modifier"}
        )
    if inp.modifications and not inp.modifier:
        errors.append({"path": "$.input.modifications", "message": "modifications need a modifier"})
    if inp.webhook is not None and inp.webhook.url:
        why = _http_url(inp.webhook.url)
        if why:
            errors.append({"path": "$.input.webhook.url", "message": why})
    if inp.s3 is not None and inp.s3.endpoint_url:
        why = _http_url(inp.s3.endpoint_url)
        if why:
            errors.append({"path": "$.input.s3.endpoint_url", "message": why})
    seen: set[str] = set()
    for i, img in enumerate(inp.images):
        if img.name in seen:
            errors.append(
                {"path": f"$.input.images[{i}].name", "message": f"name {img.name!r} is used twice"}
            )
        seen.add(img.name)
    return errors


# A name whose str type carries a constraint: msgspec does not keep it in its cache of dict keys.
# That cache (512 slots, emptied every 10th full garbage collection) otherwise keeps hundreds of
# a large workflow's node ids, allocated in the middle of its decode: they pinned as many pools,
# and with them heap arenas, long after the workflow was freed.
_Name = Annotated[str, msgspec.Meta(max_length=1 << 30)]
_decode_fields = msgspec.json.Decoder(dict[_Name, dict[_Name, msgspec.Raw]]).decode
_decode_nodes = msgspec.json.Decoder(dict[_Name, Any]).decode
_decode_any = msgspec.json.Decoder().decode


def _decode_body(body: bytes) -> Any:
    """The body decoded as is (key order kept), the workflow's node ids out of msgspec's key cache.

    ``{"input": {...}}`` is split into its fields first (scanned, not built), the workflow then
    decoded with uncached node ids, every other field as usual. Any other shape is decoded
    whole (its errors are reported from that)."""
    try:
        return {
            key: {
                name: _decode_nodes(value) if name == "workflow_json" else _decode_any(value)
                for name, value in fields.items()
            }
            for key, fields in _decode_fields(body).items()
        }
    except msgspec.ValidationError:  # another shape, or a value out of range: as a whole
        return _decode_any(body)


def may_hold_urls(body: bytes) -> bool:
    """False when no string in the JSON can be a URL (no "://", escaped or not): nothing to do."""
    if len(body) <= lim.SCAN_STEP:  # one step: plain searches (no chunked scan to give way to)
        return b"://" in body or b":\\/" in body or b"\\u" in body
    return lim.contains(body, b"://") or lim.contains(body, b":\\/") or lim.contains(body, b"\\u")


def _brackets(body: bytes) -> int:
    """How many "{" and "[" ``body`` holds (at least, past MAX_DEPTH)."""
    if len(body) <= lim.SCAN_STEP:
        return body.count(b"{") + body.count(b"[")
    return lim.count(body, b"{", b"[", over=MAX_DEPTH)


def parse(
    body: bytes, headers: Mapping[str, str], limits: lim.BodyLimits = lim.DEFAULT
) -> tuple[Input, dict[str, Any]]:
    """Validate a generate body; returns the typed input and the raw input object."""
    check_media_type(headers.get("Content-Type"))
    lim.check_json_body(body, limits)
    if not body.strip():
        raise bad("$", 'the body is empty; send {"input": {...}}')
    try:
        raw = _decode_body(body)
    except msgspec.DecodeError as exc:
        raise bad("$", f"invalid JSON: {exc}") from None
    except msgspec.ValidationError as exc:  # e.g. a number out of range
        raise bad("$", f"invalid JSON: {exc}") from None
    except RecursionError:
        raise bad("$", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    # Nesting cannot exceed the number of brackets: count them (fast) before walking the tree.
    if _brackets(body) > MAX_DEPTH and not _depth_ok(raw):
        raise bad("$", f"JSON nested deeper than {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise bad("$", 'must be an object: {"input": {...}}')
    raw_input = raw.get("input")
    workflow = raw_input.get("workflow_json") if isinstance(raw_input, dict) else None
    if isinstance(workflow, dict) and len(workflow) > limits.workflow_nodes:
        raise _bad_many(lim.workflow_errors(workflow, limits))  # before converting all of it
    # A workflow is checked by hand (the rules of WorkflowNode, errors named by node id) and kept
    # as decoded: converting it would build a second, typed copy of every node (a 5,000-node
    # workflow: 1.3 MB more of small objects, alive until the job is written) for nothing, since
    # the job stores the workflow verbatim.
    nodes = workflow if type(workflow) is dict and workflow else None
    node_errors = _check_workflow(nodes) if nodes is not None else []
    try:
        if nodes is None:
            req = msgspec.convert(raw, GenerateRequest)
        else:
            assert isinstance(raw_input, dict)
            rest = {k: v for k, v in raw_input.items() if k != "workflow_json"}
            req = msgspec.convert({**raw, "input": rest}, GenerateRequest)
    except msgspec.ValidationError as exc:
        # Only now, for a body that fails: every unknown field at once, and node errors by node id
        # (a body that converts has neither, so valid requests skip these walks).
        if isinstance(raw_input, dict):
            unknown = sorted(str(k) for k in raw_input if k not in _INPUT_FIELDS)
            errors = [{"path": f"$.input.{k}", "message": "unknown field"} for k in unknown]
            errors += node_errors if nodes is not None else _check_workflow(workflow)
            if errors:
                raise _bad_many(errors) from None
        raise _from_msgspec(exc) from None
    if node_errors:
        raise _bad_many(node_errors)
    inp = req.input
    if nodes is not None:
        inp.workflow_json = nodes  # the nodes as sent (build() stores them verbatim)
    if headers.get("X-Return-Outputs-As-Base64", "").strip().lower() in TRUE_VALUES:
        inp.return_outputs_as_base64 = True
    assert isinstance(raw_input, dict)
    errors = _cross_field(inp) + lim.input_errors(raw_input, limits)
    if errors:
        raise _bad_many(errors)
    return inp, raw_input


def canonical_hash(value: Any) -> str:
    """sha256 of the canonical JSON (sorted keys) of ``value``."""
    return hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()


def _split_secrets(clean: dict[str, Any]) -> dict[str, Any]:
    secrets: dict[str, Any] = {}
    s3 = clean.get("s3")
    if isinstance(s3, dict):
        keys = {k: s3.pop(k) for k in ("access_key_id", "secret_access_key") if s3.get(k)}
        if keys:
            secrets["s3"] = keys
    hook = clean.get("webhook")
    if isinstance(hook, dict) and hook.get("secret"):
        secrets["webhook_secret"] = hook.pop("secret")
    return secrets


def build(
    inp: Input,
    raw_input: dict[str, Any],
    *,
    max_attempts: int,
    default_timeout: float,
    default_webhook_url: str = "",
) -> Admitted:
    """The job to write for a validated input: id, payload without secrets (its workflow as
    JSON text, ``msgspec.Raw``), secrets, hash. The input's workflow is emptied."""
    if inp.workflow_json:
        # The workflow is stored verbatim (node keys like _meta kept), so its typed form is not
        # converted back: a placeholder holds its place in the field order.
        clean: dict[str, Any] = msgspec.to_builtins(
            msgspec.structs.replace(inp, workflow_json=_HOLD)
        )
        clean["workflow_json"] = raw_input["workflow_json"]
    else:
        clean = msgspec.to_builtins(inp)  # defaults omitted: a normalised payload
    payload_hash = canonical_hash(clean)
    if inp.workflow_json:
        # Written as JSON from here on: the decoded nodes (tens of thousands of small objects for
        # a large workflow) are not kept alive by the job to write, nor by a /generate/sync or
        # /generate/stream request that holds it while the job runs.
        clean["workflow_json"] = msgspec.Raw(msgspec.json.encode(clean["workflow_json"]))
        inp.workflow_json = {}
    secrets = _split_secrets(clean)
    if default_webhook_url and not (clean.get("webhook") or {}).get("url"):
        # WEBHOOK_URL applies to jobs that name none; written into the job so that the outbox
        # trigger (and an operator reading the row) sees where the job reports.
        clean.setdefault("webhook", {})["url"] = default_webhook_url
    job_id = inp.request_id or new_job_id()
    new = NewJob(
        id=job_id,
        payload={"input": clean},
        payload_hash=payload_hash,
        priority=inp.priority,
        max_attempts=max_attempts,
        timeout=inp.timeout or default_timeout,
        kind=inp.modifier or "workflow",
        secrets=secrets or None,
    )
    return Admitted(new, inp)


_RANDOM_IDS = 256  # ids' random parts read from the OS in one call


class _IdRandom:
    """The 80 random bits of each new id, from ``os.urandom`` in batches (one getrandom call per
    256 ids instead of one per id); a forked child starts a batch of its own."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def clear(self) -> None:
        self._parts = []

    def take(self) -> str:
        try:  # list.pop is atomic: ids built in a worker thread (large bodies) take their own
            return self._parts.pop()
        except IndexError:
            raw = os.urandom(10 * _RANDOM_IDS).hex()
            parts = [raw[i : i + 20] for i in range(0, len(raw), 20)]
            part = parts.pop()
            self._parts = parts
            return part


_id_random = _IdRandom()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_id_random.clear)


def new_job_id() -> str:
    """32 hex digits: milliseconds since the epoch (12), then 80 random bits (20).

    Ids minted in time order land at the end of the jobs table's primary-key index: a random id
    would dirty a random index page per admission (more WAL pages to write and checksum per
    commit, measured ~35% more writer CPU per insert on a 20k-row table).
    """
    return f"{time.time_ns() // 1_000_000:012x}{_id_random.take()}"


def check_urls(inp: Input, raw_input: dict[str, Any], guard: Any) -> None:
    """Refuse URLs the server will never fetch or call (syntax, scheme, literal private IPs)."""
    check_input_urls(raw_input, guard)
    if inp.webhook is not None and inp.webhook.url:
        try:
            guard.check_url_syntax(inp.webhook.url)
        except ComfyqError as exc:
            raise bad("$.input.webhook.url", exc.message) from None


async def check_s3(services: Any, inp: Input) -> None:
    """Refuse, before the job exists, an S3 block its upload would refuse: keys that do not go
    together, another bucket without keys, an endpoint the address guard refuses."""
    if inp.s3 is None:
        return
    req = msgspec.to_builtins(inp.s3)
    keys = {k: req.pop(k) for k in ("access_key_id", "secret_access_key") if k in req}
    try:
        target = services.uploader.target(req, keys)
        if target is not None:
            await services.uploader.check_endpoint(target)
    except S3ConfigError as exc:
        where = "endpoint_url" if "endpoint_url refused" in exc.message else ""
        path = f"$.input.s3.{where}" if where else "$.input.s3"
        raise bad(path, exc.message.removeprefix("s3: "), exc.message) from None


_LIMITS: dict[tuple[Any, ...], lim.BodyLimits] = {}


def _limits(settings: Any) -> lim.BodyLimits:
    """``BodyLimits.from_settings(settings)``, made once per distinct set of those settings."""
    key = (
        settings.max_body_bytes,
        settings.max_json_bytes,
        settings.max_json_items,
        settings.max_workflow_nodes,
    )
    limits = _LIMITS.get(key)
    if limits is None:
        if len(_LIMITS) > 64:  # settings changed at run time (tests): never an unbounded cache
            _LIMITS.clear()
        limits = _LIMITS[key] = lim.BodyLimits.from_settings(settings)
    return limits


async def prepare(services: Any, body: bytes, headers: Mapping[str, str]) -> Admitted:
    """Validate a body and check its modifier: the job to write, or a 4xx."""
    settings = services.settings
    limits = _limits(settings)

    def validate() -> tuple[Input, dict[str, Any]]:
        inp, raw_input = parse(body, headers, limits)
        if may_hold_urls(body):
            check_urls(inp, raw_input, services.guard)
        return inp, raw_input

    threaded = len(body) > THREAD_ABOVE
    if threaded:
        lim.HEAP_TRIM.soon()  # what the body decodes into is returned to the system afterwards
    inp, raw_input = await asyncio.to_thread(validate) if threaded else validate()
    # As in the original wrapper: the header decides when present (any value but a true one opts
    # out), else the operator's default.
    header = headers.get("X-Include-ComfyUI-Response")
    if header is not None:
        inp.include_comfyui_response = header.strip().lower() in TRUE_VALUES
    elif getattr(settings, "include_comfyui_response", False):
        inp.include_comfyui_response = True
    if inp.s3 is not None:
        await check_s3(services, inp)
    if inp.models:
        problems = admission_errors(
            raw_input.get("models") or [], settings.comfyui_models_dir, services.guard
        )
        if problems:
            raise _bad_many(problems)
    if inp.modifier:
        await services.registry.check(inp.modifier, inp.modifications)
    if inp.images and not services.cluster.shared:
        # Large base64 inputs become files, the job's row a reference (a shared store keeps them
        # inline: another instance may run the job's preprocess).
        downloader = services.downloader
        await uploads.spool_images(
            inp.images,
            downloader.cache_dir,
            max_bytes=downloader.max_bytes,
            allowed=downloader.allowed_types,
        )

    def make() -> Admitted:
        return build(
            inp,
            raw_input,
            max_attempts=settings.max_attempts,
            default_timeout=settings.job_timeout,
            default_webhook_url=settings.webhook_url,
        )

    return await asyncio.to_thread(make) if threaded else make()


async def commit(services: Any, adm: Admitted) -> tuple[Job, bool]:
    """Durably create the job: ``(job, created)``; 409 for a reused id, 503 for a full queue."""
    result: tuple[Job, bool] = await services.store.create(
        adm.new, services.settings.max_queue_size
    )
    return result
