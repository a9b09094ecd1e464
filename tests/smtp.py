"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, collecting what it receives.

The aiosmtpd ``Controller`` runs the server's own event loop in a thread, so it
works with whatever loop (or none) the test uses::

    with SMTPServer() as smtp:
        settings = make_settings(url, smtp_url=smtp.url)
        ...
        [msg] = smtp.messages          # email.message.EmailMessage
        assert msg["Subject"] == ...

Modes: ``hold_data()`` stalls every DATA command before replying until ``release()``
(a slow server; ``wait_held(n)`` waits until n senders are stalled); ``auth=(user,
password)`` offers AUTH and records every attempt with whether TLS was on;
``tls=tls_material(dir)`` offers STARTTLS with a self-signed certificate for 127.0.0.1
(with ``implicit_tls=True``: TLS from the first byte, as ``smtps://`` expects).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


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
            holding = owner._hold is not None and not owner._hold.is_set()
            if holding:
                owner.held += 1
                owner._arrived.notify_all()
        if holding:
            assert owner._hold is not None
            await asyncio.to_thread(owner._hold.wait)  # stall this session only; the server serves others
            with owner._lock:
                owner.held -= 1
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


    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        owner = self.server
        tls = session.ssl is not None
        ok = isinstance(data, LoginPassword) and owner.auth is not None and (
            data.login.decode(), data.password.decode()) == owner.auth
        with owner._lock:
            login = data.login.decode() if isinstance(data, LoginPassword) else ""
            owner.auth_attempts.append((mechanism, login, tls))
        return AuthResult(success=ok)


@dataclass(frozen=True)
class TLSMaterial:
    cert: Path  # self-signed, for 127.0.0.1: also the CA file a client must trust
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


def tls_material(directory: Path) -> TLSMaterial:
    """A self-signed certificate for 127.0.0.1 made with the ``openssl`` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make a test certificate")
    cert, key = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return TLSMaterial(cert, key)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SMTPServer:
    def __init__(self, *, auth: tuple[str, str] | None = None, tls: TLSMaterial | None = None,
                 implicit_tls: bool = False) -> None:
        self.received: list[Received] = []
        self.auth = auth
        self.tls = tls
        self.implicit_tls = implicit_tls  # with tls: TLS from the first byte (smtps://) instead of STARTTLS
        self.auth_attempts: list[tuple[str, str, bool]] = []  # (mechanism, login, TLS on)
        self.held = 0  # DATA commands stalled right now
        self._hold: threading.Event | None = None
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

    def hold_data(self) -> None:
        """From now on, stall every DATA command (before replying) until :meth:`release`."""
        with self._lock:
            self._hold = threading.Event()

    def release(self) -> None:
        with self._lock:
            if self._hold is not None:
                self._hold.set()

    def wait_held(self, count: int, timeout: float = 10.0) -> int:
        """Wait until ``count`` DATA commands are stalled; returns how many are."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.held < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            return self.held

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
            handler = _Handler(self)
            options: dict[str, Any] = {}
            if self.auth is not None:
                # Offered over plain connections too, so a test can see whether a client would send it.
                options.update(authenticator=handler.authenticate, auth_require_tls=False)
            if self.tls is not None:
                key = "ssl_context" if self.implicit_tls else "tls_context"
                options[key] = self.tls.server_context()
            controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=5.0, **options)
            try:
                controller.start()
            except Exception:  # the port was taken between probing and binding: try another
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError("could not start the test SMTP server")

    def stop(self) -> None:
        self.release()
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
