"""Large base64 inputs are stored as files at admission (issue 19): the job's row holds an
``upload:`` reference instead of megabytes of text that every transition would rewrite and every
read decode; the decoding follows the preprocess stage's rules exactly, in slices, and what it
refuses is a 400 naming the image before any job exists."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from support.servers import MakeServer, Server, wait_healthy

from comfyq.errors import InputError
from comfyq.inputs import uploads
from comfyq.inputs.filetypes import DEFAULT_ALLOWED_TYPES
from comfyq.inputs.storage import decode_inline

ALLOWED = [*DEFAULT_ALLOWED_TYPES, "application/octet-stream"]


def noise_png(side: int = 200) -> bytes:
    """A PNG of random pixels: it compresses badly, so its base64 is over SPOOL_ABOVE."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def _outcome(fn: Any) -> tuple[str, bytes | str]:
    try:
        return "ok", fn()
    except InputError as exc:
        return "error", exc.message


def _variants() -> list[str]:
    raw = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\r\n"
    return [
        b64,
        "data:image/png;base64," + b64,
        wrapped,
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        b64.rstrip("="),
        b64[:-1],  # a group short: padded, as the stage does
        b64[:-5],
        b64 + "===",  # too much padding
        b64[:1000] + "=" + b64[1000:],  # padding inside
        b64[:2000] + "!" + b64[2001:],  # not the alphabet
        b64[:2000] + "é" + b64[2001:],  # not ASCII
        "A",
        "",
        base64.b64encode(os.urandom(1)).decode(),
        base64.b64encode(os.urandom(2)).decode(),
    ]


def _decode(data: str) -> bytes:
    raw = decode_inline(data, 10**9)
    if not raw:
        raise InputError("inline data is empty")  # as inline_candidate
    return raw


def _spool(data: str, folder: Path, step: int) -> bytes:
    got = uploads.spool_inline(data, folder, max_bytes=10**9, allowed=ALLOWED, step=step)
    assert got is not None
    assert uploads.resolve(got.ref, folder).path == got.asset.path
    return got.asset.path.read_bytes()


@pytest.mark.parametrize("step", [4, 7, 64, 1000, uploads.SPOOL_STEP])
def test_spooling_decodes_exactly_as_the_preprocess_stage(tmp_path: Path, step: int) -> None:
    for data in _variants():
        want = _outcome(lambda d=data: _decode(d))
        got = _outcome(lambda d=data: _spool(d, tmp_path, step))
        assert got == want, (step, data[:40], len(data))
    assert list((tmp_path / ".partial").iterdir()) == []  # failures leave nothing behind


def test_spooling_keeps_the_size_and_type_rules_and_leaves_other_data_inline(
    tmp_path: Path,
) -> None:
    png = noise_png(40)
    b64 = base64.b64encode(png).decode()
    with pytest.raises(InputError, match="over the 100 byte limit"):
        uploads.spool_inline(b64, tmp_path, max_bytes=100, allowed=ALLOWED)
    zipped = base64.b64encode(b"PK\x03\x04" + b"\x14\x00" * 500).decode()
    with pytest.raises(InputError, match="not an accepted input type"):
        uploads.spool_inline(zipped, tmp_path, max_bytes=10**6, allowed=DEFAULT_ALLOWED_TYPES)
    # A percent-encoded data: URI is not base64: it stays in the job as it is.
    assert uploads.spool_inline("data:text/plain,hello", tmp_path, max_bytes=99, allowed=[]) is None
    got = uploads.spool_inline(b64, tmp_path, max_bytes=10**6, allowed=DEFAULT_ALLOWED_TYPES)
    assert got is not None and got.asset.mime == "image/png" and got.fresh
    again = uploads.spool_inline(b64, tmp_path, max_bytes=10**6, allowed=DEFAULT_ALLOWED_TYPES)
    assert again is not None and again.ref == got.ref and not again.fresh
    assert list((tmp_path / ".partial").iterdir()) == []


async def _first_pixel(srv: Server, res: dict[str, Any]) -> tuple[int, ...]:
    async with srv.session.get(srv.u(res["output"][0]["url"])) as r:
        assert r.status == 200
        img = Image.open(io.BytesIO(await r.read())).convert("RGB")
    return tuple(img.getpixel((0, 0)))  # type: ignore[arg-type]


async def test_a_large_base64_input_is_a_file_and_the_job_a_reference(
    make_server: MakeServer,
) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    png = noise_png()
    b64 = base64.b64encode(png).decode()
    assert len(b64) > uploads.SPOOL_ABOVE
    pixel = Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))
    request = {
        "input": {
            "request_id": "spooled-1",
            "modifier": "ImageEffects",
            "modifications": {"input_image": "cat"},
            "images": [{"name": "cat", "image": "data:image/png;base64," + b64}],
        }
    }
    async with srv.session.post(srv.u("/generate/sync"), json=request) as r:
        assert r.status == 200, await r.text()
        res = await r.json()
    assert await _first_pixel(srv, res) == tuple(255 - c for c in pixel)  # type: ignore[union-attr]
    job = await srv.services.store.get("spooled-1")
    assert job is not None
    ref = job.payload["input"]["images"][0]["image"]
    assert uploads.is_ref(ref) and b64[:100] not in str(job.payload)
    stored = uploads.resolve(ref, srv.services.downloader.cache_dir)
    assert stored.path.read_bytes() == png
    # The same request again is the same job (the reference is the same for the same bytes).
    async with srv.session.post(srv.u("/generate"), json=request) as r:
        assert r.status == 200, await r.text()
    # Small inputs stay inline, as before.
    small = {
        "input": {
            "request_id": "inline-1",
            "modifier": "ImageEffects",
            "modifications": {"input_image": "cat"},
            "images": [{"name": "cat", "image": base64.b64encode(noise_png(8)).decode()}],
        }
    }
    async with srv.session.post(srv.u("/generate"), json=small) as r:
        assert r.status == 202, await r.text()
    job = await srv.services.store.get("inline-1")
    assert job is not None and not uploads.is_ref(job.payload["input"]["images"][0]["image"])


async def test_a_large_input_that_would_fail_is_a_400_at_admission(
    make_server: MakeServer,
) -> None:
    srv = await make_server()
    await wait_healthy(srv)
    b64 = base64.b64encode(noise_png()).decode()
    zipped = base64.b64encode(b"PK\x03\x04" + os.urandom(100_000)).decode()
    for bad, words in (
        (b64[:50_000] + "*" + b64[50_001:], "neither valid base64"),
        (zipped, "not an accepted input type"),
    ):
        request = {
            "input": {
                "modifier": "ImageEffects",
                "modifications": {"input_image": "cat"},
                "images": [
                    {"name": "ok", "image": b64},
                    {"name": "cat", "image": bad},
                ],
            }
        }
        async with srv.session.post(srv.u("/generate"), json=request) as r:
            assert r.status == 400
            err = (await r.json())["error"]
        assert err["fields"] == [
            {"path": "$.input.images[1].image", "message": err["fields"][0]["message"]}
        ]
        assert words in err["message"]
    async with srv.session.get(srv.u("/jobs")) as r:
        assert (await r.json())["jobs"] == []
    cache = srv.services.downloader.cache_dir
    assert list(cache.glob("up_*")) == []  # the good image stored first was removed again
    assert list((cache / ".partial").iterdir()) == []
