"""Typed modifiers (issue 15, item 1): one schema per modifier in /openapi.json, a tagged union on
``modifier``, ``POST /workflows/{name}``, and a 400 naming the field before any job exists."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.servers import MakeServer, Server, settings_for, start_server, wait_healthy

from comfyq.api.context import ApiOptions

REF = "#/components/schemas/"


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].removeprefix(REF)]
    return schema


def _branches(doc: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _resolve(doc, schema)
    if "anyOf" in schema:
        return [b for s in schema["anyOf"] for b in _branches(doc, s)]
    return [schema]


def invalid_values(doc: dict[str, Any], schema: dict[str, Any]) -> list[Any]:
    """Values that no branch of ``schema`` accepts: a wrong type, and each bound broken."""
    branches = _branches(doc, schema)
    types = {b.get("type") for b in branches}
    out: list[Any] = []
    if "object" not in types:
        out.append({"not": "a valid value"})
    elif "array" not in types:
        out.append([["nested"]])
    for b in branches:
        if "maximum" in b:
            out.append(b["maximum"] + 1)
        if "minimum" in b and not any(
            o.get("type") == "string" or "enum" in o for o in branches if o is not b
        ):
            out.append(b["minimum"] - 1)
        if "enum" in b and len(branches) == 1:
            out.append("not-one-of-the-choices")
        if "pattern" in b and len(branches) == 1:
            out.append("../\n bad")
        if "minLength" in b and len(branches) == 1 and b["minLength"] > 0:
            out.append("")
        if "maxLength" in b and len(branches) == 1:
            out.append("x" * (b["maxLength"] + 1))
    return out


async def _doc(srv: Server) -> dict[str, Any]:
    async with srv.session.get(srv.u("/openapi.json")) as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


async def _job_count(srv: Server) -> int:
    async with srv.session.get(srv.u("/jobs?limit=100")) as r:
        return len((await r.json())["jobs"])


async def test_every_modifier_field_refuses_an_invalid_value_by_name(
    make_server: MakeServer,
) -> None:
    srv = await make_server()
    doc = await _doc(srv)
    union = doc["components"]["schemas"]["ModifierCall"]
    mapping = union["discriminator"]["mapping"]
    assert union["discriminator"]["propertyName"] == "modifier"
    assert {"ImageEffects", "Text2Image", "Image2Image"} <= set(mapping)
    tried = 0
    for name, call_ref in mapping.items():
        call = _resolve(doc, {"$ref": call_ref})
        assert call["properties"]["modifier"] == {"const": name}
        params = _resolve(doc, call["properties"]["modifications"])
        example = params["examples"][0]
        assert params["additionalProperties"] is False
        for field, schema in params["properties"].items():
            for bad in invalid_values(doc, schema):
                body = {**example, field: bad}
                async with srv.session.post(srv.u(f"/workflows/{name}"), json=body) as r:
                    err = (await r.json())["error"]
                    assert r.status == 400, (name, field, bad, err)
                    assert err["fields"][0]["path"] == f"$.{field}", (name, field, bad, err)
                generate = {"input": {"modifier": name, "modifications": body}}
                async with srv.session.post(srv.u("/generate"), json=generate) as r:
                    err = (await r.json())["error"]
                    assert r.status == 400, (name, field, bad, err)
                    assert err["fields"][0]["path"] == f"$.input.modifications.{field}"
                tried += 1
        # An unknown parameter is named too.
        async with srv.session.post(
            srv.u(f"/workflows/{name}"), json={**example, "no_such_param": 1}
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["fields"][0]["path"] == "$.no_such_param"
    assert tried > 40
    assert await _job_count(srv) == 0  # every refusal came before a job was written


async def test_workflow_route_runs_the_modifier(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    body = {"width": 32, "height": 16, "color": "#102030", "invert": False}
    async with srv.session.post(srv.u("/workflows/ImageEffects/sync"), json=body) as r:
        assert r.status == 200, await r.text()
        res = await r.json()
    assert res["status"] == "completed" and res["output"][0]["mimetype"] == "image/png"
    # The async form, with job options in the query, and the same id again: the same job.
    url = srv.u("/workflows/ImageEffects?request_id=typed-1&priority=5")
    async with srv.session.post(url, json=body) as r:
        assert r.status == 202
    async with srv.session.post(url, json=body) as r:
        assert r.status == 200 and (await r.json())["id"] == "typed-1"
    async with srv.session.post(srv.u("/workflows/ImageEffects?priority=high"), json=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fields"][0]["path"] == "$.query.priority"
    async with srv.session.post(srv.u("/workflows/ImageEffects"), json=[1]) as r:
        assert r.status == 400
    async with srv.session.post(srv.u("/workflows/NoSuchModifier"), json={}) as r:
        assert r.status == 404
    # A rule across parameters (no source image and width 0) is still a 400 naming the field.
    async with srv.session.post(srv.u("/workflows/ImageEffects"), json={"width": 0}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fields"][0]["path"] == "$.width"


async def test_docs_show_each_modifier_with_its_example(make_server: MakeServer) -> None:
    srv = await make_server()
    doc = await _doc(srv)
    op = doc["paths"]["/workflows/Text2Image"]["post"]
    content = op["requestBody"]["content"]["application/json"]
    assert content["examples"]["example"]["value"]["prompt"]
    params = _resolve(doc, content["schema"])
    assert params["properties"]["steps"]["minimum"] == 1
    assert params["properties"]["steps"]["description"]
    inp = doc["components"]["schemas"]["Input"]
    assert {"$ref": REF + "ModifierCall"} in inp["anyOf"]


USER_MODIFIER = """
from typing import Annotated, Literal

