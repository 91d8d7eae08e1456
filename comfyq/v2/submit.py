"""``POST /api/v2/jobs`` bodies: the checks a client can act on, before anything is written.

Order: media type (415), JSON (422 naming ``$``), reserved and unknown fields, the workflow's shape
(UI export -> ``workflow_format_ui``; nodes and links -> ``invalid_workflow`` with per-node details;
ComfyUI's own validation still runs when the job is submitted, as for every comfyq job), the
``core/ASSET`` references (-> ``missing_asset``), ``extra_data`` (closed), then the extensions
the official proxy also takes (``priority``, ``metadata``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from comfyq import limits as lim
from comfyq.admission import MAX_DEPTH, check_media_type
from comfyq.v2.errors import V2Error, invalid

ASSET_TYPE = "core/ASSET"
RESERVED = ("webhook_url", "inputs")
FIELDS = frozenset({"workflow", "extra_data", "priority", "metadata"})
EXTRA_DATA = frozenset({"api_key_comfy_org"})
MAX_METADATA = 16


@dataclass
class Submission:
    """A checked submission."""

    workflow: dict[str, Any]
    asset_ids: list[str]
    extra_data: dict[str, Any] | None = None
    priority: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


def _depth_ok(value: Any) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            return False
        children = v.values() if isinstance(v, dict) else v
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return True


def check_key(key: str | None) -> str | None:
    """The Idempotency-Key, or a 422 for one the contract cannot carry."""
    if key is None:
        return None
    if not key or len(key) > 255 or not key.isascii() or not key.isprintable():
        raise V2Error(
            422,
            "invalid_request",
            "Idempotency-Key must be 1-255 printable ASCII characters",
            {"fields": [{"path": "header Idempotency-Key", "message": "1-255 printable ASCII"}]},
        )
    return key


def _has_refs(value: Any) -> bool:
    """Whether a ``core/ASSET`` object is anywhere in ``value`` (no paths built: most workflows
    have none)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if v.get("__type") == ASSET_TYPE:
                return True
            stack.extend(c for c in v.values() if isinstance(c, dict | list))
        elif isinstance(v, list):
            stack.extend(c for c in v if isinstance(c, dict | list))
    return False


