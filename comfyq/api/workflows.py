"""``POST /workflows/{name}`` (and ``/workflows/{name}/sync``): one typed endpoint per modifier
that declares ``Params``; the body is the parameters object itself.

Each request becomes the same ``/generate`` body (``{"input": {"modifier": name,
"modifications": body}}``) and goes through the same admission, so a wrong parameter is a 400
naming it (``$.width``) before any job exists. Job options that are not parameters come in the
query string: ``request_id``, ``priority``, ``webhook_url``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from comfyq import admission
from comfyq.api import multipart
from comfyq.api.auth import principal
from comfyq.api.body import read_json_body
from comfyq.api.context import get_api, json_response
from comfyq.api.generate import _timeout, final_status, wait_final
from comfyq.api.openapi import Param, Reply, Route
from comfyq.errors import BadRequest
from comfyq.inputs import uploads
from comfyq.result import to_result
from comfyq.schemas import ErrorBody, Result
from modifiers.registry import ModifierInfo, ModifierRegistry

REF = "#/components/schemas/{name}"
_QUERY_PATHS = {
    "$.input.request_id": "$.query.request_id",
    "$.input.priority": "$.query.priority",
    "$.input.webhook.url": "$.query.webhook_url",
    "$.input.webhook": "$.query.webhook_url",
}
_PARAMS = "$.input.modifications"


def _rebase_path(path: str) -> str:
    if path == _PARAMS or path.startswith((_PARAMS + ".", _PARAMS + "[")):
        return "$" + path[len(_PARAMS) :]
    for old, new in _QUERY_PATHS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return path


def _rebase(exc: BadRequest) -> BadRequest:
    """The same 400 with paths as this route's client sees them (the body is the parameters)."""
    fields = [{**f, "path": _rebase_path(f.get("path", "$"))} for f in exc.fields or []]
    message = exc.message
    for old in (f.get("path", "") for f in exc.fields or []):
        if old and message.startswith(old):
            message = _rebase_path(old) + message[len(old) :]
            break
    return BadRequest(message, fields=fields or None, details=exc.details or None)