import msgspec

from modifiers import BaseModifier


class Stripes(BaseModifier):
    \"\"\"A user's modifier: a solid image in one of three colors.\"\"\"

    WORKFLOW_JSON = "stripes.json"
    EXAMPLE = {"shade": "red", "size": 8}

    class Params(msgspec.Struct, forbid_unknown_fields=True):
        shade: Literal["red", "green", "blue"] = "red"
        size: Annotated[int, msgspec.Meta(ge=1, le=64, description="side in pixels")] = 16

    async def apply_modifications(self):
        p = self.params
        color = {"red": 0xFF0000, "green": 0x00FF00, "blue": 0x0000FF}[p.shade]
        self.workflow["1"]["inputs"].update(width=p.size, height=p.size, color=color)
        await super().apply_modifications()
"""

STRIPES_WORKFLOW = """{
  "1": {"class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "stripes"}}
}"""


@pytest.fixture
def in_folder_with_modifiers(tmp_path: Path) -> Any:
    work = tmp_path / "work"
    (work / "modifiers").mkdir(parents=True)
    (work / "modifiers" / "stripes.py").write_text(textwrap.dedent(USER_MODIFIER))
    (work / "modifiers" / "stripes.json").write_text(STRIPES_WORKFLOW)
    old = Path.cwd()
    os.chdir(work)
    try:
        yield work
    finally:
        os.chdir(old)


async def test_user_modifier_in_modifiers_folder_is_discovered_with_its_schema(
    in_folder_with_modifiers: Path, simulator: Any, tmp_path: Path
) -> None:
    srv = await start_server(
        settings_for(tmp_path / "srv", simulator.url), ApiOptions(heartbeat=0.5)
    )
    try:
        await wait_healthy(srv)
        doc = await _doc(srv)
        op = doc["paths"]["/workflows/Stripes"]["post"]
        params = _resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
        assert sorted(params["properties"]["shade"]["enum"]) == ["blue", "green", "red"]
        assert params["properties"]["size"]["maximum"] == 64
        async with srv.session.post(srv.u("/workflows/Stripes"), json={"shade": "pink"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["fields"][0]["path"] == "$.shade"
        async with srv.session.post(
            srv.u("/workflows/Stripes/sync"), json={"shade": "blue", "size": 4}
        ) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["output"][0]["filename"].startswith("stripes")
    finally:
        await srv.close()
