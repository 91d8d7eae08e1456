"""``POST /prompt`` rejections of every ComfyUI generation mapped to one ValidationError.

ComfyUI's answer is kept whole (``details.error``, ``details.node_errors``), and ``details.kind``
names the failure the same way for every generation: 0.3.64 calls an unknown node class
``invalid_prompt`` ("Cannot execute because node Foo does not exist."), newer servers call it
``missing_node_type`` with the ids in ``extra_info``; both become kind ``unknown_node`` with the
same message, ``node_id`` and ``node_type``. A node without ``class_type`` is ``missing_class_type``
in both. Every other type (``prompt_outputs_failed_validation``, ``prompt_no_outputs``, ...) is the
same word in both generations and is kept as the kind, with ComfyUI's message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from comfyq.errors import ValidationError

UNKNOWN_NODE_TYPES = frozenset({"invalid_prompt", "missing_node_type"})
_NODE_ID = re.compile(r"#([^'\"]+)")
_OLD_UNKNOWN = re.compile(r"Cannot execute because node (.+) does not exist\.?$")


def validation_error(
    status: int, answer: Any, raw: bytes, workflow: Mapping[str, Any] | None
) -> ValidationError:
    """The ValidationError for a 400 (or 413/422) answer to ``POST /prompt`` (``workflow``: the
    one submitted; only the node the error names is read from it)."""
    if not (isinstance(answer, dict) and isinstance(answer.get("error"), dict)):
        text = raw[:2000].decode(errors="replace")
        return ValidationError(
            f"ComfyUI rejected the workflow (HTTP {status})",
            details={"status": status, "body": text, "kind": "unreadable"},
        )
    error: dict[str, Any] = answer["error"]
    node_errors = answer.get("node_errors") or {}
    kind = str(error.get("type") or "unknown")
    message = str(error.get("message") or "ComfyUI rejected the workflow")
    node_id: str | None = None
    node_type: str | None = None
    if kind in UNKNOWN_NODE_TYPES:
        node_id = _node_id(error)
        spec = (workflow or {}).get(node_id) if node_id is not None else None
        has_class = isinstance(spec, dict) and "class_type" in spec
        node_type = _class_type(error, spec)
        if node_id is not None and node_type:
            kind = "unknown_node"
            message = (
                f"ComfyUI has no node type {node_type!r} (node #{node_id}); "
                "the custom node may not be installed"
            )
        elif node_id is not None and not has_class and spec is not None:
            kind = "missing_class_type"
            message = f"Node #{node_id} has no class_type; the workflow may be corrupted"
    details = {"error": error, "node_errors": node_errors, "kind": kind}
    return ValidationError(message, details=details, node_id=node_id, node_type=node_type)


def _node_id(error: dict[str, Any]) -> str | None:
    extra = error.get("extra_info")
    if isinstance(extra, dict) and isinstance(extra.get("node_id"), str):
        return str(extra["node_id"])
    found = _NODE_ID.search(str(error.get("details") or ""))
    return found.group(1) if found else None


def _class_type(error: dict[str, Any], spec: Any) -> str | None:
    extra = error.get("extra_info")
    if isinstance(extra, dict) and "class_type" in extra:
        value = extra.get("class_type")
        return value if isinstance(value, str) and value else None
    if isinstance(spec, dict):
        value = spec.get("class_type")
        return value if isinstance(value, str) and value else None
    found = _OLD_UNKNOWN.search(str(error.get("message") or ""))
    return found.group(1) if found else None
