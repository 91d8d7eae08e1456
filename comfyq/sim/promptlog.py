"""An append-only record of every prompt the simulator accepted, kept outside its memory.

A simulated crash throws the queue and history away; benchmarks that crash the simulator still need
to count how many times each workflow was submitted. One JSON line per accepted ``POST /prompt``,
written before the 200 goes out, so whatever the client saw accepted is on file even if the process
is killed right after.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["PromptLog", "read_prompt_log"]


class PromptLog:
    """Appends a line per accepted prompt to a file; ``boot`` tells simulator incarnations apart."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.boot = ""

    def open(self) -> None:
        """Open for appending (created if missing) and start a new incarnation id."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.boot = uuid.uuid4().hex[:12]

    def close(self) -> None:
        """Close the file (lines already written stay)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, prompt_id: str, number: Any, client_id: str | None, prompt: Any) -> None:
        """Record one accepted prompt."""
        if self._fd is None:
            return
        line = (
            json.dumps(
                {
                    "at": time.time(),
                    "boot": self.boot,
                    "pid": os.getpid(),
                    "prompt_id": prompt_id,
                    "number": number,
                    "client_id": client_id,
                    "prompt": prompt,
                },
                separators=(",", ":"),
                default=str,
            )
            + "\n"
        )
        # One write(2) of one line on an O_APPEND descriptor: it lands in the page cache at once (no
        # disk wait, so the event loop is not held), whole, and survives a kill -9 of this process.
        os.write(self._fd, line.encode())


def read_prompt_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a prompt log, oldest first (a torn last line, if any, is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
