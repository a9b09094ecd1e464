"""Logs: text and JSON formats, job context on every job line, secrets never printed."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from briefs import logs
from worker.queue import Job


@pytest.fixture
def capture():
    stream = io.StringIO()
    yield stream
    logging.getLogger().handlers.clear()


def _job() -> Job:
    return Job(7, "noop", {}, 100, 2, 5, None, 42, None, datetime.now(UTC), uuid.uuid4())


def test_text_lines_carry_job_context(capture: io.StringIO) -> None:
    logs.setup_logging("text", "INFO", stream=capture)
    log = logging.getLogger("t")
    with logs.job_context(_job()):
        log.info("working")
    log.info("outside")
    lines = capture.getvalue().splitlines()
    assert "working [job=7 type=noop user=42 attempt=2]" in lines[0]
    assert "job=" not in lines[1]


def test_json_lines_carry_job_context(capture: io.StringIO) -> None:
    logs.setup_logging("json", "INFO", stream=capture)
    with logs.job_context(_job()):
        logging.getLogger("t").warning("careful")
    record = json.loads(capture.getvalue().splitlines()[0])
    assert record["message"] == "careful"
    assert record["level"] == "warning"
    assert (record["job_id"], record["job_type"], record["user_id"], record["attempt"]) == (7, "noop", 42, 2)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_masked(capture: io.StringIO, fmt: str) -> None:
    logs.setup_logging(fmt, "INFO", secrets=("sk-live-abcdef123456",), stream=capture)
    log = logging.getLogger("t")
    log.info("key is %s", "sk-live-abcdef123456")
    log.info("db at postgresql://app:hunter2@db.internal:5432/briefs")
    try:
        raise RuntimeError("connect failed for smtp://mailer:p4ss@mail:587")
    except RuntimeError:
        log.exception("boom")
    out = capture.getvalue()
    assert "sk-live-abcdef123456" not in out
    assert "hunter2" not in out and "p4ss" not in out
    assert "postgresql://app:***@db.internal" in out


def test_cli_errors_never_show_passwords() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIEFS_", "DATABASE_URL", "OPENAI_"))}
    env["DATABASE_URL"] = "postgresql://app:topsecretpw@127.0.0.1:1/briefs"
    env["OPENAI_API_KEY"] = "sk-test-never-print-me"
    proc = subprocess.run(
        [sys.executable, "-m", "briefs.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    both = proc.stdout + proc.stderr
    assert "topsecretpw" not in both and "sk-test-never-print-me" not in both
    assert "Traceback" not in both
    assert [line for line in proc.stderr.splitlines() if line.startswith("briefs: error:")]
