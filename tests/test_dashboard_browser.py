"""The dashboard at /ui in a real headless Chromium against a real ``comfyq serve --simulate``.

Every wait is on something the page shows (Playwright's auto-waiting ``expect``), never a sleep.
Screenshots of each page go to the test's folder, and to docs/images/ with
COMFYQ_UPDATE_SCREENSHOTS=1 (how the README's pictures are made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dashboard import CHROMIUM, CHROMIUM_ARGS, ROOT, Serve, browser_or_skip

pytestmark = pytest.mark.timeout(300)

try:  # a machine without playwright skips (or, in CI, fails) through browser_or_skip
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        ConsoleMessage,
        Page,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover
    pass

SLOW = {"COMFYQ_SIMULATE_NODE_DURATION": "0.6", "COMFYQ_SIMULATE_PROGRESS_STEPS": "12"}
ADMIN, CLIENT = "admin-dash-key", "client-dash-key"


def long_job(blurs: int = 8, width: int = 40) -> dict[str, Any]:
    """EmptyImage -> ImageBlur x ``blurs`` -> SaveImage: seconds of running on the slow simulator,
    time enough for a person (or a test) to act on it while it runs."""
    wf: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": 16, "batch_size": 1, "color": 0x123456},
        }
    }
    prev = "1"
    for i in range(blurs):
        node = str(10 + i)
        wf[node] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [prev, 0], "blur_radius": 1 + i % 3, "sigma": 1.0},
        }
        prev = node
    wf["2"] = {"class_type": "SaveImage", "inputs": {"images": [prev, 0], "filename_prefix": "l"}}
    return {"input": {"workflow_json": wf}}


def effects(**mods: Any) -> dict[str, Any]:
    return {
        "input": {"modifier": "ImageEffects", "modifications": {"width": 48, "height": 32, **mods}}
    }


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One slow-node server for the tests that need no keys."""
    srv = Serve(tmp_path_factory.mktemp("dash"), **SLOW).start()
    yield srv
    srv.stop()


