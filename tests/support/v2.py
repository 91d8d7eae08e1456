"""Helpers for the Comfy API v2 tests: the published contract as JSON Schema, and SSE reading.

The contract is read from ../shared/spec/comfy-api-v2.yaml (next to the repository, as the issue
gives it); OpenAPI 3.0's ``nullable`` is turned into JSON Schema's ``null`` type so that
``jsonschema`` can check every v2 body the tests receive against it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_HERE = Path(__file__).resolve()
CANDIDATES = [p / "shared" / "spec" / "comfy-api-v2.yaml" for p in _HERE.parents[2:5]]


def spec_path() -> Path:
    for p in CANDIDATES:
        if p.is_file():
            return p
    raise AssertionError(f"the Comfy API v2 contract is not at any of {CANDIDATES}")


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k not in ("nullable", "example", "examples")}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def components() -> dict[str, Any]:
    doc = yaml.safe_load(spec_path().read_text())
    return {"schemas": _nullable(doc["components"]["schemas"])}


def check(name: str, body: Any) -> Any:
    """Validate ``body`` against the contract's schema ``name`` (Job, Asset, ErrorEnvelope...)."""
    schema = {"components": components(), "$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(body)
    return body


def check_error(body: Any, code: str) -> dict[str, Any]:
    check("ErrorEnvelope", body)
    assert body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) frames of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if data:
            out.append((event, json.loads("\n".join(data))))
    return out


EVENT_SCHEMAS = {"status": "StatusEvent", "progress": "Progress", "preview": "PreviewEvent"}
EVENT_SCHEMAS["output"] = "Output"


def check_events(frames: list[tuple[str, dict[str, Any]]]) -> None:
    for event, data in frames:
        check(EVENT_SCHEMAS[event], data)
