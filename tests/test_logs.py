"""Log lines: one per event, JSON when configured, with the job id, without secrets, at the
configured level. The end-to-end tests configure logging the way ``comfyq serve`` does
(``logs.configure(settings)`` + ``logs.attach(services)``) and read the handler's real output."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import serve
from support.s3 import make_bucket
from support.servers import settings_for, start_server
from support.webhooks import Receiver

from comfyq import logs
from comfyq.cli import main
from comfyq.config import load_settings
from comfyq.logs import JsonFormatter, Redactor, TextFormatter, detached, job_context, job_id_var
from comfyq.sim import Simulator
from comfyq.sim.png import encode_png

API_KEY = "logs-api-key-0123456789"
OP_ACCESS, OP_SECRET = "AKIALOGSOPERATOR01", "op-s3-secret-logs-abcdef"
JOB_ACCESS, JOB_SECRET = "AKIALOGSJOBKEY0002", "job-s3-secret-logs-uvwxyz"
DEFAULT_HOOK_SECRET = "default-webhook-secret-logs-17"
JOB_HOOK_SECRET = "job-webhook-secret-logs-42"  # a job's own: never registered with the redactor
URL_TOKEN = "urltoken-logs-9876"
SECRETS = [
    API_KEY,
    OP_ACCESS,
    OP_SECRET,
    JOB_ACCESS,
    JOB_SECRET,
    DEFAULT_HOOK_SECRET,
    JOB_HOOK_SECRET,
    URL_TOKEN,
]
# Servers the test runs beside comfyq (moto's werkzeug, the simulator) log about our jobs too.
FOREIGN = ("werkzeug", "moto", "comfyq.comfy.sim")


def record(msg: str, *args: object, exc: Any = None, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("comfyq.pipeline", logging.WARNING, __file__, 1, msg, args, exc)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def raised() -> Any:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        return sys.exc_info()


# --- formatters and the redactor ---------------------------------------------------------------


def test_json_lines_carry_the_job_id() -> None:
    line = JsonFormatter().format(record("job %s: lease lost", "j1", job_id="j1"))
    data = json.loads(line)
    assert "\n" not in line
    assert (
        data["job_id"] == "j1"
        and data["level"] == "warning"
        and data["msg"] == "job j1: lease lost"
    )
    assert data["ts"].endswith("Z") and data["logger"] == "comfyq.pipeline"


def test_json_keeps_a_traceback_on_the_event_line() -> None:
    line = JsonFormatter().format(record("it failed", exc=raised(), stage="generate"))
    data = json.loads(line)
    assert "\n" not in line
    assert data["exc_type"] == "ValueError" and "Traceback" in data["exc"] and "boom" in data["exc"]
    assert data["stage"] == "generate"


def test_text_lines_name_the_job_once() -> None:
    assert TextFormatter().format(record("job %s: lease lost", "j1", job_id="j1")).count("j1") == 1
    assert TextFormatter().format(record("worker crashed", job_id="j2")).endswith("job=j2")


def test_text_event_is_one_line_and_its_traceback_is_indented() -> None:
    lines = TextFormatter().format(record("bad\nthing", exc=raised(), job_id="j3")).split("\n")
    assert lines[0].endswith("bad\\nthing job=j3")
    assert len(lines) > 3 and all(line.startswith("  ") for line in lines[1:])
    assert "ValueError: boom" in "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "gone", "kept"),
    [
        ("fetch http://u:pw@h.example/x.png failed", "pw", "h.example/x.png"),
        (
            "GET https://h.example/img.png?X-Amz-Signature=abc123 done",
            "abc123",
            "https://h.example/img.png?<redacted>",
        ),
        ("see https://h.example/cb#token=frag99", "frag99", "https://h.example/cb"),
        ("GET /health?access_token=tok777 200", "tok777", "/health?access_token=***"),
        ("header Authorization: Bearer sk-live-123", "sk-live-123", "Bearer ***"),
        ("signing with whsec_c2VjcmV0c2VjcmV0", "c2VjcmV0c2VjcmV0", "whsec_***"),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE1/20260101/us-east-1",
            "AKIAEXAMPLE1",
            "Credential=***",
        ),
        (
            "configured key operator-secret-1 leaked",
            "operator-secret-1",
            "configured key *** leaked",
        ),
    ],
)
def test_redactor(text: str, gone: str, kept: str) -> None:
    out = Redactor(["operator-secret-1"])(text)
    assert gone not in out and kept in out


def test_redactor_finds_a_secret_in_its_json_escaped_form() -> None:
    secret = 'quote"and\\slash'
    line = JsonFormatter(Redactor([secret])).format(record("value %s", secret))
    assert json.loads(line)["msg"] == "value ***"


def test_redactor_leaves_short_values_and_ordinary_text_alone() -> None:
    text = "job abc: completed in 0.5s (1 output), see /result/abc"
    assert Redactor(["abc"])(text) == text


async def test_job_context_is_copied_into_tasks_and_restored() -> None:
    async def seen() -> str | None:
        return job_id_var.get()

    with job_context("j1"):
        inner = asyncio.create_task(seen())
        apart = asyncio.create_task(seen(), context=detached())
        with job_context("j2"):
            assert job_id_var.get() == "j2"
        assert job_id_var.get() == "j1"
    assert job_id_var.get() is None
    assert await inner == "j1" and await apart is None
    assert contextvars.copy_context().get(job_id_var) is None


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {
        name: lg.level
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    hook = sys.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    sys.excepthook = hook
    logging.captureWarnings(False)


@pytest.fixture
async def origin() -> AsyncIterator[str]:
    """Input images that are only served to a URL carrying the right token."""

    async def image(request: web.Request) -> web.Response:
        if request.query.get("token") != URL_TOKEN:
            return web.Response(status=403)
        colour = (200, 10, 10) if request.match_info["name"] == "a" else (10, 10, 200)
        return web.Response(body=encode_png(8, 8, colour), content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}.png", image)
    server = await serve.start(app)
    yield serve.base_url(server)
    await server.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


def parse(buf: io.StringIO) -> list[dict[str, Any]]:
    lines = buf.getvalue().splitlines()
    assert lines, "nothing was logged"
    out = []
    for line in lines:
        data = json.loads(line)  # every line is one JSON object
        assert isinstance(data, dict) and {"ts", "level", "logger", "msg"} <= set(data), line
        data["_raw"] = line
        out.append(data)
    return out


async def wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def job_body(origin: str, receiver: Receiver, name: str, **extra: Any) -> dict[str, Any]:
    wf = {
        "1": {
            "class_type": "LoadImage",
            "inputs": {"image": f"{origin}/{name}.png?token={URL_TOKEN}"},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": f"logjob{name}"},
        },
    }
    hook: dict[str, Any] = {
        "url": f"{receiver.url}/{name}?token={URL_TOKEN}",
        **extra.pop("webhook", {}),
    }
    return {"input": {"workflow_json": wf, "webhook": hook, **extra}}


async def test_a_job_end_to_end_in_json_at_debug(
    tmp_path: Path,
    simulator: Simulator,
    origin: str,
    receiver: Receiver,
    moto_url: str,
    restore_logging: None,
) -> None:
    make_bucket(moto_url, "logs-op")
    make_bucket(moto_url, "logs-job")
    settings = settings_for(
        tmp_path,
        simulator.url,
        api_log_level="debug",
        log_format="json",
        api_keys=[API_KEY],
        url_allowlist=["127.0.0.1"],
        webhook_secret=DEFAULT_HOOK_SECRET,
        s3_access_key_id=OP_ACCESS,
        s3_secret_access_key=OP_SECRET,
        s3_bucket_name="logs-op",
        s3_endpoint_url=moto_url,
        s3_region="us-east-1",
        generation_workers=1,
        preprocess_workers=2,
        postprocess_workers=2,
    )
    buf = io.StringIO()
    logs.configure(settings, stream=buf)
    srv = await start_server(settings)
    logs.attach(srv.services)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    bodies = {
        # a: the operator's bucket, the job's own webhook secret
        "a": job_body(origin, receiver, "a", webhook={"secret": JOB_HOOK_SECRET}),
        # b: the job's own S3 keys and bucket, the server's default webhook secret
        "b": job_body(
            origin,
            receiver,
            "b",
            s3={
                "access_key_id": JOB_ACCESS,
                "secret_access_key": JOB_SECRET,
                "bucket_name": "logs-job",
                "endpoint_url": moto_url,
            },
        ),
    }
    try:

        async def submit(body: dict[str, Any]) -> str:
            async with srv.session.post(srv.u("/generate"), json=body, headers=auth) as r:
                assert r.status == 202, await r.text()
                return str((await r.json())["id"])

        ids = dict(
            zip(bodies, await asyncio.gather(*(submit(b) for b in bodies.values())), strict=True)
        )
        results: dict[str, dict[str, Any]] = {}

        async def done() -> None:
            while len(results) < len(ids):
                for name, job_id in ids.items():
                    # The key as a query parameter, as a browser's EventSource would send it.
                    async with srv.session.get(
                        srv.u(f"/result/{job_id}?access_token={API_KEY}")
                    ) as r:
                        res = await r.json()
                    if res["status"] in ("completed", "failed", "cancelled"):
                        results[name] = res
                await asyncio.sleep(0.1)

        await asyncio.wait_for(done(), 60)
        assert {n: r["status"] for n, r in results.items()} == {
            "a": "completed",
            "b": "completed",
        }, results
        assert all(
            r["output"] and not r["output"][0].get("upload_error") for r in results.values()
        ), results
        await wait_for(
            lambda: buf.getvalue().count('"outcome": "delivered"') >= 2, "both webhook lines"
        )
        prompts = {}
        for name, job_id in ids.items():
            job = await srv.services.store.get(job_id)
            assert job is not None and job.comfy_prompt_id
            prompts[name] = job.comfy_prompt_id
    finally:
        await srv.close()

    (tmp_path / "log.jsonl").write_text(buf.getvalue())  # to read when this test fails
    lines = parse(buf)
    text = buf.getvalue()
    for secret in SECRETS:
        assert secret not in text, f"{secret} appears in the log"

    # Every line that names something of one job (its id, prompt, input, output files) carries
    # that job's id, and only that one.
    markers = {
        name: {ids[name], str(prompts[name]), f"logjob{name}", f"/{name}.png"} for name in ids
    }
    ours = [ln for ln in lines if not ln["logger"].startswith(FOREIGN)]
    for ln in ours:
        named = {name for name, ms in markers.items() if any(m in ln["_raw"] for m in ms)}
        if named:
            assert len(named) == 1 and ln.get("job_id") == ids[named.pop()], ln["_raw"]

    # Each part of comfyq that worked on a job said so, under the job's id.
    wanted = {
        "comfyq.access",
        "comfyq.jobs",
        "comfyq.inputs.prepare",
        "comfyq.inputs",
        "comfyq.generate",
        "comfyq.comfy.backends",
        "comfyq.outputs",
        "comfyq.webhooks",
    }
    for name, job_id in ids.items():
        loggers = {ln["logger"] for ln in ours if ln.get("job_id") == job_id}
        assert wanted <= loggers, (name, wanted - loggers)
        ends = [
            ln
            for ln in ours
            if ln.get("job_id") == job_id
            and ln["logger"] == "comfyq.jobs"
            and ln.get("state") == "completed"
        ]
        assert len(ends) == 1 and ends[0]["level"] == "info" and ends[0]["timings"]["total_ms"] >= 0
        delivered = [
            ln for ln in ours if ln.get("job_id") == job_id and ln.get("outcome") == "delivered"
        ]
        assert len(delivered) == 1 and 200 <= delivered[0]["http_status"] < 300

    access = [ln for ln in ours if ln["logger"] == "comfyq.access"]
    polls = [ln for ln in access if ln["path"].startswith("/result/")]
    assert polls and all(
        ln["method"] == "GET"
        and ln["status"] == 200
        and "?" not in ln["path"]
        and ln["job_id"] == ln["path"].removeprefix("/result/")
        for ln in polls
    )
    posts = [ln for ln in access if ln["path"] == "/generate"]
    assert sorted(ln["job_id"] for ln in posts) == sorted(ids.values())
    assert all(ln["remote"] == "127.0.0.1" and ln["duration_ms"] >= 0 for ln in access)
    # Debug level: the noisy libraries that leak payloads stay quiet, the others speak.
    assert not [ln for ln in lines if ln["logger"].startswith(("aiosqlite", "markdown_it"))]
    assert any(ln["logger"].startswith("botocore") for ln in lines)


async def test_warning_level_from_the_environment_suppresses_info(
    tmp_path: Path,
    simulator: Simulator,
    restore_logging: None,
) -> None:
    env = {
        "API_LOG_LEVEL": "warning",
        "COMFYQ_LOG_FORMAT": "json",
        "COMFYUI_API_BASE": simulator.url,
        "COMFYQ_DATABASE": str(tmp_path / "q.db"),
        "COMFYQ_OUTPUT_DIR": str(tmp_path / "out"),
        "COMFYQ_CACHE_DIR": str(tmp_path / "cache"),
        "COMFYQ_BACKEND_PROBE_INTERVAL": "0.2",
    }
    settings = load_settings(config_path=None, env=env)
    assert settings.api_log_level == "warning"
    buf = io.StringIO()
    logs.configure(settings, stream=buf)
    srv = await start_server(settings)
    logs.attach(srv.services)
    good = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 7},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "warn"}},
    }
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    try:
        ids = []
        for wf in (good, bad):
            async with srv.session.post(
                srv.u("/generate/sync"), json={"input": {"workflow_json": wf}}
            ) as r:
                ids.append((await r.json())["id"])
                assert r.status in (200, 400)
    finally:
        await srv.close()
    lines = parse(buf)
    assert not [ln for ln in lines if ln["level"] in ("debug", "info")]
    failed = [ln for ln in lines if ln.get("job_id") == ids[1] and ln["logger"] == "comfyq.jobs"]
    assert len(failed) == 1 and failed[0]["level"] == "warning" and failed[0]["state"] == "failed"
    assert failed[0]["error_type"] == "validation_error"
    assert not [ln for ln in lines if ln.get("job_id") == ids[0]]


def test_serve_with_a_bad_log_level_exits_2_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("API_LOG_LEVEL", "loud")
    assert main(["--database", str(tmp_path / "q.db"), "serve"]) == 2
    err = capsys.readouterr().err
    assert "API_LOG_LEVEL" in err and "loud" in err
    assert not (tmp_path / "q.db").exists()


async def test_unknown_route_and_refused_request_lines(
    tmp_path: Path,
    simulator: Simulator,
    restore_logging: None,
) -> None:
    settings = settings_for(tmp_path, simulator.url, log_format="json", api_keys=[API_KEY])
    buf = io.StringIO()
    logs.configure(settings, stream=buf)
    srv = await start_server(settings)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.u("/jobs?access_token=wrong-key-abcdef")) as r:
                assert r.status == 401
            async with s.get(srv.u("/health")) as r:
                assert r.status in (200, 503)
    finally:
        await srv.close()
    lines = [ln for ln in parse(buf) if ln["logger"] == "comfyq.access"]
    assert len(lines) == 1, lines  # /health is at debug
    (ln,) = lines
    assert ln["path"] == "/jobs" and ln["status"] == 401 and ln["error_type"] == "unauthorized"
    assert "wrong-key-abcdef" not in ln["_raw"] and "unauthorized" in ln["msg"]
