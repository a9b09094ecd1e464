"""Sending one message over SMTP: the target from ``BRIEFS_SMTP_URL``, and a bounded session.

stdlib ``smtplib`` in threads of its own (:func:`smtp_send` blocks; callers run it with
``run_in_executor`` on :func:`smtp_threads`), with every server reply bounded (a line over
smtplib's 8 KiB, or more than :data:`REPLY_MAX_LINES` lines, is :class:`SMTPReplyTooLong`), a
timeout per socket operation and a budget for the whole exchange, past which the socket is shut
down. TLS is implicit (``smtps://``) or STARTTLS (``smtp+starttls://``); credentials over plain
SMTP are refused unless ``BRIEFS_SMTP_ALLOW_INSECURE`` says the relay is trusted.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

from briefs.errors import PermanentError
from briefs.settings import redact_url

log = logging.getLogger(__name__)

SMTP_TIMEOUT = 30.0  # seconds per socket operation
SEND_BUDGET = 90.0  # seconds for the whole SMTP exchange; the socket is shut down past it
REPLY_MAX_LINES = 100  # of one SMTP reply (an EHLO reply has a dozen); a server sending more is cut off
SMTP_THREADS = 32  # SMTP exchanges in flight per process (more wait for a thread, holding no connection)
# smtplib's own limit on one reply line (a private name, absent from its type stubs).
_SMTP_LINE_MAX: int = getattr(smtplib, "_MAXLINE", 8192)


@dataclass(frozen=True)
class SmtpTarget:
    host: str
    port: int
    tls: str | None  # "implicit" (smtps), "starttls", or None (plain)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    where: str = ""  # the URL with its password redacted, for messages

    @classmethod
    def parse(cls, url: str, *, allow_insecure: bool = False) -> SmtpTarget:
        """``BRIEFS_SMTP_URL``, checked; a bad or unsafe one is a :class:`PermanentError` naming the setting."""
        where = redact_url(url)
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
            raise PermanentError("BRIEFS_SMTP_URL contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise PermanentError(f"BRIEFS_SMTP_URL is not a valid URL ({exc}): {where}") from None
        scheme = parts.scheme.lower()
        tls = {"smtp": None, "smtps": "implicit", "smtp+starttls": "starttls"}.get(scheme, "?")
        if tls == "?":
            raise PermanentError(f"BRIEFS_SMTP_URL: unsupported scheme {scheme!r} (use smtp, smtp+starttls or smtps)")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if (username or password) and tls is None and not allow_insecure:
            raise PermanentError(
                "BRIEFS_SMTP_URL has credentials but no TLS: refusing to send the SMTP password in clear text. "
                "Use smtps:// or smtp+starttls://, or set BRIEFS_SMTP_ALLOW_INSECURE=true for a trusted local relay"
            )
        host = parts.hostname or "localhost"
        default_port = {None: 25, "implicit": 465, "starttls": 587}[tls]
        return cls(host, port or default_port, tls, username, password, where)


_THREADS: list[ThreadPoolExecutor] = []
_THREADS_LOCK = threading.Lock()


def smtp_threads() -> ThreadPoolExecutor:
    """The threads SMTP exchanges block in: their own, so slow servers never take the event loop's default
    executor (which also resolves host names for new database connections). Threads start on demand."""
    with _THREADS_LOCK:
        if not _THREADS:
            _THREADS.append(ThreadPoolExecutor(max_workers=SMTP_THREADS, thread_name_prefix="briefs-smtp"))
        return _THREADS[0]


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class SMTPReplyTooLong(smtplib.SMTPException):
    """The server's reply broke the bounds (a line over 8 KiB, more than :data:`REPLY_MAX_LINES` lines)."""