class Watch:
    """Console errors, uncaught exceptions and failed requests of one page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("requestfailed", self._failed)
        page.on("request", lambda r: self.urls.append(r.url))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def _failed(self, req: Any) -> None:
        failure = req.failure or ""
        if "ERR_ABORTED" in failure:  # a fetch the page cancelled itself (navigating away)
            return
        self.errors.append(f"requestfailed: {req.url} {failure}")

    def clean(self) -> None:
        assert self.errors == [], self.errors


def shot(page: Page, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    if os.environ.get("COMFYQ_UPDATE_SCREENSHOTS") == "1":
        out = ROOT / "docs" / "images"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / f"{name}.png")


# The browser contexts a test opened: closed when it ends (close_pages), before its server
# stops: a page left open keeps retrying a server that has gone.
_contexts: list[BrowserContext] = []


def close_pages() -> None:
    while _contexts:
        _contexts.pop().close()


@pytest.fixture(autouse=True)
def _pages_closed() -> Iterator[None]:
    yield
    close_pages()


def new_page(browser: Browser, *, width: int = 1280, height: int = 860) -> tuple[Page, Watch]:
    ctx = browser.new_context(viewport={"width": width, "height": height})
    _contexts.append(ctx)
    page = ctx.new_page()
    return page, Watch(page)


def no_sideways_scroll(page: Page) -> None:
    over = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert over <= 0, f"{over}px of horizontal scroll at {page.viewport_size}"


def test_new_job_appears_and_completes_without_reload(
    browser: Browser, server: Serve, tmp_path: Path
) -> None:
    page, watch = new_page(browser)
    page.goto(server.url + "/ui")
    expect(page.locator("#conn")).to_have_text("live")
    status, res = server.call("POST", "/generate", effects(blur_radius=1))
    assert status == 202
    row = page.locator(f'tr[data-id="{res["id"]}"]')
    expect(row).to_be_visible()
    expect(row).to_have_attribute("data-status", "completed", timeout=60_000)
    expect(row.locator(".c-kind")).to_have_text("ImageEffects", timeout=10_000)
    # The chips count it, and the filter shows it.
    page.locator('.chip[data-status="completed"]').click()
    expect(page.locator(f'tr[data-id="{res["id"]}"]')).to_be_visible()
    expect(page.locator('.chip[data-status="completed"] .count')).not_to_have_text("0")
    page.locator('.chip[data-status=""]').click()
    # Search by the start of the id.
    page.locator("input.search").fill(res["id"][:20])
    expect(page.locator("tbody tr")).to_have_count(1)
    page.locator("input.search").fill("")
    shot(page, tmp_path, "ui-jobs")
    no_sideways_scroll(page)
    watch.clean()


def test_submit_form_runs_image_effects_with_live_progress_and_output(
    browser: Browser, server: Serve, tmp_path: Path
) -> None:
    page, watch = new_page(browser)
    page.goto(server.url + "/ui#/submit")
    expect(page.locator("#modifier")).to_have_value("ImageEffects")
    page.locator("#f-width").fill("96")
    page.locator("#f-height").fill("64")
    page.locator("#f-blur_radius").fill("3")
    page.locator("#f-color").fill("#3366cc")
    shot(page, tmp_path, "ui-submit")
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"#/job/"))
    # The per-node progress bar moves: the page shows two different values below 100 (sampled
    # on every animation frame), with the running node named beside it.
    seen = page.wait_for_function(
        """() => {
            const bar = document.querySelector('.live .bar');
            const label = document.querySelector('.node-label');
            const v = bar && !bar.hidden && bar.getAttribute('aria-valuenow');
            const seen = (window.__seenProgress ||= new Map());
            if (v && v !== '0' && v !== '100') seen.set(v, label.textContent);
            return seen.size >= 2 && Object.fromEntries(seen);
        }""",
        timeout=60_000,
    ).json_value()
    assert len(seen) >= 2 and all("ImageBlur" in text for text in seen.values()), seen
    expect(page.locator(".job-head")).to_have_attribute("data-status", "completed", timeout=60_000)
    img = page.locator("img.output-img").first
    expect(img).to_be_visible()
    page.wait_for_function(
        "() => { const i = document.querySelector('img.output-img');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    assert img.evaluate("i => i.naturalWidth") == 96
    expect(page.locator(".timeline li")).not_to_have_count(0)
    shot(page, tmp_path, "ui-job")
    page.locator("summary", has_text="Workflow JSON").click()
    expect(page.locator("pre.json").first).to_contain_text("ImageBlur")
    no_sideways_scroll(page)
    watch.clean()


def test_cancel_retry_and_run_again_from_the_job_page(
    browser: Browser, server: Serve, tmp_path: Path
) -> None:
    page, watch = new_page(browser)
    status, res = server.call("POST", "/generate", long_job())
    assert status == 202
    job = res["id"]
    page.goto(f"{server.url}/ui#/job/{job}")
    head = page.locator(".job-head")
    expect(head).to_have_attribute("data-status", re.compile("queued|processing|generating"))
    page.get_by_role("button", name="Cancel").click()
    expect(head).to_have_attribute("data-status", "cancelled", timeout=30_000)
    assert server.wait_final(job) == "cancelled"
    page.get_by_role("button", name="Retry").click()
    expect(head).not_to_have_attribute("data-status", "cancelled")
    expect(head).to_have_attribute("data-status", "completed", timeout=60_000)
    assert server.wait_final(job) == "completed"
    expect(page.locator("img.output-img")).to_have_count(1)
    page.get_by_role("button", name="Run again").click()
    expect(page).not_to_have_url(re.compile(re.escape(job) + "$"))
    again = page.url.rsplit("/", 1)[-1]
    assert again != job
    expect(page.locator(".job-head")).to_have_attribute("data-status", "completed", timeout=60_000)
    status, res2 = server.call("GET", f"/ui/api/jobs/{again}")
    assert status == 200 and res2["input"]["workflow_json"]["1"]["inputs"]["width"] == 40
    # Delete needs two clicks, then the job is gone.
    page.get_by_role("button", name="Delete").click()
    page.get_by_role("button", name="Really delete?").click()
    expect(page).to_have_url(re.compile(r"/ui#/$"))
    assert server.call("GET", f"/result/{again}")[0] == 404
    watch.clean()


def test_page_reconnects_after_a_server_restart_and_shows_the_final_state(
    browser: Browser, tmp_path: Path
) -> None:
    srv = Serve(tmp_path, **SLOW).start()
    try:
        page, _ = new_page(browser)
        status, res = srv.call("POST", "/generate", long_job())
        assert status == 202
        job = res["id"]
        page.goto(f"{srv.url}/ui#/job/{job}")
        expect(page.locator("#conn")).to_have_text("live")
        srv.stop()
        expect(page.locator("#conn")).to_have_text("reconnecting…")
        srv.start()
        final = srv.wait_final(job)
        expect(page.locator("#conn")).to_have_text("live", timeout=30_000)
        expect(page.locator(".job-head")).to_have_attribute("data-status", final, timeout=30_000)
        # The jobs list catches up too.
        page.goto(f"{srv.url}/ui#/")
        expect(page.locator(f'tr[data-id="{job}"]')).to_have_attribute("data-status", final)
    finally:
        close_pages()
        srv.stop()


def test_api_keys_prompt_wrong_key_and_client_view(browser: Browser, tmp_path: Path) -> None:
    srv = Serve(tmp_path, COMFYQ_API_KEYS=f"{ADMIN},client:{CLIENT}").start()
    try:
        _, other = srv.call("POST", "/generate", effects(), key=ADMIN)
        _, mine = srv.call("POST", "/generate", effects(color=5), key=CLIENT)
        page, watch = new_page(browser)
        page.goto(srv.url + "/ui")
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        page.locator("#key-input").fill("not-the-key")
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#key-error")).to_contain_text("not accepted")
        shot(page, tmp_path, "ui-key")
        page.locator("#key-input").fill(CLIENT)
        page.get_by_role("button", name="Use this key").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#conn")).to_have_text("live")
        expect(page.locator(f'tr[data-id="{mine["id"]}"]')).to_be_visible()
        expect(page.locator(f'tr[data-id="{other["id"]}"]')).to_have_count(0)
        page.goto(f"{srv.url}/ui#/queue")
        expect(page.locator(".charts")).to_contain_text("admin API key")
        watch.clean()  # the prompt and the wrong key cost no 401 or 403 in the console
        # Another key's job: "not here", like a job that does not exist.
        page.goto(f"{srv.url}/ui#/job/{other['id']}")
        expect(page.locator(".notice.error")).to_contain_text("No job")
        # The key went in headers only: never in a URL.
        assert not [u for u in watch.urls if CLIENT in u or ADMIN in u]
    finally:
        close_pages()
        srv.stop()


def test_bad_input_and_failure_stay_graceful(browser: Browser, tmp_path: Path) -> None:
    srv = Serve(tmp_path, COMFYQ_MAX_BODY_BYTES="4096").start()
    page, _ = new_page(browser)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{srv.url}/ui#/job/no-such-job")
        expect(page.locator(".notice.error")).to_contain_text("No job “no-such-job”")
        # A 413: an upload larger than the server takes.
        page.goto(f"{srv.url}/ui#/submit")
        expect(page.locator("#modifier")).to_have_value("ImageEffects")
        big = tmp_path / "big.png"
        big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(20_000))
        page.locator("#images").set_input_files(str(big))
        expect(page.locator(".images li")).to_have_count(1)
        page.get_by_role("button", name="Submit").click()
        expect(page.locator(".notice.error")).to_contain_text("too large")
        # A validation error lands beside the field it names.
        page.locator(".images button", has_text="remove").click()
        page.locator("#f-blur_radius").fill("99")
        page.get_by_role("button", name="Submit").click()
        field = page.locator('.field[data-path="$.input.modifications.blur_radius"] .field-error')
        expect(field).not_to_be_empty()
        # The server goes away: the page says so instead of going blank.
        page.goto(f"{srv.url}/ui#/")
        expect(page.locator("#conn")).to_have_text("live")
        srv.stop()
        expect(page.locator("#banner")).to_be_visible()
        # The websocket ends first ("Reconnecting"), or a fetch in flight fails first ("cannot be
        # reached"): either way the banner says the server went away.
        gone = re.compile("Reconnecting|cannot be reached")
        expect(page.locator("#banner")).to_contain_text(gone)
        page.locator("input.search").fill("abc")
        expect(page.locator(".notice.error")).to_contain_text("cannot be reached")
    finally:
        close_pages()
        srv.stop()
    assert errors == []


def test_phone_width_has_no_sideways_scroll(
    browser: Browser, server: Serve, tmp_path: Path
) -> None:
    status, res = server.call("POST", "/generate", effects())
    assert status == 202 and server.wait_final(res["id"]) == "completed"
    page, watch = new_page(browser, width=375, height=800)
    for name, frag, ready in (
        ("jobs", "#/", "tbody tr"),
        ("job", f"#/job/{res['id']}", "img.output-img"),
        ("submit", "#/submit", "#f-width"),
        ("queue", "#/queue", ".chart"),
    ):
        page.goto(f"{server.url}/ui{frag}")
        expect(page.locator(ready).first).to_be_visible()
        no_sideways_scroll(page)
        shot(page, tmp_path, f"ui-phone-{name}")
    page.set_viewport_size({"width": 1280, "height": 860})
    page.goto(f"{server.url}/ui#/queue")
    expect(page.locator(".chart").first).to_be_visible()
    expect(page.locator(".charts")).to_contain_text("completed")
    shot(page, tmp_path, "ui-queue")
    watch.clean()


def test_a_failed_job_shows_its_whole_error(
    browser: Browser, server: Serve, tmp_path: Path
) -> None:
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": "wide"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    }
    status, res = server.call("POST", "/generate/sync", {"input": {"workflow_json": wf}})
    assert status == 400 and res["status"] == "failed"
    page, watch = new_page(browser)
    page.goto(f"{server.url}/ui#/job/{res['id']}")
    card = page.locator(".error-card")
    expect(card).to_be_visible()
    expect(card).to_contain_text("validation_error")
    expect(card.locator("pre").first).to_contain_text("invalid_input_type")  # ComfyUI's node_errors
    expect(card.locator("pre").first).to_contain_text("received_value")
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    shot(page, tmp_path, "ui-job-failed")
    watch.clean()


def test_workflow_json_submit_shows_the_live_preview(
    browser: Browser, server: Serve, tmp_path: Path
) -> None:
    # EmptyImage (0.6 s) -> SaveImageWebsocket: ComfyUI's preview frames, one per image; then
    # SaveImage for the output.
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 40, "height": 24, "batch_size": 4, "color": 0x33AA55},
        },
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "p"}},
    }
    page, watch = new_page(browser)
    page.goto(server.url + "/ui#/submit")
    page.locator("#mode-wf").check()
    page.locator("#workflow").fill(json.dumps(wf))
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"#/job/"))
    page.wait_for_function(
        "() => { const i = document.querySelector('img.preview');"
        " return i && !i.hidden && i.complete && i.naturalWidth === 40; }",
        timeout=60_000,
    )
    expect(page.locator(".job-head")).to_have_attribute("data-status", "completed", timeout=60_000)
    expect(page.locator("img.output-img")).to_have_count(4)
    watch.clean()
