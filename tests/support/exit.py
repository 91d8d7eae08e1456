"""The run fails when a test leaves a database connection thread running, and the test process
exits when the session is over, whatever threads a test left behind.

aiosqlite (0.22) runs each connection on a non-daemon thread, and that thread keeps its connection
alive (through the last call it ran), so a connection a test failed to close is never collected: its
thread runs until the process ends, and keeps the interpreter waiting at exit after the last result
was printed (CI would hang until its time limit). comfyq's own threads (``comfyq-*``, the SQLite
writer) end with their store.

After each test the live aiosqlite and comfyq threads are noted with the test after which each was
first seen. Once the session's fixtures are torn down, one still running is a leak: it is named,
with that test, in the summary, and the run fails (exit status 1) even when every test passed.
At the very end (after the summary and the JUnit report are written) every leftover non-daemon
thread is named on stderr and the process exits with the run's status.

Under pytest-xdist (``-n``) each worker watches its own tests and hands what it found to the
controller, which reports and fails the run as above.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

# aiosqlite's worker threads are named after their target: "Thread-7 (_connection_worker_thread)".
AIOSQLITE_THREAD = "_connection_worker_thread"
COMFYQ_THREAD_PREFIX = "comfyq-"
# How long a connection closed during teardown may take to end its thread (it ends at once; a
# leaked one never does, so this bounds nothing but the wait).
SETTLE_SECONDS = 5.0
LEAKS_KEY = "comfyq_thread_leaks"  # a pytest-xdist worker's leaks, sent to the controller

_status: list[int] = []
_first_seen: dict[threading.Thread, str] = {}  # watched thread -> the test after which it ran
_leaks: list[str] = []


def watched(t: threading.Thread) -> bool:
    """A connection thread of aiosqlite, or one of comfyq's own."""
    return AIOSQLITE_THREAD in t.name or t.name.startswith(COMFYQ_THREAD_PREFIX)


def _note(where: str) -> None:
    for t in threading.enumerate():
        if watched(t) and t.is_alive():
            _first_seen.setdefault(t, where)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        _note(item.nodeid)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # trylast: after the runner has torn down the session's fixtures (a session-scoped store's
    # connection is no leak).
    _note("the session's own fixtures")
    deadline = time.monotonic() + SETTLE_SECONDS
    for t, where in _first_seen.items():
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            _leaks.append(f"{t.name}: first seen running after {where}")
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        # A pytest-xdist worker: its exit status is not the run's, so its leaks go to the
        # controller (pytest_testnodedown below), which names them and fails the run.
        workeroutput[LEAKS_KEY] = list(_leaks)
    if _leaks and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _status.append(int(session.exitstatus))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: a worker finished; take on the leaks it found."""
    _leaks.extend(getattr(node, "workeroutput", {}).get(LEAKS_KEY, []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _leaks:
        return
    terminalreporter.section("database connection threads left running", sep="=", red=True)
    for line in _leaks:
        terminalreporter.line(line, red=True)
    terminalreporter.line(
        "a test (or a fixture, or comfyq on its path) opened a connection and never closed it;"
        " the run fails (exit status 1)"
    )


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    left = [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if not left or not _status:
        return
    names = ", ".join(sorted(t.name for t in left))
    print(f"\ntests left {len(left)} non-daemon thread(s) running: {names}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status[-1])
