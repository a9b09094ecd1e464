"""Hostile text in log records: no terminal control, no forged lines, JSON every reader accepts, no traceback."""

from __future__ import annotations

import io
import json
import logging

import pytest

from briefs import logs


@pytest.fixture
def capture() -> io.StringIO:
    return io.StringIO()


def _log(fmt: str, stream: io.StringIO) -> logging.Logger:
    logs.setup_logging(fmt, "INFO", stream=stream)
    return logging.getLogger("briefs.hostile")


def test_text_logs_escape_control_characters_and_indent_continuations(capture: io.StringIO) -> None:
    log = _log("text", capture)
    log.warning("server said %s", "ok\x1b]0;owned\x07\x1b[2J\u202egnp.exe\x00\r")
    log.warning("first\n2026-01-01 00:00:00,000 ERROR   briefs: forged")
    try:
        raise ValueError("boom\x1b[31m\nsecond")
    except ValueError:
        log.exception("failed")
    out = capture.getvalue()
    for raw in ("\x1b", "\x07", "\x00", "\r", "\u202e"):
        assert raw not in out  # was written as is: a log viewer's terminal obeyed it
    assert "\\x1b]0;owned\\x07" in out and "\\u202e" in out
    lines = out.splitlines()
    assert sum(not line.startswith(" ") for line in lines) == 3  # one line per record starts at column 0
    assert "    2026-01-01 00:00:00,000 ERROR   briefs: forged" in lines


def test_json_logs_hold_no_lone_surrogate(capture: io.StringIO) -> None:
    # A lone surrogate (an undecodable file name or header, read with surrogateescape) was written
    # as "\udcff": valid to Python, refused by strict JSON readers (the whole line is lost).
    log = _log("json", capture)
    log.warning("name %s", "bad\udcffname", extra={"field": "x\ud800y"})
    [line] = capture.getvalue().splitlines()
    assert "\\ud" not in line
    record = json.loads(line)
    assert record["message"] == "name bad\ufffdname" and record["field"] == "x\ufffdy"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_arguments_that_do_not_fit_the_message_are_logged_not_a_traceback(
    fmt: str, capture: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _log(fmt, capture)
    log.warning("%s and %s", "only one")
    log.warning("%(missing)s", {"present": 1})
    out = capture.getvalue()
    assert "only one" in out and "present" in out
    assert "Logging error" not in capsys.readouterr().err  # was: '--- Logging error ---' and a traceback
