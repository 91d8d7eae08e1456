"""Multipart inputs (issue 15, item 2): a JSON part for the request and file parts for inputs,
streamed to disk, size-capped with 413, typed by their bytes (415), usable wherever an
``input.images`` entry (base64 or URL) is: raw workflows, modifiers and ``/workflows/{name}``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image
from support.servers import MakeServer, Server, wait_healthy


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def form(request: dict[str, Any] | None, files: dict[str, tuple[str, bytes]]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    if request is not None:
        data.add_field("request", json.dumps(request), content_type="application/json")
    for field, (filename, content) in files.items():
        data.add_field(field, content, filename=filename, content_type="application/octet-stream")
    return data


async def _first_pixel(srv: Server, res: dict[str, Any]) -> tuple[int, ...]:
    async with srv.session.get(srv.u(res["output"][0]["url"])) as r:
        assert r.status == 200
        img = Image.open(io.BytesIO(await r.read())).convert("RGB")
    return tuple(img.getpixel((0, 0)))  # type: ignore[arg-type]


async def _no_jobs(srv: Server) -> bool:
    async with srv.session.get(srv.u("/jobs")) as r:
        return not (await r.json())["jobs"]


def _partials(srv: Server) -> list[Path]:
    folder = srv.services.downloader.cache_dir / ".partial"
    return list(folder.iterdir()) if folder.exists() else []


async def test_a_file_part_is_an_input_of_a_raw_workflow(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "mp"}},
    }
    body = form({"input": {"workflow_json": workflow}}, {"photo": ("photo.png", png((10, 20, 30)))})
    async with srv.session.post(srv.u("/generate/sync"), data=body) as r:
        assert r.status == 200, await r.text()
        res = await r.json()
    assert res["status"] == "completed"
    assert await _first_pixel(srv, res) == (245, 235, 225)  # the uploaded image, inverted


async def test_a_file_part_feeds_a_modifier_and_a_workflow_route(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    # /generate: the modifier parameter names the file part.
    request = {"input": {"modifier": "ImageEffects", "modifications": {"input_image": "cat"}}}
    body = form(request, {"cat": ("cat.png", png((200, 100, 0)))})
    async with srv.session.post(srv.u("/generate/sync"), data=body) as r:
        assert r.status == 200, await r.text()
        assert await _first_pixel(srv, await r.json()) == (55, 155, 255)
    # A generic field name: the file name is the input name.
    request = {"input": {"modifier": "ImageEffects", "modifications": {"input_image": "dog.png"}}}
    body = form(request, {"file": ("dog.png", png((0, 0, 0)))})
    async with srv.session.post(srv.u("/generate/sync"), data=body) as r:
        assert r.status == 200, await r.text()
        assert await _first_pixel(srv, await r.json()) == (255, 255, 255)
    # /workflows/{name}: text parts are parameters; a file part sets the parameter it is named
    # after.
    data = aiohttp.FormData()
    data.add_field("invert", "false")
    data.add_field("input_image", png((1, 2, 3)), filename="x.png")
    async with srv.session.post(srv.u("/workflows/ImageEffects/sync"), data=data) as r:
        assert r.status == 200, await r.text()
        assert await _first_pixel(srv, await r.json()) == (1, 2, 3)
    # A wrong text parameter is named like in JSON.
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("blur_radius", "lots")
    async with srv.session.post(srv.u("/workflows/ImageEffects"), data=data) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fields"][0]["path"] == "$.blur_radius"


async def test_an_oversized_file_is_413_and_nothing_is_kept(make_server: MakeServer) -> None:
    srv = await make_server(max_body_bytes=64 * 1024)
    await wait_healthy(srv)
    request = {"input": {"modifier": "ImageEffects", "modifications": {"input_image": "big"}}}
    big = png((1, 1, 1)) + b"\0" * (100 * 1024)  # a PNG header, then too many bytes
    # A declared Content-Length over the limit is refused before a byte is read.
    async with srv.session.post(
        srv.u("/generate"), data=form(request, {"big": ("big.png", big)})
    ) as r:
        assert r.status == 413
        assert "max_body_bytes" in (await r.json())["error"]["message"]
    # Chunked (no length): the file is streamed and cut off at the limit.
    async with srv.session.post(
        srv.u("/generate"), data=form(request, {"big": ("big.png", big)}), chunked=True
    ) as r:
        assert r.status == 413
        err = (await r.json())["error"]
    assert err["fields"][0]["path"] == "$.big" and "max_body_bytes" in err["message"]
    assert await _no_jobs(srv)
    assert _partials(srv) == []
    stored = [p for p in srv.services.downloader.cache_dir.glob("up_*")]
    assert stored == []


async def test_file_types_are_checked_by_their_bytes(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    request = {"input": {"modifier": "ImageEffects", "modifications": {"input_image": "evil"}}}
    zipped = b"PK\x03\x04" + b"\x14\x00" * 200  # named .png, but a zip archive
    async with srv.session.post(
        srv.u("/generate"), data=form(request, {"evil": ("evil.png", zipped)})
    ) as r:
        assert r.status == 415
        err = (await r.json())["error"]
    assert err["fields"][0]["path"] == "$.evil" and "application/zip" in err["message"]
    assert await _no_jobs(srv)


async def test_bad_multipart_requests_name_the_field(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    async with srv.session.post(
        srv.u("/generate"), data=form(None, {"cat": ("cat.png", png((1, 1, 1)))})
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fields"][0]["path"] == "$.request"
    body = aiohttp.FormData(default_to_multipart=True)
    body.add_field("request", "{not json")
    async with srv.session.post(srv.u("/generate"), data=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fields"][0]["path"] == "$.request"
    # The uploaded name may not clash with an images entry of the JSON part.
    request = {
        "input": {
            "modifier": "ImageEffects",
            "modifications": {"input_image": "cat"},
            "images": [{"name": "cat", "image": "aGVsbG8="}],
        }
    }
    async with srv.session.post(
        srv.u("/generate"), data=form(request, {"cat": ("cat.png", png((1, 1, 1)))})
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["fields"][0]["path"] == "$.cat"
    # A reference that was never uploaded fails the job with a clear input error.
    request = {
        "input": {
            "modifier": "ImageEffects",
            "modifications": {"input_image": "x"},
            "images": [{"name": "x", "image": "upload:" + "0" * 32 + "_" + "0" * 64 + ".png"}],
        }
    }
    async with srv.session.post(srv.u("/generate/sync"), json=request) as r:
        res = await r.json()
    assert res["status"] == "failed" and "upload reference" in res["error"]["message"]
    assert await _no_jobs(srv) is False


MALFORMED = [
    ("multipart/form-data", b"garbage"),
    ("multipart/form-data; boundary=xx", b"garbage"),
    (
        "multipart/form-data; boundary=xx",
        b'--xx\r\nContent-Disposition: form-data; name="request"\r\n\r\n{}\r\n',
    ),
    ("multipart/form-data; boundary=xx", b"--xx\r\n\r\n\r\n--xx--\r\n"),
    (
        "multipart/form-data; boundary=xx",
        (
            b"--xx\r\nContent-Type: multipart/mixed; boundary=yy\r\n\r\n"
            b"--yy\r\n\r\nx\r\n--yy--\r\n--xx--\r\n"
        ),
    ),
    (
        "multipart/form-data; boundary=xx",
        (
            b'--xx\r\nContent-Disposition: form-data; name="request"\r\n'
            b"Content-Encoding: gzip\r\n\r\nnotgzip\r\n--xx--\r\n"
        ),
    ),
]


async def test_malformed_multipart_bodies_are_4xx_never_5xx(make_server: MakeServer) -> None:
    srv = await make_server()
    for path in ("/generate", "/generate/sync", "/workflows/ImageEffects"):
        for ctype, raw in MALFORMED:
            async with srv.session.post(
                srv.u(path), data=raw, headers={"Content-Type": ctype}
            ) as r:
                assert 400 <= r.status < 500, (path, raw, await r.text())
                assert (await r.json())["error"]["message"]
    assert await _no_jobs(srv)
