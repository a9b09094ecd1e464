"""The console's secrets: the admin token, session cookies, CSRF tokens, redirects after login, headers."""

from __future__ import annotations

import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from briefs.web.security import CONSOLE_CSP, AdminAuth, SecurityHeaders, safe_next

TOKEN = "an-admin-token-of-some-length-0123456789"


def test_the_token_matches_only_itself() -> None:
    auth = AdminAuth(TOKEN)
    assert auth.token_matches(TOKEN)
    for wrong in (TOKEN[:-1], TOKEN + "x", "", None, 42, TOKEN.upper(), "é" * 40, "x" * 10_000):
        assert not auth.token_matches(wrong)
    assert auth.bearer_matches(f"Bearer {TOKEN}") and auth.bearer_matches(f"bearer {TOKEN}")
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", "Bearer"):
        assert not auth.bearer_matches(header)


def test_a_session_cookie_is_signed_with_the_token_and_expires() -> None:
    auth = AdminAuth(TOKEN)
    session, cookie = auth.new_session()
    assert auth.session(cookie) == session
    payload, signature = cookie.split(".")
    flipped = "B" if signature[-1] == "A" else "A"
    assert auth.session(f"{payload}.{signature[:-1]}{flipped}") is None  # altered signature
    assert auth.session(f"{payload}x.{signature}") is None  # altered payload
    assert AdminAuth(TOKEN + "-rotated").session(cookie) is None  # a new token ends every session
    assert auth.session(cookie, now=session.expires + 1) is None
    for junk in ("", ".", "a.b.c", "x" * 600, "%%%.%%%", "e30.e30"):
        assert auth.session(junk) is None


def test_a_forged_session_with_a_valid_shape_is_refused() -> None:
    auth = AdminAuth(TOKEN)
    _, forged = AdminAuth("another-token-entirely-0123456789").new_session()
    assert auth.session(forged) is None
    _, cookie = auth.new_session(now=time.time() - 13 * 3600)  # issued 13 h ago: 12 h sessions
    assert auth.session(cookie) is None


def test_csrf_tokens_belong_to_their_session() -> None:
    auth = AdminAuth(TOKEN)
    one, _ = auth.new_session()
    two, _ = auth.new_session()
    assert auth.csrf_matches(one, auth.csrf_token(one))
    assert not auth.csrf_matches(one, auth.csrf_token(two))
    for junk in (None, "", 7, "x" * 1000):
        assert not auth.csrf_matches(one, junk)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/jobs?status=failed", "/jobs?status=failed"),
        ("/users/7", "/users/7"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_login_redirects_stay_on_this_site(target: object, expected: str) -> None:
    assert safe_next(target) == expected


async def test_every_response_carries_the_security_headers() -> None:
    async def page(request: object) -> Response:
        return PlainTextResponse("hello")

    async def framed(request: object) -> Response:
        own = {"content-security-policy": "sandbox", "x-frame-options": "SAMEORIGIN"}
        return PlainTextResponse("mail", headers=own)

    app = SecurityHeaders(Starlette(routes=[Route("/", page), Route("/framed", framed)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        plain = await client.get("/")
        own = await client.get("/framed")
    assert plain.headers["content-security-policy"] == CONSOLE_CSP
    assert "script-src 'self'" in CONSOLE_CSP and "unsafe-inline" not in CONSOLE_CSP
    assert plain.headers["x-frame-options"] == "DENY"
    assert plain.headers["x-content-type-options"] == "nosniff"
    assert plain.headers["referrer-policy"] == "no-referrer"
    assert plain.headers["server-timing"].startswith("app;dur=")
    assert own.headers["content-security-policy"] == "sandbox" and own.headers["x-frame-options"] == "SAMEORIGIN"
