"""Output conversion (issue 15, item 3): ``input.convert`` (and the server default) converts image
outputs with Pillow before upload, base64 and /outputs; the Result records the original's and the
converted file's size and type; a failed conversion keeps the original with a warning; thumbnails
of outputs come the same way."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image
from support.servers import MakeServer, Server, wait_healthy

from comfyq.outputs import convert


def effects(**convert_: Any) -> dict[str, Any]:
    inp: dict[str, Any] = {
        "modifier": "ImageEffects",
        "modifications": {"width": 64, "height": 48, "color": "#3366cc", "invert": False},
    }
    if convert_:
        inp["convert"] = convert_
    return {"input": inp}


async def _sync(srv: Server, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    async with srv.session.post(srv.u("/generate/sync"), json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        res: dict[str, Any] = await r.json()
        return res


async def _download(srv: Server, url: str) -> tuple[str, bytes]:
    async with srv.session.get(srv.u(url)) as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.read()


async def test_convert_to_jpeg_scaled_down_records_both_files(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    res = await _sync(
        srv,
        effects(format="jpeg", quality=70, max_side=32),
        **{"X-Return-Outputs-As-Base64": "1"},
    )
    out = res["output"][0]
    assert out["filename"].endswith(".jpg") and out["mimetype"] == "image/jpeg"
    assert out["original"]["filename"].endswith(".png")
    assert out["original"]["mimetype"] == "image/png" and out["original"]["size"] > 0
    ctype, data = await _download(srv, out["url"])
    assert ctype == "image/jpeg" and len(data) == out["size"]
    assert base64.b64decode(out["data"]) == data  # base64 carries the converted file too
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.size == (32, 24)  # longer side 32, aspect kept
    r, g, b = img.convert("RGB").getpixel((16, 12))  # type: ignore[misc]
    assert abs(r - 0x33) < 8 and abs(g - 0x66) < 8 and abs(b - 0xCC) < 8


async def test_server_default_and_opting_out(make_server: MakeServer) -> None:
    srv = await make_server(output_convert_format="webp", output_convert_quality=80)
    await wait_healthy(srv)
    res = await _sync(srv, effects())
    out = res["output"][0]
    assert out["mimetype"] == "image/webp" and out["filename"].endswith(".webp")
    _, data = await _download(srv, out["url"])
    assert Image.open(io.BytesIO(data)).format == "WEBP"
    kept = await _sync(srv, effects(format="original"))
    assert kept["output"][0]["mimetype"] == "image/png" and "original" not in kept["output"][0]


async def test_a_failed_conversion_keeps_the_original_with_a_warning(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    monkeypatch.setattr(convert, "MAX_PIXELS", 100)  # every output is now "too large" to convert
    res = await _sync(srv, effects(format="webp"))
    out = res["output"][0]
    assert out["mimetype"] == "image/png" and "original" not in out
    assert res["warnings"][0]["type"] == "conversion_failed"
    assert res["warnings"][0]["filename"] == out["filename"]
    assert res["message"].startswith("Processing complete with 1 warning")
    ctype, data = await _download(srv, out["url"])
    assert ctype == "image/png" and data.startswith(b"\x89PNG")


async def test_thumbnails_of_outputs(make_server: MakeServer) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    res = await _sync(srv, effects())
    url = res["output"][0]["url"]
    ctype, data = await _download(srv, url + "?thumb=16")
    assert ctype == "image/webp"
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "WEBP" and max(thumb.size) == 16
    again = await _download(srv, url + "?thumb=16")
    assert again[1] == data  # made once, served again
    for bad in ("0", "big", "99999"):
        async with srv.session.get(srv.u(url + f"?thumb={bad}")) as r:
            assert r.status == 400
            assert (await r.json())["error"]["fields"][0]["path"] == "$.query.thumb"


async def test_convert_is_validated_at_admission(make_server: MakeServer) -> None:
    srv = await make_server()
    for bad, path in (
        ({"format": "gif"}, "$.input.convert.format"),
        ({"format": "jpeg", "quality": 0}, "$.input.convert.quality"),
        ({"format": "webp", "max_side": -1}, "$.input.convert.max_side"),
        ({"quality": 50}, "$.input.convert.format"),
    ):
        async with srv.session.post(srv.u("/generate"), json=effects(**bad)) as r:
            assert r.status == 400
            assert (await r.json())["error"]["fields"][0]["path"] == path
