"""Fuzz: Schemathesis, the real CLI, against a real ``comfyq serve --simulate`` over loopback, with
and without API keys: every operation of the served ``/openapi.json``, its examples, coverage,
fuzzing and stateful phases (links inferred from ``Location`` headers), seeded, within a bounded
budget. Any 5xx, any response that does not match the published schema (status code, content type,
headers, body) fails the test, and so does a log line carrying a forged watcher token.

URL-looking strings are pointed at a closed loopback port by ``support.fuzz_hooks`` (tests reach
only loopback; the address guard refuses them with a 400).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fuzz import require_fuzz
from support.served import Served, start_serve

pytestmark = pytest.mark.fuzz

SEED = 20261207
# Examples per operation and phase: the open run goes wider, the keyed one checks every operation
# under auth (ignored_auth included). Both together stay around three minutes on two busy cores.
MAX_EXAMPLES = {None: 5, "keyed": 2}
if os.environ.get("COMFYQ_FUZZ_EXAMPLES"):
    MAX_EXAMPLES = dict.fromkeys(MAX_EXAMPLES, int(os.environ["COMFYQ_FUZZ_EXAMPLES"]))
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance"
)
API_KEY = "fuzz-key-0123456789abcdef"


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("schemathesis") or shutil.which("st")
    if found is None:
        require_fuzz("the schemathesis CLI is not installed")
    return [str(found)]


@pytest.fixture(params=[None, API_KEY], ids=["open", "api-keys"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    srv = start_serve(tmp_path / "serve", api_key=request.param)
    try:
        yield srv
    finally:
        srv.stop()


def run_schemathesis(srv: Served, tmp_path: Path, checks: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        *_cli(),
        "run",
        f"{srv.url}/openapi.json",
        "--checks",
        checks,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES["keyed" if srv.api_key else None]),
        "--seed",
        str(SEED),
        # One worker: with two, hypothesis describes lambdas with ast.parse in two threads at
        # once, which trips a CPython 3.11 race ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--suppress-health-check",
        "all",
        "--no-shrink",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    if srv.api_key:
        cmd += ["-H", f"Authorization: Bearer {srv.api_key}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "support.fuzz_hooks",
        "PYTHONPATH": str(Path(__file__).parent),
        "NO_COLOR": "1",
    }
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False
    )


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_5xx_no_schema_mismatch_no_forged_line(
    served: Served, tmp_path: Path
) -> None:
    checks = CHECKS + (",ignored_auth" if served.api_key else "")
    p = run_schemathesis(served, tmp_path, checks)
    report = p.stdout[-20000:] + p.stderr[-5000:]
    assert p.returncode == 0, report
    assert "No issues found" in p.stdout or "passed" in p.stdout, report
    assert served.forged_lines() == [], served.forged_lines()[:5]
    log = served.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 : log.find("Traceback") + 3000]
    assert served.stop() == 0