class _BoundedReplies:
    """smtplib's ``getreply`` with a bound on the lines of one reply.

    smtplib keeps every continuation line ("250-…") of a reply in memory: a server that never
    ends its reply grew the worker by gigabytes before the send budget cut it. A line over
    smtplib's limit was reported as the server's own "500 Line too long." (a permanent refusal
    it never sent); both are now :class:`SMTPReplyTooLong`, a fault to retry.
    """

    sock: Any
    file: Any
    close: Any  # smtplib.SMTP's

    def getreply(self) -> tuple[int, bytes]:
        lines: list[bytes] = []
        if self.file is None:
            self.file = self.sock.makefile("rb")
        while True:
            try:
                line = self.file.readline(_SMTP_LINE_MAX + 1)
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from None
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            if len(line) > _SMTP_LINE_MAX:
                self.close()
                raise SMTPReplyTooLong(f"the server sent a reply line over {_SMTP_LINE_MAX} bytes")
            lines.append(line[4:].strip(b" \t\r\n"))
            if len(lines) > REPLY_MAX_LINES:
                self.close()
                raise SMTPReplyTooLong(f"the server sent a reply of more than {REPLY_MAX_LINES} lines")
            try:
                code = int(line[:3])
            except ValueError:
                return -1, b"\n".join(lines)
            if line[3:4] != b"-":
                return code, b"\n".join(lines)


class _SMTP(_BoundedReplies, smtplib.SMTP):
    pass


class _SMTP_SSL(_BoundedReplies, smtplib.SMTP_SSL):
    pass


def smtp_send(target: SmtpTarget, message: EmailMessage | bytes, from_addr: str, to_addr: str, *,
              budget: float = SEND_BUDGET, timeout: float = SMTP_TIMEOUT) -> None:
    """Send ``message`` to exactly ``to_addr`` (blocking: run it in a thread).

    ``message`` may be the bytes already serialised for the wire (CRLF line ends): what ``send_message``
    would make of it for ASCII addresses, which are the only ones briefs sends to or from (checked when
    the addresses are read), without serialising it once more.

    TLS as ``target`` says (no fallback to plain); credentials only over TLS unless the target was
    parsed with ``allow_insecure``. Past ``budget`` seconds the socket is shut down and TimeoutError raised.
    """
    holder: list[smtplib.SMTP] = []
    expired = threading.Event()
    timer = threading.Timer(budget, _cut, (holder, expired))
    timer.daemon = True
    timer.start()
    try:
        holder.append(_connect(target, timeout))
        server = holder[0]
        _open_session(server, target)
        if isinstance(message, bytes):
            server.sendmail(from_addr, [to_addr], message)
        else:
            server.send_message(message, from_addr=from_addr, to_addrs=[to_addr])
        try:
            server.quit()
        except (OSError, smtplib.SMTPException):
            pass  # the message was accepted; a rude goodbye changes nothing
    except (OSError, smtplib.SMTPException) as exc:
        if expired.is_set():
            raise TimeoutError(f"the SMTP exchange took longer than {budget:g}s and was cut") from exc
        raise
    finally:
        timer.cancel()
        if holder:
            holder[0].close()


def _cut(holder: list[smtplib.SMTP], expired: threading.Event) -> None:
    """The send budget ran out: note it and shut the socket down, so the blocked exchange fails at once."""
    expired.set()
    sock = getattr(holder[0], "sock", None) if holder else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _connect(target: SmtpTarget, timeout: float) -> smtplib.SMTP:
    """A connection to the server (TLS from the start for ``smtps``), its greeting read."""
    if target.tls == "implicit":
        return _SMTP_SSL(target.host, target.port, timeout=timeout, context=_tls_context())
    return _SMTP(target.host, target.port, timeout=timeout)


def _open_session(server: smtplib.SMTP, target: SmtpTarget) -> None:
    """EHLO, STARTTLS when the target says so (never carrying on in plain text), and the login if any."""
    server.ehlo()
    if target.tls == "starttls":
        if not server.has_extn("starttls"):
            raise smtplib.SMTPNotSupportedError(
                "the server does not offer STARTTLS; refusing to continue without TLS (BRIEFS_SMTP_URL)")
        code, reply = server.starttls(context=_tls_context())
        if code != 220:  # smtplib returns a refusal instead of raising: never carry on in plain text
            raise smtplib.SMTPResponseException(code, reply)
        server.ehlo()
    if target.username or target.password:
        if not isinstance(server.sock, ssl.SSLSocket):
            log.warning("sending SMTP credentials without TLS (BRIEFS_SMTP_ALLOW_INSECURE) to %s", target.where)
        server.login(target.username or "", target.password or "")
