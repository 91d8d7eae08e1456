"""Log lines: one per event, JSON when configured, with the job id as a field."""

from __future__ import annotations

import json
import logging

from comfyq.logs import JsonFormatter, TextFormatter


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("comfyq.pipeline", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_lines_carry_the_job_id() -> None:
    line = JsonFormatter().format(record("job %s: lease lost", "j1", job_id="j1"))
    data = json.loads(line)
    assert "\n" not in line
    assert data["job_id"] == "j1" and data["level"] == "warning" and data["msg"] == "job j1: lease lost"
    assert data["ts"].endswith("Z") and data["logger"] == "comfyq.pipeline"


def test_text_lines_name_the_job_once() -> None:
    assert TextFormatter().format(record("job %s: lease lost", "j1", job_id="j1")).count("j1") == 1
    assert TextFormatter().format(record("worker crashed", job_id="j2")).endswith("job=j2")
