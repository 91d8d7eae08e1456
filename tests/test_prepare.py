"""prepare_job end to end: modifiers or raw workflows, URL and inline inputs, per-job names."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import re
import struct
import textwrap
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import serve

from comfyq.errors import BadRequest, InputError, ModifierError
from comfyq.inputs import Downloader
from comfyq.inputs.prepare import Prepared, check_input_urls, input_name, prepare_job
from comfyq.netguard import AddressGuard
from modifiers import ModifierRegistry


def make_png(seed: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + bytes((seed + x + y) % 256 for x in range(6)) for y in range(2))
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


RED, BLUE = make_png(1), make_png(2)
NAME_RE = re.compile(r"cq_[0-9a-f]{8}_[0-9a-f]{16}\.png")


class Env:
    def __init__(self, base: str, hits: Counter[str], registry: ModifierRegistry, d: Downloader):
        self.base, self.hits, self.registry, self.downloader = base, hits, registry, d

    async def prepare(self, job_input: dict[str, Any], job_id: str = "job-1") -> Prepared:
        return await prepare_job(
            job_input, job_id, registry=self.registry, downloader=self.downloader
        )


USER_MODIFIERS = '''
from modifiers.basemodifier import BaseModifier

class Exploding(BaseModifier):
    WORKFLOW_JSON = "workflows/image_effects.json"

    async def apply_modifications(self):
        raise ZeroDivisionError("the modifier divided by zero")

class Quitter(BaseModifier):
    WORKFLOW_JSON = "workflows/image_effects.json"

    async def apply_modifications(self):
        raise SystemExit(3)

class NoSuper(BaseModifier):
    """Sets nodes but never calls super(): the framework still downloads and randomises."""

    WORKFLOW_JSON = "workflows/image_effects.json"

    async def apply_modifications(self):
        self.workflow["10"] = {"class_type": "LoadImage",
                               "inputs": {"image": self.modifications["url"]}}
        self.workflow["1"]["inputs"]["color"] = "__RANDOM_INT__"

class ReturnsList(BaseModifier):
    WORKFLOW_JSON = "workflows/image_effects.json"

    async def get_modified_workflow(self):
        return ["not", "a", "workflow"]
'''


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    hits: Counter[str] = Counter()

    async def image(request: web.Request) -> web.Response:
        hits[request.path] += 1
        body = {"/red.png": RED, "/blue.png": BLUE}[request.path]
        return web.Response(body=body, content_type="image/png")

    async def page(request: web.Request) -> web.Response:
        hits[request.path] += 1
        return web.Response(text="<html><body>login</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/red.png", image)
    app.router.add_get("/blue.png", image)
    app.router.add_get("/page", page)
    server = await serve.start(app)
    user = tmp_path / "user_modifiers"
    user.mkdir()
    (user / "testmods.py").write_text(textwrap.dedent(USER_MODIFIERS))
    registry = ModifierRegistry([user])
    downloader = Downloader(tmp_path / "cache", AddressGuard(["127.0.0.1"]), max_bytes=1 << 20)
    try:
        yield Env(serve.base_url(server), hits, registry, downloader)
    finally:
        await downloader.close()
        await server.close()


def raw_workflow(image: str) -> dict[str, Any]:
    return {
        "10": {"class_type": "LoadImage", "inputs": {"image": image, "upload": "image"}},
        "12": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["10", 0], "blur_radius": "__RANDOM_INT__", "sigma": 1.0},
        },
        "13": {
            "class_type": "SaveImage",
            "inputs": {"images": ["12", 0], "filename_prefix": "run___RANDOM_INT__"},
        },
    }


async def test_raw_workflow_urls_are_downloaded_and_renamed(env: Env) -> None:
    url = f"{env.base}/red.png?sig=abc"
    wf = raw_workflow(url)
    wf["14"] = {"class_type": "LoadImage", "inputs": {"image": url}}  # same URL again
    wf["15"] = {"class_type": "LoadImage", "inputs": {"image": f"{env.base}/blue.png"}}
    original = copy.deepcopy(wf)
    out = await env.prepare({"workflow_json": wf})
    assert wf == original  # the job's stored input is never mutated
    red_name = out.workflow["10"]["inputs"]["image"]
    assert NAME_RE.fullmatch(red_name)
    assert out.workflow["14"]["inputs"]["image"] == red_name
    blue_name = out.workflow["15"]["inputs"]["image"]
    assert blue_name != red_name
    assert env.hits == Counter({"/red.png": 1, "/blue.png": 1})
    by_name = {i.name: i for i in out.inputs}
    assert set(by_name) == {red_name, blue_name}
    red = by_name[red_name]
    assert red.path.read_bytes() == RED and red.mime == "image/png" and red.size == len(RED)
    assert red.sha256 == hashlib.sha256(RED).hexdigest()
    assert red_name.endswith(f"_{red.sha256[:16]}.png")
    # __RANDOM_INT__: whole value -> int, embedded -> digits.
    assert isinstance(out.workflow["12"]["inputs"]["blur_radius"], int)
    assert re.fullmatch(r"run_\d+", out.workflow["13"]["inputs"]["filename_prefix"])
    assert out.workflow["12"]["inputs"]["image"] == ["10", 0]


async def test_names_are_per_job_and_content(env: Env) -> None:
    url = f"{env.base}/red.png"
    jobs = [f"job-{i}" for i in range(10)]
    results = await asyncio.gather(
        *(env.prepare({"workflow_json": raw_workflow(url)}, j) for j in jobs)
    )
    names = [r.workflow["10"]["inputs"]["image"] for r in results]
    assert len(set(names)) == 10  # concurrent jobs never share a name
    assert len({r.inputs[0].path for r in results}) == 1  # but share one stored file
    assert env.hits["/red.png"] == 1
    again = await env.prepare({"workflow_json": raw_workflow(url)}, "job-3")
    assert again.workflow["10"]["inputs"]["image"] == names[3]  # a retry reuses its name
    assert input_name("job-3", await env.downloader.fetch(url)) == names[3]


async def test_input_images_base64_data_uri_and_url(env: Env) -> None:
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "c.png"}},
        "4": {"class_type": "Note", "inputs": {"text": "a.png is mentioned, not replaced"}},
    }
    images = [
        {"name": "a.png", "image": base64.b64encode(RED).decode()},
        {"name": "b.png", "image": "data:image/png;base64," + base64.b64encode(BLUE).decode()},
        {"name": "c.png", "image": f"{env.base}/blue.png"},
        {"name": "unused.png", "image": base64.b64encode(BLUE).decode()},
    ]
    out = await env.prepare({"workflow_json": wf, "images": images})
    a, b, c = (out.workflow[k]["inputs"]["image"] for k in ("1", "2", "3"))
    assert NAME_RE.fullmatch(a) and NAME_RE.fullmatch(b)
    assert b == c  # same bytes by data URI and by URL -> same per-job name
    assert a != b
    assert out.workflow["4"]["inputs"]["text"] == "a.png is mentioned, not replaced"
    assert {i.name for i in out.inputs} == {a, b}
    assert env.hits["/blue.png"] == 1


async def test_input_images_with_a_modifier(env: Env) -> None:
    job: dict[str, Any] = {
        "modifier": "ImageEffects",
        "modifications": {"input_image": "photo.png", "width": 32, "blur_radius": 2},
        "images": [{"name": "photo.png", "image": base64.b64encode(RED).decode()}],
    }
    await env.registry.check(job["modifier"], job["modifications"])
    out = await env.prepare(job)
    name = out.workflow["10"]["inputs"]["image"]
    assert NAME_RE.fullmatch(name) and [i.name for i in out.inputs] == [name]
    assert out.workflow["11"]["inputs"]["width"] == 32


async def test_modifier_url_modification_is_downloaded(env: Env) -> None:
    job = {
        "modifier": "Image2Image",
        "modifications": {"input_image": f"{env.base}/red.png", "prompt": "x", "seed": 7},
    }
    out = await env.prepare(job)
    assert NAME_RE.fullmatch(out.workflow["10"]["inputs"]["image"])
    assert out.workflow["3"]["inputs"]["seed"] == 7
    assert len(out.inputs) == 1 and env.hits["/red.png"] == 1


@pytest.mark.parametrize(
    ("images", "fragment", "path"),
    [
        ("nope", "must be a list", "$.input.images"),
        ([{"image": "AAAA"}], "name must be a non-empty string", "$.input.images[0].name"),
        ([{"name": "a.png"}], "image must be", "$.input.images[0].image"),
        (
            [{"name": "a.png", "image": "!!notbase64"}, {"name": "b.png", "image": "x"}],
            "image 'a.png': inline data is neither",
            "$.input.images[0].image",
        ),
        (
            [{"name": "a", "image": "QUJD"}, {"name": "a", "image": "QUJD"}],
            "used twice",
            "$.input.images[1].name",
        ),
    ],
)
async def test_bad_input_images(env: Env, images: Any, fragment: str, path: str) -> None:
    with pytest.raises(InputError, match=fragment) as info:
        await env.prepare({"workflow_json": raw_workflow("a.png"), "images": images})
    assert (info.value.fields or [])[0]["path"] == path


async def test_failed_downloads_are_input_errors(env: Env) -> None:
    with pytest.raises(InputError, match="HTTP 404"):
        await env.prepare({"workflow_json": raw_workflow(f"{env.base}/missing.png")})
    with pytest.raises(InputError, match="text/html"):
        await env.prepare({"workflow_json": raw_workflow(f"{env.base}/page")})
    with pytest.raises(InputError, match="link-local"):
        await env.prepare({"workflow_json": raw_workflow("http://169.254.169.254/latest/")})
    bad_image = [{"name": "x.png", "image": f"{env.base}/page?token=s3cr3t"}]
    with pytest.raises(InputError, match=r"\$\.input|image 'x.png'") as info:
        await env.prepare({"workflow_json": raw_workflow("x.png"), "images": bad_image})
    assert "s3cr3t" not in str(info.value.to_dict())


@pytest.mark.parametrize(
    ("modifier", "fragment"),
    [
        ("Exploding", "modifier Exploding failed: ZeroDivisionError: the modifier divided by zero"),
        ("Quitter", "modifier Quitter failed: SystemExit"),
        ("ReturnsList", "produced a list"),
        ("Missing", "unknown modifier 'Missing'"),
    ],
)
async def test_modifier_failures_become_modifier_errors(
    env: Env, modifier: str, fragment: str
) -> None:
    with pytest.raises(ModifierError) as info:
        await env.prepare({"modifier": modifier, "modifications": {}})
    assert fragment in info.value.message


async def test_bad_modification_at_prepare_time_names_the_key(env: Env) -> None:
    with pytest.raises(ModifierError) as info:
        await env.prepare({"modifier": "Text2Image", "modifications": {"steps": "lots"}})
    assert (info.value.fields or [])[0]["path"] == "$.input.modifications.steps"


async def test_modifier_that_skips_super_still_gets_urls_and_random_ints(env: Env) -> None:
    out = await env.prepare(
        {"modifier": "NoSuper", "modifications": {"url": f"{env.base}/red.png"}}
    )
    assert NAME_RE.fullmatch(out.workflow["10"]["inputs"]["image"])
    assert isinstance(out.workflow["1"]["inputs"]["color"], int)


async def test_job_needs_a_workflow_or_modifier(env: Env) -> None:
    with pytest.raises(InputError, match="workflow_json object or a modifier"):
        await env.prepare({"workflow_json": "not an object"})
    with pytest.raises(InputError, match="workflow_json object or a modifier"):
        await env.prepare({})


def test_admission_url_check_names_every_refused_url() -> None:
    guard = AddressGuard()
    job = {
        "workflow_json": {
            "10": {"class_type": "LoadImage", "inputs": {"image": "http://169.254.169.254/x"}},
            "11": {"class_type": "LoadImage", "inputs": {"image": "https://ok.test/a.png"}},
            "12": {"class_type": "X", "inputs": {"list": ["http://[::1]:8188/view?token=t0k"]}},
            "13": {"class_type": "CLIPTextEncode", "inputs": {"text": "see http://10.0.0.1 now"}},
        },
        "images": [
            {"name": "a.png", "image": "http://localhost:8188/a.png"},
            {"name": "b.png", "image": "http://127.0.0.1/b.png"},
        ],
    }
    with pytest.raises(BadRequest, match="3 input URLs refused") as info:
        check_input_urls(job, guard)
    fields = info.value.fields or []
    assert [f["path"] for f in fields] == [
        "$.input.images[1].image",
        "$.input.workflow_json['10'].inputs.image",
        "$.input.workflow_json['12'].inputs.list[0]",
    ]
    assert all("t0k" not in f["message"] for f in fields)
    # Host names are not resolved at admission (localhost above): that happens at fetch time.
    check_input_urls({"modifications": {"input_image": "https://ok.test/a.png"}}, guard)
    with pytest.raises(BadRequest) as info:
        check_input_urls({"modifications": {"input_image": "http://10.1.2.3/a.png"}}, guard)
    assert (info.value.fields or [])[0]["path"] == "$.input.modifications.input_image"
    check_input_urls(
        {"modifications": {"input_image": "http://10.1.2.3/a.png"}}, AddressGuard(["10.0.0.0/8"])
    )
