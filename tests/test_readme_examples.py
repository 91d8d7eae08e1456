"""The README's examples, run against a real comfyq and its simulator, so the docs cannot rot.

Code blocks are found by the words after the language on their opening fence (invisible once
rendered): ```` ```sh example ````, ```` ```python example ```` and ```` ```js example ```` run in
document order against one server; the block right after an example, tagged ``response`` (what
curl prints: ``http`` with status and headers, ``json``, or an SSE ``text`` stream) or ``output``
(what the code prints; ``…`` stands for anything), is what it must produce. A documented response
is a shape: every key it shows must be there with a value of the same JSON type, and the values of
the keys in ``EXACT`` must be equal. ``example wait`` re-runs a read until it matches (the job takes
a moment). ```` ```sh sqlite ```` blocks are the operator recipes: every query must run against the
database the examples filled. curl, sqlite3 and node parts are skipped when the tool is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from support.servers import ThreadServer
from support.sim import decode_png

from comfyq.api.context import ApiOptions
from comfyq.sim.generation import VERSIONS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_HOST = "localhost:8000"
DOC_DB = "data/comfyq.db"
# String values that must match exactly (32-hex job ids inside them match any id).
EXACT = {"status", "event", "type", "current_queue", "output_type", "mimetype", "path"}
NULLABLE = {"estimated_wait_time"}  # documented as a number, null until some job has completed
ANY = "…"


@dataclass
class Block:
    lang: str
    tags: list[str]
    code: str
    where: str


def blocks() -> list[Block]:
    """Every fenced block of the README and docs/, in order."""
    out: list[Block] = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(
            r"^```(\S*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL
        ):
            line = text.count("\n", 0, m.start()) + 1
            out.append(Block(m.group(1), m.group(2).split(), m.group(3), f"{doc.name}:{line}"))
    return out


def examples(lang: str) -> list[tuple[Block, Block | None]]:
    """The ``lang example`` blocks, each with the response or output block that follows it."""
    found = blocks()
    out = []
    for i, b in enumerate(found):
        if b.lang == lang and "example" in b.tags:
            nxt = found[i + 1] if i + 1 < len(found) else None
            out.append((b, nxt if nxt and ({"response", "output"} & set(nxt.tags)) else None))
    return out


# --- comparing a documented response with the real one --------------------------------------


def same_text(doc: str, real: str) -> bool:
    pattern = re.escape(doc).replace(re.escape(ANY), ".*")
    pattern = re.sub(r"[0-9a-f]{32}", "[0-9a-f]{32}", pattern)
    return re.fullmatch(pattern, real, re.DOTALL) is not None


def shape(doc: Any, real: Any, path: str = "$", key: str = "") -> list[str]:
    """Where ``real`` does not have the shape (and exact values) ``doc`` shows."""
    if doc is None:
        return []
    if isinstance(doc, dict):
        if not isinstance(real, dict):
            return [f"{path}: expected an object, got {real!r:.80}"]
        return [
            e
            for k, v in doc.items()
            for e in (
                shape(v, real[k], f"{path}.{k}", k) if k in real else [f"{path}.{k}: missing"]
            )
        ]
    if isinstance(doc, list):
        if not isinstance(real, list):
            return [f"{path}: expected a list, got {real!r:.80}"]
        if doc and not real:
            return [f"{path}: expected items, got none"]
        return shape(doc[0], real[0], f"{path}[0]") if doc else []
    if isinstance(doc, bool) or isinstance(real, bool):
        return [] if type(doc) is type(real) else [f"{path}: expected {doc!r}, got {real!r}"]
    if isinstance(doc, int | float):
        ok = isinstance(real, int | float) or (real is None and key in NULLABLE)
        return [] if ok else [f"{path}: expected a number, got {real!r:.80}"]
    if not isinstance(real, str):
        return [f"{path}: expected a string, got {real!r:.80}"]
    if key in EXACT and not same_text(doc, real):
        return [f"{path}: expected {doc!r}, got {real!r}"]
    return []


def sse_events(text: str) -> list[dict[str, Any]]:
    out = []
    for chunk in re.split(r"\r?\n\r?\n", text):
        data = [ln[5:].strip() for ln in chunk.splitlines() if ln.startswith("data:")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


def http_parts(text: str) -> tuple[int, dict[str, str], str]:
    head, _, body = re.sub(r"\r\n", "\n", text).partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def mismatch(doc: Block, real: str) -> list[str]:
    """How the output of an example differs from the documented response or output."""
    if "output" in doc.tags:
        return lines_mismatch(doc.code, real)
    if doc.lang == "http":
        status, headers, body = http_parts(doc.code)
        r_status, r_headers, r_body = http_parts(real)
        errs = [] if status == r_status else [f"HTTP status {r_status}, documented {status}"]
        for name, value in headers.items():
            got = r_headers.get(name)
            if got is None or (name == "location" and not same_text(value, got)):
                errs.append(f"header {name}: documented {value!r}, got {got!r}")
        return errs + (shape(json.loads(body), json.loads(r_body)) if body.strip() else [])
    if "data:" in doc.code:
        want, events = sse_events(doc.code), sse_events(real)
        if not events:
            return [f"no events in {real[:300]!r}"]
        errs = shape(want[-1], events[-1], "last event")
        for i, ev in enumerate(want[:-1]):
            if all(shape(ev, e) for e in events):
                errs.append(f"documented event {i} matches no event: {shape(ev, events[0])}")
        return errs
    return shape(json.loads(doc.code), json.loads(real))


def lines_mismatch(doc: str, printed: str) -> list[str]:
    """Each documented line (… = anything) must match a printed line, in order."""
    got = [ln.rstrip() for ln in printed.splitlines()]
    pos = 0
    for want in (ln.strip() for ln in doc.splitlines()):
        if not want or want == ANY:
            continue
        while pos < len(got) and not same_text(want, got[pos]):
            pos += 1
        if pos == len(got):
            return [f"no printed line matches {want!r} (in order); printed:\n{printed}"]
        pos += 1
    return []


# --- the server the examples talk to ---------------------------------------------------------


@pytest.fixture(scope="module", params=VERSIONS)
def srv(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ThreadServer]:
    # Settings as `comfyq serve --simulate` has them where the examples depend on them; the
    # examples run against each ComfyUI generation (--comfyui-version 0.3.64 and the newest).
    server = ThreadServer(
        tmp_path_factory.mktemp("readme"),
        ApiOptions(heartbeat=0.5),
        comfyui_version=str(request.param),
        generation_workers=2,
        preprocess_workers=3,
        postprocess_workers=3,
    ).start()
    server.sim.node_duration, server.sim.progress_steps = 0.1, 5
    try:
        yield server
    finally:
        server.stop()


def here(text: str, srv: ThreadServer) -> str:
    """The text with the documented address and database file replaced by the test server's."""
    return text.replace(DOC_HOST, srv.url.removeprefix("http://")).replace(
        DOC_DB, str(srv.services.db_path)
    )


