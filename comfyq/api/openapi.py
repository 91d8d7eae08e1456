"""The OpenAPI 3.1 document, generated from the route table and the msgspec types in
``comfyq.schemas`` (the same types that validate requests and shape responses)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

import comfyq
from comfyq.schemas import ErrorBody

Handler = Callable[..., Awaitable[Any]]
REF = "#/components/schemas/{name}"


@dataclass
class Param:
    name: str
    where: str  # query | header | path
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass
class Reply:
    """One documented response: a msgspec type (JSON), or a media type with a plain schema."""

    description: str
    type: Any = None  # a msgspec type, or a tuple of them (the body is any one of them)
    media: str = "application/json"
    schema: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    components: tuple[Any, ...] = ()  # types the plain ``schema`` refers to by $ref


@dataclass
class Route:
    """A route: registered on the app and described in the document from this one entry."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: Any = None
    replies: dict[int, Reply] = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    public: bool = False
    in_schema: bool = True
    description: str = ""
    # The shape of this route's errors when it is not comfyq's ErrorBody (the v2 envelope); such a
    # route documents every client error status its surface uses with it.
    error_reply: Reply | None = None
    # A download: HEAD answers too (its headers, no body), as curl -I and download managers ask.
    head: bool = False


def _errors(route: Route, keys: bool) -> dict[int, Reply]:
    if route.error_reply is not None:
        codes = [400, 408, 413, 415, 422] + ([404] if "{" in route.path else [])
        codes += [401] if keys and not route.public else []
        return dict.fromkeys(codes, route.error_reply)
    out: dict[int, Reply] = {}
    if route.body is not None:
        out[400] = Reply("invalid request: `error.fields` names each failing field", ErrorBody)
        out[408] = Reply("the body did not arrive within http_body_timeout", ErrorBody)
        out[413] = Reply("body over the configured limit", ErrorBody)
        out[415] = Reply("body is not JSON", ErrorBody)
    if "{" in route.path:
        out[400] = Reply("a path parameter holds a control character", ErrorBody)
        out[404] = Reply("no such job (or file)", ErrorBody)
    if keys and not route.public:
        out[401] = Reply("missing or wrong API key", ErrorBody)
    return out


def _types(reply: Reply) -> list[Any]:
    shapes = reply.type if isinstance(reply.type, tuple) else (reply.type,)
    return [t for t in (*shapes, *reply.components) if t is not None]


def _content(reply: Reply, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(reply.type, tuple):
        schema: dict[str, Any] = {"anyOf": [refs[t] for t in reply.type]}
    elif reply.type is not None:
        schema = refs[reply.type]
    else:
        schema = reply.schema or {}
    return {reply.media: {"schema": schema}}


def _exactly_one(components: dict[str, Any]) -> None:
    """The Input rule msgspec cannot express: exactly one of workflow_json and modifier."""
    inp = components.get("Input")
    if not isinstance(inp, dict):
        return
    inp["oneOf"] = [
        {
            "required": ["workflow_json"],
            "properties": {"workflow_json": {"minProperties": 1}, "modifier": {"maxLength": 0}},
        },
        {
            "required": ["modifier"],
            "properties": {"modifier": {"minLength": 1}, "workflow_json": {"maxProperties": 0}},
        },
    ]


def document(routes: list[Route], *, api_keys: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    types: list[Any] = [ErrorBody]
    for r in routes:
        if r.body is not None:
            types.append(r.body)
        for rep in r.replies.values():
            types.extend(_types(rep))
    unique = list(dict.fromkeys(types))
    refs_list, components = msgspec.json.schema_components(unique, ref_template=REF)
    _exactly_one(components)
    refs = dict(zip(unique, refs_list, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        if not r.in_schema:
            continue
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": f"{r.method.lower()}_{r.handler.__name__}_{len(paths)}",
        }
        if r.description:
            op["description"] = r.description
        params = [
            Param(n, "path", {"type": "string"}, required=True) for n in _path_names(r.path)
        ] + r.params
        if params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required,
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                }
                for p in params
            ]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[r.body]}},
            }
        replies = {**_errors(r, api_keys), **r.replies}
        op["responses"] = {
            str(code): {
                "description": rep.description,
                **(
                    {"content": _content(rep, refs)}
                    if rep.type is not None or rep.schema is not None
                    else {}
                ),
                **(
                    {
                        "headers": {
                            h: {"description": d, "schema": {"type": "string"}}
                            for h, d in rep.headers.items()
                        }
                    }
                    if rep.headers
                    else {}
                ),
            }
            for code, rep in sorted(replies.items())
        }
        if api_keys and not r.public:
            op["security"] = [{"bearer": []}]
        elif r.public:
            op["security"] = []
        paths.setdefault(r.path, {})[r.method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "comfyq",
            "version": comfyq.__version__,
            "description": "A durable, restart-safe job API in front of ComfyUI."
            " Jobs are committed to SQLite"
            " before they are acknowledged; progress streams over SSE and websockets.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]
