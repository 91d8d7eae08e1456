"""COMFYQ_REQUIRE_FUZZ=1 (CI): the fuzz tests (marked ``fuzz``) must run, never skip.

A fuzz test whose tool is missing calls :func:`require_fuzz`: a skip normally, a failure when the
variable is set; and a session in which a fuzz test was skipped, or none ran, exits as failed.
"""

from __future__ import annotations

import os

import pytest

_outcomes: dict[str, str] = {}


def required() -> bool:
    return os.environ.get("COMFYQ_REQUIRE_FUZZ") == "1"


def require_fuzz(reason: str) -> None:
    """Skip for ``reason``, or fail when the run requires the fuzz tests."""
    if required():
        pytest.fail(f"fuzz test required (COMFYQ_REQUIRE_FUZZ=1) but {reason}")
    pytest.skip(reason)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "fuzz" in report.keywords and (report.when == "call" or report.skipped):
        _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A pytest-xdist worker ran only its share of the tests: the controller, which sees every
    # test's report, decides.
    if not required() or hasattr(session.config, "workerinput"):
        return
    skipped = sorted(k for k, v in _outcomes.items() if v == "skipped")
    ran = [k for k, v in _outcomes.items() if v != "skipped"]
    if skipped or not ran:
        why = f"skipped: {', '.join(skipped)}" if skipped else "none ran"
        print(f"\nCOMFYQ_REQUIRE_FUZZ=1 but fuzz tests were not all run ({why})")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
