"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, collecting what it receives.

The aiosmtpd ``Controller`` runs the server's own event loop in a thread, so it
works with whatever loop (or none) the test uses::

    with SMTPServer() as smtp:
        settings = make_settings(url, smtp_url=smtp.url)
        ...
        [msg] = smtp.messages          # email.message.EmailMessage
        assert msg["Subject"] == ...
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage


class _Handler:
    def __init__(self, server: SMTPServer) -> None:
        self.server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        owner = self.server
        with owner._lock:
            if owner._reject:
                return owner._reject.pop(0)
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        with owner._lock:
            owner.received.append(Received(envelope.mail_from, tuple(envelope.rcpt_tos), raw, message))  # type: ignore[arg-type]
            owner._arrived.notify_all()
        return "250 Message accepted for delivery"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SMTPServer:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self._reject: list[str] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._controller: Controller | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [r.message for r in self.received]

    def reject_next(self, reply: str = "451 4.3.0 try again later", times: int = 1) -> None:
        """The next ``times`` messages get ``reply`` instead of being accepted."""
        with self._lock:
            self._reject.extend([reply] * times)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            return [r.message for r in self.received]

    def start(self) -> SMTPServer:
        for _ in range(5):
            port = _free_port()
            controller = Controller(_Handler(self), hostname="127.0.0.1", port=port, ready_timeout=5.0)
            try:
                controller.start()
            except Exception:  # the port was taken between probing and binding: try another
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError("could not start the test SMTP server")

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
