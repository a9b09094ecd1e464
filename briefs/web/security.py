"""Who may use the console and the API, and the headers every response carries.

* The API takes ``Authorization: Bearer <BRIEFS_ADMIN_TOKEN>``.
* The console exchanges the token (login form, or the one-click login URL printed at start)
  for a session cookie: ``<payload>.<signature>``, HMAC-SHA256 over the payload with a key
  derived from the token, so rotating the token ends every session. ``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` when the request came over HTTPS, ``Path=/``, 12 hours.
* A request authenticated by the cookie (the console's forms and its scripts) must carry the
  session's CSRF token to change anything: a ``csrf`` form field or an ``X-CSRF-Token``
  header, derived from the session by HMAC (nothing to store).
* Every comparison of a secret is constant-time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "briefs_session"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_COOKIE_CHARS = 512

# The console's policy: scripts and styles from this origin only (no inline script or style), frames only
# from this origin (the brief viewer's sandboxed email), never framed itself, forms post only here.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
# The brief's email, shown in the viewer's iframe: its inline styles and remote images as a mail client
# would, no script at all, a unique origin (sandbox), and framed by the console only.
EMAIL_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    sid: str
    expires: int


class AdminAuth:
    """The admin token, and the sessions and CSRF tokens derived from it."""

    def __init__(self, token: str, *, generated: bool = False) -> None:
        if not token:
            raise ValueError("the admin token is empty")
        self._token = token.encode("utf-8")
        self.generated = generated  # made at start (no BRIEFS_ADMIN_TOKEN): printed as a login URL
        self._key = hashlib.sha256(b"briefs console session\0" + self._token).digest()

    @classmethod
    def random(cls) -> AdminAuth:
        return cls(secrets.token_urlsafe(32), generated=True)

    @property
    def token(self) -> str:
        return self._token.decode("utf-8")

    def token_matches(self, candidate: object) -> bool:
        """Whether ``candidate`` is the admin token, compared in constant time (any type, any length)."""
        if not isinstance(candidate, str) or len(candidate) > 4096:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self._token)

    def bearer_matches(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header is ``Bearer <the admin token>``."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    # ------------------------------------------------------------------ sessions

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def new_session(self, now: float | None = None) -> tuple[Session, str]:
        """A fresh session and its cookie value."""
        session = Session(secrets.token_urlsafe(16), int((now or time.time()) + SESSION_SECONDS))
        payload = _b64(json.dumps({"sid": session.sid, "exp": session.expires}, separators=(",", ":")).encode())
        return session, f"{payload}.{self._sign(payload)}"

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie value carries, or None (absent, forged, altered, expired, malformed)."""
        if not cookie or len(cookie) > MAX_COOKIE_CHARS or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature.encode("ascii", "replace"), self._sign(payload).encode("ascii")):
            return None
        try:
            data: Any = json.loads(_unb64(payload))
            sid, expires = data["sid"], data["exp"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(sid, str) or not isinstance(expires, int) or expires < (now or time.time()):
            return None
        return Session(sid, expires)

    def csrf_token(self, session: Session) -> str:
        return _b64(hmac.new(self._key, b"csrf\0" + session.sid.encode("ascii"), hashlib.sha256).digest())

    def csrf_matches(self, session: Session, candidate: object) -> bool:
        if not isinstance(candidate, str) or len(candidate) > 256:
            return False
        return hmac.compare_digest(candidate.encode("ascii", "replace"), self.csrf_token(session).encode("ascii"))


def safe_next(target: object, default: str = "/") -> str:
    """A redirect target after login: a path on this site only (``/jobs?status=failed``), never another
    site (``//evil``, ``https://…``, ``/\\evil``) or a control character."""
    if not isinstance(target, str) or not target.startswith("/") or len(target) > 2000:
        return default
    if target.startswith(("//", "/\\")) or any(ord(c) < 0x21 or c == "\\" for c in target):
        return default
    return target


class SecurityHeaders:
    """Pure ASGI middleware: the security headers on every HTTP response that does not set its own CSP,
    and ``Server-Timing: app;dur=<ms>`` (the time from the request to the response's headers: what the
    benchmark in bench/web_bench.py reports as server time)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                took = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={took:.1f}".encode()))
                names = {name.lower() for name, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", CONSOLE_CSP.encode()))
                if b"x-frame-options" not in names:
                    headers.append((b"x-frame-options", b"DENY"))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                ]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