def asset_refs(value: Any, path: str = "$.workflow") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``core/ASSET`` object in a workflow, with its path."""
    if not _has_refs(value):
        return
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        p, v = stack.pop()
        if isinstance(v, dict):
            if v.get("__type") == ASSET_TYPE:
                yield p, v
                continue
            stack.extend((f"{p}.{k}", c) for k, c in v.items() if isinstance(c, dict | list))
        elif isinstance(v, list):
            stack.extend((f"{p}[{i}]", c) for i, c in enumerate(v) if isinstance(c, dict | list))


def _node_errors(workflow: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    errors: dict[str, list[dict[str, str]]] = {}
    for node_id, node in workflow.items():
        errs: list[dict[str, str]] = []
        if not isinstance(node, dict):
            errs.append({"field": "", "reason": "not_an_object"})
        else:
            if not isinstance(node.get("class_type"), str) or not node["class_type"]:
                errs.append({"field": "class_type", "reason": "missing_class_type"})
            inputs = node.get("inputs", {})
            if not isinstance(inputs, dict):
                errs.append({"field": "inputs", "reason": "not_an_object"})
            else:
                for name, value in inputs.items():
                    if (
                        isinstance(value, list)
                        and len(value) == 2
                        and isinstance(value[0], str)
                        and isinstance(value[1], int)
                        and value[0] not in workflow
                    ):
                        errs.append({"field": str(name), "reason": "link_to_missing_node"})
        if errs:
            errors[str(node_id)] = errs
    return errors


def _workflow(raw: Any, limits: lim.BodyLimits) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise invalid("$.workflow", "must be an object: the API-format graph", "invalid_workflow")
    if isinstance(raw.get("nodes"), list) and ("links" in raw or "last_node_id" in raw):
        raise V2Error(
            422,
            "workflow_format_ui",
            "this is a UI-format workflow (nodes/links); export it with 'Save (API)' and send that",
        )
    if not raw:
        raise V2Error(422, "invalid_workflow", "the workflow has no nodes", {"node_errors": {}})
    # comfyq's own limits and checks (node count, printable names, output paths, no cycles).
    fields = [
        {**e, "path": e["path"].replace("$.input.workflow_json", "$.workflow")}
        for e in lim.workflow_errors(raw, limits)
    ]
    if fields:
        more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
        raise V2Error(
            422,
            "invalid_workflow",
            f"{fields[0]['path']}: {fields[0]['message']}{more}",
            {"fields": fields},
        )
    errors = _node_errors(raw)
    if errors:
        first = next(iter(errors))
        raise V2Error(
            422,
            "invalid_workflow",
            f"node {first}: {errors[first][0]['reason']}"
            + (f" (and {len(errors) - 1} more node(s))" if len(errors) > 1 else ""),
            {"node_errors": errors},
        )
    return raw


def _asset_ids(workflow: dict[str, Any]) -> list[str]:
    ids: list[str] = []
    for path, ref in asset_refs(workflow):
        info = ref.get("info")
        asset_id = info.get("id") if isinstance(info, dict) else None
        if not isinstance(asset_id, str) or not asset_id or len(asset_id) > 100:
            raise V2Error(
                422,
                "missing_asset",
                f"{path}: a core/ASSET reference needs info.id (the asset's id)",
                {"path": path},
            )
        if asset_id not in ids:
            ids.append(asset_id)
    return ids


def _extra_data(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid("$.extra_data", "must be an object")
    unknown = sorted(str(k) for k in raw if k not in EXTRA_DATA)
    if unknown:
        raise invalid(f"$.extra_data.{unknown[0]}", "unknown field (extra_data is closed)")
    key = raw.get("api_key_comfy_org")
    if key is not None and (not isinstance(key, str) or not key):
        raise invalid("$.extra_data.api_key_comfy_org", "must be a non-empty string")
    return dict(raw) if raw else None


def _metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise V2Error(422, "metadata_invalid", "metadata must be an object of string labels")
    if len(raw) > MAX_METADATA:
        raise V2Error(
            422, "metadata_invalid", f"metadata has {len(raw)} pairs; at most {MAX_METADATA}"
        )
    for k, v in raw.items():
        if not isinstance(v, str) or not 0 < len(k) <= 64 or len(v) > 512:
            raise V2Error(
                422,
                "metadata_invalid",
                f"metadata {str(k)[:64]!r}: keys 1-64 characters, values strings up to 512",
            )
    return dict(raw)


def _priority(raw: Any) -> int:
    if raw is None:
        return 0
    if isinstance(raw, bool) or not isinstance(raw, int) or not -1000 <= raw <= 1000:
        raise invalid("$.priority", "must be an integer from -1000 to 1000 (higher runs first)")
    return raw


def parse(
    body: bytes, content_type: str | None, limits: lim.BodyLimits = lim.DEFAULT
) -> Submission:
    """A checked submission, or the 4xx that says what to fix (run it in a thread for big
    bodies)."""
    check_media_type(content_type)
    lim.check_json_body(body, limits)
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise invalid("$", f"invalid JSON: {exc}") from None
    except RecursionError:
        raise invalid("$", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(raw, dict):
        raise invalid("$", 'must be an object: {"workflow": {...}}')
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and not _depth_ok(raw):
        raise invalid("$", f"JSON nested deeper than {MAX_DEPTH} levels")
    for name in RESERVED:
        if name in raw:
            raise invalid(f"$.{name}", "reserved by the Comfy API v2 and not accepted yet")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise invalid(f"$.{unknown[0]}", "unknown field")
    if "workflow" not in raw:
        raise invalid("$.workflow", "required field is missing")
    workflow = _workflow(raw["workflow"], limits)
    return Submission(
        workflow=workflow,
        asset_ids=_asset_ids(workflow),
        extra_data=_extra_data(raw.get("extra_data")),
        priority=_priority(raw.get("priority")),
        metadata=_metadata(raw.get("metadata")),
    )
