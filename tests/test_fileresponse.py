"""Output downloads from memory (comfyq.api.fileresponse) answer as aiohttp's FileResponse does.

One real aiohttp server on loopback serves the same files twice: by ``web.FileResponse`` and by
``file_response`` (from this process's recent outputs, or read on the loop), and every request
of a matrix of conditional, range and method headers must get the same status, headers (but
Date) and body from both. Then, through comfyq: a fresh output is served from memory, and a
file changed on disk is never answered from the memory of the old one; text outputs and base64
copies take the same memory.
"""

from __future__ import annotations

import base64
import email.utils
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.servers import Server, wait_healthy
from support.workflows import workflow

from comfyq.api.fileresponse import (
    READ_ON_LOOP_MAX,
    MemoryFileResponse,
    PlainFileResponse,
    file_response,
)
from comfyq.comfy.backends import BackendPool
from comfyq.outputs.inline import encode_file, inline_file
from comfyq.outputs.recent import RECENT, RecentFiles
from comfyq.stages.postprocess import Postprocess
from comfyq.store.model import Job

HEADERS = {
    "Content-Type": "image/png",
    "Content-Disposition": 'inline; filename="x.png"',
    "X-Content-Type-Options": "nosniff",
}

FILES = {
    "tiny.png": bytes(range(256)) * 3 + b"end",
    "empty.png": b"",
    "one.png": b"x",
    "mid.png": os.urandom(READ_ON_LOOP_MAX + 1000),  # over the loop-read size: memory or sendfile
}


