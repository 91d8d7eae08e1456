"""The test process exits when the session is over, whatever threads a test left behind.

aiosqlite (0.22) runs each connection on a non-daemon thread, so one connection a test failed to
close (a server killed mid-test, a fixture torn down by a timeout) keeps the interpreter waiting
at exit after the last result was printed, and CI would hang until its time limit. At the very
end of the run (after the summary and the JUnit report are written) the leftover non-daemon
threads are named on stderr, so the leak stays visible, and the process exits with pytest's own
status.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status.append(int(exitstatus))


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
