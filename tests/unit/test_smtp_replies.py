"""An SMTP server whose replies break the bounds: a retryable fault, bounded memory, an honest reason."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from briefs.email import _classify
from briefs.errors import RetryLater
from briefs.smtp import REPLY_MAX_LINES, SMTPReplyTooLong, SmtpTarget, smtp_send


def _serve_once(greeting: bytes) -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(greeting)
                conn.recv(1024)
            except OSError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(10)


@pytest.fixture
def endless_reply() -> Iterator[int]:
    # 200,000 continuation lines (20 MB) before the greeting ends: smtplib kept every one in
    # memory (a server that never ends its reply grew the worker by gigabytes).
    yield from _serve_once((b"220-" + b"y" * 96 + b"\r\n") * 200_000 + b"220 ok\r\n")


@pytest.fixture
def long_line() -> Iterator[int]:
    yield from _serve_once(b"220 " + b"x" * 100_000 + b"\r\n")


def _send(port: int) -> BaseException:
    message = EmailMessage()
    message["Subject"] = "s"
    message.set_content("body")
    target = SmtpTarget("127.0.0.1", port, None)
    with pytest.raises(SMTPReplyTooLong) as err:
        smtp_send(target, message, "a@example.com", "b@example.com", budget=60, timeout=30)
    return _classify(err.value, target)


def test_a_reply_without_end_is_cut_after_the_line_bound(endless_reply: int) -> None:
    outcome = _send(endless_reply)
    assert isinstance(outcome, RetryLater)
    assert f"more than {REPLY_MAX_LINES} lines" in str(outcome)


def test_an_over_long_line_is_not_reported_as_the_servers_refusal(long_line: int) -> None:
    # smtplib raised SMTPResponseException(500, "Line too long."): stored as "refused: 500", permanent.
    outcome = _send(long_line)
    assert isinstance(outcome, RetryLater)
    assert "reply line over 8192 bytes" in str(outcome) and "refused" not in str(outcome)


def test_a_message_sent_as_its_wire_bytes_arrives_as_send_message_would_send_it() -> None:
    from email.message import EmailMessage

    from briefs.email import POLICY, wire_bytes
    from tests.smtp import SMTPServer

    message = EmailMessage(policy=POLICY)
    message["Subject"] = "Résumé of the day " + "long words " * 20
    message["From"] = "Briefs <briefs@example.com>"
    message["To"] = "Ada <ada@example.com>"
    message.set_content("plain ✓\n.\n.. a line with dots\n")
    message.add_alternative("<p>html ✓</p>", subtype="html")
    wire = wire_bytes(message)  # serialising sets the multipart boundary, as build_email's measuring does
    with SMTPServer() as server:
        target = SmtpTarget.parse(server.url)
        smtp_send(target, message, "briefs@example.com", "ada@example.com")
        smtp_send(target, wire, "briefs@example.com", "ada@example.com")
        server.wait_for(2)
        first, second = server.received
    assert first.raw == second.raw and first.rcpt_tos == second.rcpt_tos == ("ada@example.com",)