class Both:
    """A server with /fr/{name} (web.FileResponse) and /{mode}/{name}: ``mem`` answers from a
    RecentFiles holding the file, ``read`` with an empty one (read on the loop when small)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kinds: list[str] = []
        self.session: aiohttp.ClientSession
        self.base = ""

    async def fr(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.root / request.match_info["name"], headers=HEADERS)

    async def ours(self, request: web.Request) -> web.StreamResponse:
        path = self.root / request.match_info["name"]
        st = os.lstat(path)
        recent = RecentFiles()
        if request.match_info["mode"] == "mem":
            recent.put(str(path), st, path.read_bytes())
        resp = file_response(request, path, st, HEADERS, recent=recent)
        self.kinds.append(type(resp).__name__)
        return resp

    async def get(self, path: str, method: str, headers: dict[str, str]) -> tuple[Any, ...]:
        async with self.session.request(
            method, self.base + path, headers=headers, auto_decompress=False
        ) as r:
            body = await r.read()
            got = {k: v for k, v in r.headers.items() if k not in ("Date",)}
            return r.status, sorted(got.items()), body


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Both]:
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    b = Both(tmp_path)
    app = web.Application()
    app.router.add_route("*", "/fr/{name}", b.fr)
    app.router.add_route("*", "/{mode}/{name}", b.ours)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    b.base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        b.session = session
        yield b
    await runner.cleanup()


def _http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def _requests(size: int, etag: str, mtime: float) -> list[tuple[str, dict[str, str]]]:
    later, earlier = _http_date(mtime + 3600), _http_date(mtime - 3600)
    exact = _http_date(mtime)
    reqs: list[tuple[str, dict[str, str]]] = [("GET", {}), ("HEAD", {})]
    for rng in (
        "bytes=0-9",
        "bytes=10-",
        "bytes=-5",
        "bytes=-100000",
        "bytes=0-0",
        f"bytes={size - 1}-",
        f"bytes={size}-",
        f"bytes={size + 5}-",
        "bytes=5-2",
        "bytes=0-1,3-4",  # FileResponse serves no multi-range: 416
        "bytes=abc",
        "items=0-1",
        "bytes=0-100000000",
    ):
        reqs += [("GET", {"Range": rng}), ("HEAD", {"Range": rng})]
    reqs += [
        ("GET", {"If-None-Match": etag}),
        ("HEAD", {"If-None-Match": etag}),
        ("GET", {"If-None-Match": "W/" + etag}),
        ("GET", {"If-None-Match": '"other", ' + etag}),
        ("GET", {"If-None-Match": "*"}),
        ("GET", {"If-None-Match": '"other"'}),
        ("GET", {"If-Match": etag}),
        ("GET", {"If-Match": "W/" + etag}),
        ("GET", {"If-Match": '"other"'}),
        ("GET", {"If-Match": "*"}),
        ("GET", {"If-Modified-Since": exact}),
        ("GET", {"If-Modified-Since": later}),
        ("GET", {"If-Modified-Since": earlier}),
        ("GET", {"If-Modified-Since": "not a date"}),
        ("GET", {"If-Modified-Since": later, "If-None-Match": '"other"'}),
        ("GET", {"If-Unmodified-Since": earlier}),
        ("GET", {"If-Unmodified-Since": later}),
        ("GET", {"If-Unmodified-Since": earlier, "If-Match": etag}),
        ("GET", {"Range": "bytes=0-3", "If-Range": later}),
        ("GET", {"Range": "bytes=0-3", "If-Range": earlier}),
        ("GET", {"Range": "bytes=0-3", "If-Range": etag}),
        ("GET", {"Range": "bytes=0-3", "If-None-Match": etag}),
        ("GET", {"Accept-Encoding": "gzip, br"}),
        ("POST", {}),
    ]
    return reqs


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("mode", ["mem", "read"])
async def test_every_answer_is_file_responses(both: Both, name: str, mode: str) -> None:
    st = os.stat(both.root / name)
    status, headers, body = await both.get(f"/fr/{name}", "GET", {})
    assert status == 200 and body == FILES[name]
    etag = dict(headers)["Etag"]
    assert etag == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    both.kinds.clear()
    for method, hdrs in _requests(len(FILES[name]), etag, st.st_mtime):
        want = await both.get(f"/fr/{name}", method, hdrs)
        got = await both.get(f"/{mode}/{name}", method, hdrs)
        assert got == want, (method, hdrs)
    # The memory paths were the ones taken (a file over the loop-read size and not held in
    # memory is FileResponse's, minus its .gz/.br sibling search).
    small = mode == "mem" or len(FILES[name]) <= READ_ON_LOOP_MAX
    expected = MemoryFileResponse.__name__ if small else PlainFileResponse.__name__
    assert set(both.kinds) == {expected}


async def test_a_compressed_sibling_is_never_served_for_the_file(both: Both) -> None:
    # FileResponse would answer tiny.png with the bytes of tiny.png.gz, Content-Encoding gzip:
    # in an output folder that is another output, not an encoding of this one.
    (both.root / "tiny.png.gz").write_bytes(b"\x1f\x8b not this")
    (both.root / "mid.png.gz").write_bytes(b"\x1f\x8b not this")
    for path in ("/read/tiny.png", "/mem/tiny.png", "/read/mid.png"):
        status, headers, body = await both.get(path, "GET", {"Accept-Encoding": "gzip"})
        assert status == 200 and body == FILES[path.rsplit("/", 1)[1]], path
        assert "Content-Encoding" not in dict(headers)
    status, headers, _ = await both.get("/fr/tiny.png", "GET", {"Accept-Encoding": "gzip"})
    assert dict(headers).get("Content-Encoding") == "gzip"  # what it would have done


def test_recent_files_are_bounded_and_checked_against_the_file(tmp_path: Path) -> None:
    recent = RecentFiles(max_file=10, max_bytes=25, max_files=3)
    paths = [tmp_path / f"{i}.bin" for i in range(5)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 8)
        recent.put(str(p), os.stat(p), p.read_bytes())
    # 8 bytes each, at most 25 bytes: the three newest only.
    assert len(recent) == 3 and recent.size == 24
    assert recent.get(str(paths[0]), os.stat(paths[0])) is None
    assert recent.get(str(paths[4]), os.stat(paths[4])) == bytes([4]) * 8
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * 11)
    recent.put(str(big), os.stat(big), big.read_bytes())
    assert recent.get(str(big), os.stat(big)) is None  # over max_file: never kept
    # The same name, other content (a new inode by rename): the old bytes are not answered.
    p = paths[4]
    p.with_name("new").write_bytes(b"z" * 8)
    os.replace(p.with_name("new"), p)
    assert recent.get(str(p), os.stat(p)) is None and len(recent) == 2
    # Changed in place, size kept: the change time moves, the entry is not used.
    q = paths[3]
    before = os.stat(q)
    time.sleep(0.02)
    q.write_bytes(b"w" * 8)
    assert os.stat(q).st_ctime_ns != before.st_ctime_ns
    assert recent.get(str(q), os.stat(q)) is None
    recent.clear()
    assert len(recent) == 0 and recent.size == 0


async def test_a_fresh_output_is_served_from_memory_until_the_file_changes(
    server: Server,
) -> None:
    await wait_healthy(server)
    async with server.session.post(
        server.u("/generate/sync"), json={"input": {"workflow_json": workflow(4242)}}
    ) as r:
        assert r.status == 200
        out = (await r.json())["output"][0]
    path = Path(out["local_path"])
    st = os.lstat(path)
    # postprocess kept what it wrote, checked against the file as written
    assert RECENT.get(str(path), st) == path.read_bytes()
    async with server.session.get(server.u(out["url"])) as r:
        assert r.status == 200 and r.content_type == "image/png"
        assert await r.read() == path.read_bytes()
        etag = r.headers["ETag"]
        assert etag == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        assert r.headers["Content-Disposition"] == f'inline; filename="{path.name}"'
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Accept-Ranges"] == "bytes" and "Last-Modified" in r.headers
    async with server.session.get(server.u(out["url"]), headers={"If-None-Match": etag}) as r:
        assert r.status == 304 and await r.read() == b""
    # HEAD (curl -I, download managers): the GET's headers, no body.
    async with server.session.head(server.u(out["url"])) as r:
        assert r.status == 200 and r.headers["ETag"] == etag
        assert r.headers["Content-Length"] == str(st.st_size) and await r.read() == b""
    async with server.session.get(server.u(out["url"]), headers={"Range": "bytes=1-3"}) as r:
        assert r.status == 206 and await r.read() == path.read_bytes()[1:4]
        assert r.headers["Content-Range"] == f"bytes 1-3/{st.st_size}"
    # Another file under the same name (as a re-run would write it): its bytes, not the kept ones.
    new = b"\x89PNG\r\n\x1a\n" + b"n" * 100
    path.with_name("swap").write_bytes(new)
    os.replace(path.with_name("swap"), path)
    async with server.session.get(server.u(out["url"]), headers={"If-None-Match": etag}) as r:
        assert r.status == 200 and await r.read() == new
    path.unlink()
    async with server.session.get(server.u(out["url"])) as r:
        assert r.status == 404


async def test_text_outputs_are_written_whole_described_and_kept(tmp_path: Path) -> None:
    texts = ["caption: a red square", "ünïcode ✓"]
    result = {"outputs": {"7": {"text": texts}}}
    job = Job({"id": "txt-1", "result": None, "comfy_backend": None})
    # Text outputs are fetched from no backend: a pool that was never started is enough.
    post = Postprocess(BackendPool(["http://127.0.0.1:9"], slots_per_backend=1), tmp_path)
    rows = await post._collect(job, result)
    assert [r["filename"] for r in rows] == ["node7_text_0.txt", "node7_text_1.txt"]
    for text, row in zip(texts, rows, strict=True):
        path = Path(row["local_path"])
        data = text.encode()
        assert path.read_bytes() == data and row["size"] == len(data)
        assert row["mimetype"] == "text/plain"
        assert RECENT.get(str(path), os.lstat(path)) == data
    assert sorted(p.name for p in (tmp_path / "txt-1").iterdir()) == [
        "node7_text_0.txt",
        "node7_text_1.txt",
    ]  # no .part file left behind


@pytest.mark.parametrize("max_bytes", [10, 1 << 20])
async def test_base64_of_a_recent_output_is_the_files(tmp_path: Path, max_bytes: int) -> None:
    path = tmp_path / "o.png"
    path.write_bytes(FILES["tiny.png"])
    RECENT.put(str(path), os.stat(path), FILES["tiny.png"])
    from_memory = await inline_file(path, max_bytes)
    assert from_memory == encode_file(path, max_bytes)  # what the thread hop answers
    assert (from_memory[0] is None) == (max_bytes == 10)
    # Changed on disk: the file is read again, not the kept bytes.
    path.write_bytes(b"new content")
    assert await inline_file(path, 1 << 20) == encode_file(path, 1 << 20)
    assert base64.b64decode(encode_file(path, 1 << 20)[0] or "") == b"new content"