def check(example: Block, doc: Block | None, run: Any, srv: ThreadServer) -> None:
    out = run()
    if doc is None:
        return
    expected = Block(doc.lang, doc.tags, here(doc.code, srv), doc.where)
    errs = mismatch(expected, out)
    end = time.monotonic() + 20
    while errs and "wait" in example.tags and time.monotonic() < end:
        time.sleep(0.2)
        out = run()
        errs = mismatch(expected, out)
    assert not errs, (
        f"{example.where}: the output does not match {doc.where}:\n"
        + "\n".join(errs)
        + f"\n--- output ---\n{out[:3000]}"
    )


def test_the_examples_are_found() -> None:
    counts = {lang: len(examples(lang)) for lang in ("sh", "python", "js")}
    assert counts["sh"] >= 10 and counts["python"] >= 4 and counts["js"] >= 2, counts
    assert sum(len(sqlite_commands(b)) for b in blocks() if b.tags == ["sqlite"]) >= 15
    for b in blocks():
        if {"response", "output"} & set(b.tags) and "data:" not in b.code and b.lang == "json":
            json.loads(b.code)  # a documented JSON response must be JSON


def test_curl_examples(srv: ThreadServer, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    for example, doc in examples("sh"):

        def run(code: str = here(example.code, srv), where: str = example.where) -> str:
            p = subprocess.run(
                ["bash", "-c", code],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert p.returncode == 0, f"{where} exited {p.returncode}: {p.stderr}{p.stdout}"
            return p.stdout

        check(example, doc, run, srv)


def test_python_examples(
    srv: ThreadServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # they may save files
    for example, doc in examples("python"):

        def run(code: str = here(example.code, srv), where: str = example.where) -> str:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, where, "exec"), {"__name__": "__main__"})  # noqa: S102 - the README's code
            return out.getvalue()

        check(example, doc, run, srv)


def node_command() -> list[str] | None:
    """node with EventSource and WebSocket as browser globals, or None."""
    if shutil.which("node") is None:
        return None
    probe = (
        "process.exit(typeof EventSource === 'function' && typeof WebSocket === 'function' ? 0 : 1)"
    )
    for flags in (
        ["--experimental-eventsource", "--experimental-websocket"],
        ["--experimental-eventsource"],
        [],
    ):
        if (
            subprocess.run(
                ["node", *flags, "-e", probe], capture_output=True, timeout=30, check=False
            ).returncode
            == 0
        ):
            return ["node", "--no-warnings", *flags]
    return None


def test_browser_examples_in_node(srv: ThreadServer, tmp_path: Path) -> None:
    node = node_command()
    if node is None:
        pytest.skip("no node with EventSource and WebSocket")
    for i, (example, doc) in enumerate(examples("js")):
        script = (
            tmp_path / f"example{i}.mjs"
        )  # .mjs: top-level await, as in a <script type="module">
        script.write_text(here(example.code, srv))

        def run(path: Path = script, where: str = example.where) -> str:
            p = subprocess.run(
                [*node, str(path)], capture_output=True, text=True, timeout=60, check=False
            )
            assert p.returncode == 0, f"{where} exited {p.returncode}: {p.stderr}"
            return p.stdout

        check(example, doc, run, srv)


# --- the operator's sqlite3 recipes ----------------------------------------------------------


def sqlite_commands(block: Block) -> list[list[str]]:
    return [shlex.split(ln) for ln in block.code.splitlines() if ln.startswith("sqlite3 ")]


def test_sqlite_recipes_run_on_a_real_database(srv: ThreadServer, tmp_path: Path) -> None:
    first = examples("sh")[0][0]
    body = next(a for a in shlex.split(first.code) if a.startswith('{"input"'))
    # The recipes look at the README's first job: make sure it exists (the curl test may skip).
    requests.post(
        srv.url + "/generate", data=body, headers={"content-type": "application/json"}, timeout=10
    )
    end = time.monotonic() + 20
    while (
        requests.get(srv.url + "/result/my-first-job", timeout=10).json()["status"] != "completed"
    ):
        assert time.monotonic() < end, "my-first-job did not complete"
        time.sleep(0.1)
    conn = sqlite3.connect(f"file:{srv.services.db_path}?mode=ro", uri=True)
    binary = shutil.which("sqlite3")
    ran = 0
    for block in (b for b in blocks() if b.tags == ["sqlite"]):
        for cmd in sqlite_commands(block):
            assert DOC_DB in cmd, f"{block.where}: {cmd} does not open {DOC_DB}"
            cmd = [here(a, srv) for a in cmd]
            sql = cmd[-1]
            if not sql.startswith("."):
                rows = conn.execute(sql).fetchall()
                if "job_history" in sql or "from outputs" in sql:
                    assert rows, f"{block.where}: {sql} found nothing for my-first-job"
            if binary is not None:
                p = subprocess.run(
                    cmd, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
                )
                assert p.returncode == 0 and not p.stderr, f"{block.where}: {cmd}: {p.stderr}"
            ran += 1
    conn.close()
    assert ran >= 15


# --- a claim of docs/migrating.md --------------------------------------------------------------


def test_each_job_gets_its_own_image(srv: ThreadServer) -> None:
    """20 jobs at once, one filename_prefix, different colours: every job gets its own pixels."""
    from concurrent.futures import ThreadPoolExecutor

    def run(color: int) -> bytes:
        wf: dict[str, Any] = {
            "1": {
                "class_type": "EmptyImage",
                "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
            },
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": "same"},
            },
        }
        r = requests.post(
            srv.url + "/generate/sync", json={"input": {"workflow_json": wf}}, timeout=60
        )
        assert r.status_code == 200, r.text
        return requests.get(srv.url + r.json()["output"][0]["url"], timeout=10).content

    colors = [0x010203 * (i + 1) + 7 for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        images = list(pool.map(run, colors))
    for color, png in zip(colors, images, strict=True):
        _, _, rows = decode_png(png)
        assert rows[1:4] == color.to_bytes(3, "big"), (
            f"job with colour {color:06x} got another image"
        )
