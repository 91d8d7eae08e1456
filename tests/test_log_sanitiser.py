"""The log sanitiser (``comfyq.logs``): whatever text a record carries, a finished line is one
line without raw control characters, and the tokens log watchers act on appear only in comfyq's
own signal lines. Real formatters on a real handler; the end-to-end vectors (request_id, URL path,
class_type, modifier parameter, webhook URL) are in ``test_hostile``."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from comfyq import logs

TOKENS = logs.WATCHED_TOKENS
_ANY_TOKEN = re.compile("|".join(re.escape(t) for t in TOKENS), re.IGNORECASE)


def lines(fmt: str, emit: list[tuple[str, tuple[object, ...], bool]]) -> list[str]:
    buf = io.StringIO()
    handler = logs.setup("debug", fmt, stream=buf)
    log = logging.getLogger("comfyq.test")
    try:
        for msg, args, signal in emit:
            log.info(msg, *args, extra=logs.SIGNAL if signal else None)
        try:
            raise ValueError("Application startup failed\nBACKEND_UNRECOVERABLE\x00")
        except ValueError:
            log.exception("failed %s", "x")
    finally:
        logging.getLogger().removeHandler(handler)
    return buf.getvalue().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("token", TOKENS)
def test_client_text_never_carries_a_token(fmt: str, token: str) -> None:
    out = lines(
        fmt,
        [
            ("GET /x/%s 404", (token,), False),
            ("request %s", (f"poison-{token.lower()}",), False),
            (f"template {token}", (), False),  # a token in a template without SIGNAL is text too
            ("%s", (token.replace("_", "\x00_"),), False),
        ],
    )
    for line in out:
        assert not _ANY_TOKEN.search(line), line
    assert any("\\x" in line for line in out)  # neutralised, still readable


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_signal_lines_keep_their_token_and_only_there(fmt: str) -> None:
    out = lines(
        fmt,
        [
            ("BACKENDS_READY: %d backend(s) reachable", (2,), True),
            ("BACKENDS_READY_TIMEOUT: not ready: %s", ("http://x (poison-BACKENDS_READY)",), True),
            ("Application startup failed: %s", ("BACKEND_UNRECOVERABLE",), True),
        ],
    )
    signal = [line for line in out if _ANY_TOKEN.search(line)]
    assert len(signal) == 3
    for line, token in zip(
        signal,
        ["BACKENDS_READY", "BACKENDS_READY_TIMEOUT", "Application startup failed"],
        strict=True,
    ):
        msg = json.loads(line)["msg"] if fmt == "json" else line.split(": ", 1)[1]
        assert msg.startswith(token + ":")
        assert len(_ANY_TOKEN.findall(msg)) == 1, msg  # the argument's token was neutralised


ESCAPED = {
    "\x00": "\\x00",
    "\r": "\\r",
    "\n": "\\n",
    "\t": "\\t",
    "\x1b": "\\x1b",
    "\x7f": "\\x7f",
    "\x85": "\\x85",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


@pytest.mark.parametrize("char", list(ESCAPED))
def test_control_characters_are_escaped(char: str) -> None:
    text_out = lines("text", [("path %s end", (f"a{char}b",), False)])
    assert text_out[0].endswith(f"path a{ESCAPED[char]}b end")
    for line in text_out:
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", line), repr(line)
    json_out = lines("json", [("path %s end", (f"a{char}b",), False)])
    assert json.loads(json_out[0])["msg"] == f"path a{char}b end"  # JSON keeps it, escaped
    for line in json_out:
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), repr(line)


def test_a_traceback_stays_indented_under_its_event() -> None:
    out = lines("text", [])
    assert out[0].endswith("failed x")
    assert all(line.startswith("  ") for line in out[1:])
    assert any("\\x00" in line for line in out[1:])


def test_clean_is_the_same_rule_for_other_sinks() -> None:
    assert logs.clean("a\nBACKENDS_READY\x00") == "a\\n\\x42ACKENDS_READY\\x00"
    assert logs.clean("tb\nline", multiline=True) == "tb\nline"
    assert logs.clean("plain text") == "plain text"


def test_the_quick_token_check_misses_no_case_blind_match() -> None:
    """``neutralise`` skips the case-blind scan when the lowered line holds neither "backend"
    nor "tartup": every character the case-blind pattern takes for a letter of those lowers to
    that letter (the Kelvin sign for k, ...), over all of Unicode."""
    import sys

    # Every code point once, in one string: the pattern's C loop looks at all of them.
    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    for word in ("backend", "tartup"):
        for letter in set(word):
            pattern = re.compile(re.escape(letter), re.IGNORECASE)
            for char in pattern.findall(everything):
                assert char.lower() == letter, (letter, hex(ord(char)))
    # and the quick check passes on to the scan what it must: each token in odd cases and spellings
    for token in TOKENS:
        for text in (token, token.lower(), token.swapcase(), token.replace("K", "\u212a")):
            line = f"GET /x/{text} 404"
            assert _ANY_TOKEN.search(line)
            assert not _ANY_TOKEN.search(logs.neutralise(line)), text
            assert not _ANY_TOKEN.search(logs.clean(line)), text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_time_stamp_is_loggings_own_across_seconds(fmt: str) -> None:
    """The formatters make one time stamp per second: each line's stamp is still its own."""
    import time

    formatter = logs.TextFormatter() if fmt == "text" else logs.JsonFormatter()
    reference = logging.Formatter("%(asctime)s")
    for created in (1700000000.0, 1700000000.999, 1700000001.5, 1700000001.001, 1699999999.25):
        rec = logging.LogRecord("comfyq.test", logging.INFO, __file__, 1, "m", None, None)
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        out = formatter.format(rec)
        if fmt == "text":
            assert out.startswith(reference.formatTime(rec) + " INFO"), out
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            assert json.loads(out)["ts"] == f"{stamp}.{int(rec.msecs):03d}Z"