def _query_options(query: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "request_id" in query:
        out["request_id"] = query["request_id"]
    if "priority" in query:
        try:
            out["priority"] = int(query["priority"])
        except ValueError:
            raise admission.bad("$.query.priority", "must be an integer") from None
    if query.get("webhook_url"):
        out["webhook"] = {"url": query["webhook_url"]}
    return out


async def _admit(request: web.Request, name: str) -> Any:
    api = get_api(request)
    params: Any = {}
    images: list[dict[str, str]] = []
    stored: list[Any] = []
    if multipart.is_multipart(request):  # text parameters and files, streamed to disk
        params, images, stored = await multipart.workflow_params(request, api.services)
    else:
        admission.check_media_type(request.headers.get("Content-Type"))
        raw = await read_json_body(request, api.settings)
        if raw.strip():
            try:
                params = msgspec.json.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise admission.bad(
                    "$", "invalid JSON: the body is the parameters object"
                ) from None
            except RecursionError:
                raise admission.bad("$", "JSON nested too deeply") from None
        if not isinstance(params, dict):
            raise admission.bad("$", f"must be an object: the parameters of {name}")
    inp: dict[str, Any] = {"modifier": name, "modifications": params}
    if images:
        inp["images"] = images
    body = {"input": {**inp, **_query_options(request.query)}}
    try:
        encoded = msgspec.json.encode(body)
        adm = await admission.prepare(
            api.services, encoded, multipart.json_headers(request.headers)
        )
    except BadRequest as exc:
        await uploads.discard(stored)
        raise _rebase(exc) from None
    except BaseException:
        await uploads.discard(stored)
        raise
    adm.new.owner = principal(request).owner
    return api, adm


def _location(job_id: str) -> dict[str, str]:
    return {"Location": f"/result/{job_id}"}


def _handler(name: str, sync: bool) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def run_workflow(request: web.Request) -> web.StreamResponse:
        if not sync:
            api, adm = await _admit(request, name)
            job, created = await admission.commit(api.services, adm)
            if created:
                return json_response(to_result(job, []), 202, _location(job.id))
            return json_response(await api.results.of(job), 200, _location(job.id))
        timeout = _timeout(request)
        api, adm = await _admit(request, name)
        with api.bus.subscribe(adm.new.id, maxsize=4, finals_only=True) as sub:
            job, _ = await admission.commit(api.services, adm)
            job = await wait_final(api, sub, job, timeout)
        res: Result = await api.results.of(job)
        return json_response(res, final_status(job) if job.terminal else 202, _location(job.id))

    run_workflow.__name__ = f"workflow_{name}{'_sync' if sync else ''}"
    return run_workflow


_OPTIONS = [
    Param("request_id", "query", {"type": "string"}, "client id of the job (idempotency key)"),
    Param("priority", "query", {"type": "integer", "minimum": -1000, "maximum": 1000}),
    Param("webhook_url", "query", {"type": "string"}, "called once when the job ends"),
    Param(
        "X-Return-Outputs-As-Base64",
        "header",
        {"type": "string", "enum": ["1", "true", "yes", "on"]},
        "inline output files as base64",
    ),
]
_QUEUE_FULL = Reply(
    "MAX_QUEUE_SIZE jobs are not finished yet", ErrorBody, headers={"Retry-After": "seconds"}
)


def routes(registry: ModifierRegistry) -> list[Route]:
    """Two routes per typed modifier: queue (202) and run-and-wait (/sync)."""
    out: list[Route] = []
    for info in registry.typed():
        summary = info.description.splitlines()[0]
        out.append(
            Route(
                "POST",
                f"/workflows/{info.name}",
                _handler(info.name, sync=False),
                f"Queue {info.name}",
                "workflows",
                body=info.params,
                params=_OPTIONS,
                description=(
                    f"{summary}. The body is the parameters; a wrong one is a 400 naming it."
                ),
                replies={
                    202: Reply("accepted: the job is committed", Result),
                    200: Reply("this request_id already exists with the same payload", Result),
                    409: Reply("request_id already used with a different payload", ErrorBody),
                    503: _QUEUE_FULL,
                },
            )
        )
        out.append(
            Route(
                "POST",
                f"/workflows/{info.name}/sync",
                _handler(info.name, sync=True),
                f"Run {info.name} and wait for its result",
                "workflows",
                body=info.params,
                params=[
                    Param(
                        "timeout",
                        "query",
                        {"type": "number", "minimum": 0},
                        "seconds to wait; then 202 with the current Result (the job goes on)",
                    ),
                    *_OPTIONS,
                ],
                replies={
                    200: Reply("completed", Result),
                    202: Reply("timeout elapsed; the job goes on", Result),
                    409: Reply("request_id already used with a different payload", ErrorBody),
                    499: Reply("cancelled", Result),
                    500: Reply("the job failed", Result),
                    502: Reply("ComfyUI was unreachable", Result),
                    503: _QUEUE_FULL,
                },
            )
        )
    return out


def _ref_name(ref: dict[str, Any]) -> str:
    return str(ref["$ref"]).rsplit("/", 1)[-1]


def annotate(doc: dict[str, Any], infos: list[ModifierInfo]) -> None:
    """Add examples, one ``<Name>Call`` schema per modifier and the ``ModifierCall`` union
    (tagged on ``modifier``) that ``Input`` refers to."""
    if not infos:
        return
    schemas = doc["components"]["schemas"]
    refs, _ = msgspec.json.schema_components([i.params for i in infos], ref_template=REF)
    mapping: dict[str, str] = {}
    for info, ref in zip(infos, refs, strict=True):
        params_name = _ref_name(ref)
        if info.example is not None:
            schemas[params_name]["examples"] = [info.example]
            for suffix in ("", "/sync"):
                op = doc["paths"][f"/workflows/{info.name}{suffix}"]["post"]
                op["requestBody"]["content"]["application/json"]["examples"] = {
                    "example": {"summary": f"{info.name} example", "value": info.example}
                }
        call = f"{info.name}Call"
        schemas[call] = {
            "title": call,
            "description": info.description,
            "type": "object",
            "properties": {
                "modifier": {"const": info.name},
                "modifications": {"$ref": REF.format(name=params_name)},
            },
            "required": ["modifier"],
            **(
                {"examples": [{"modifier": info.name, "modifications": info.example}]}
                if info.example is not None
                else {}
            ),
        }
        mapping[info.name] = REF.format(name=call)
    schemas["ModifierCall"] = {
        "title": "ModifierCall",
        "description": "modifier and modifications of a typed modifier, tagged on `modifier`",
        "oneOf": [{"$ref": r} for r in mapping.values()],
        "discriminator": {"propertyName": "modifier", "mapping": mapping},
    }
    inp = schemas.get("Input")
    if isinstance(inp, dict):
        inp["anyOf"] = [
            {"$ref": REF.format(name="ModifierCall")},
            {"required": ["workflow_json"]},
            {
                "description": "a modifier without typed parameters",
                "required": ["modifier"],
                "properties": {"modifier": {"not": {"enum": list(mapping)}}},
            },
        ]
