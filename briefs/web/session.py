"""The checks routes depend on: who is asking, and whether a state change carries its CSRF token.

* :func:`require_api` — the API: ``Authorization: Bearer <token>``, or the console's session cookie
  (its scripts read the API); a cookie-authenticated request that changes state must send the
  session's CSRF token in ``X-CSRF-Token``. Failing: 401 problem+json with ``WWW-Authenticate``.
* :func:`require_page` — a console page: the session cookie, else a redirect to ``/login?next=…``.
* :func:`require_form` — a console form post: the session cookie and the form's ``csrf`` field.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request

from briefs.web.problems import Problem
from briefs.web.security import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, Session
from briefs.web.state import web

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(Exception):
    """A console page asked for without a session: answered with a redirect to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def current_session(request: Request) -> Session | None:
    return web(request).auth.session(request.cookies.get(SESSION_COOKIE))


async def require_api(request: Request) -> None:
    """Dependency of every API route (see the module docstring)."""
    auth = web(request).auth
    if auth.bearer_matches(request.headers.get("authorization")):
        return
    session = current_session(request)
    if session is not None:
        if request.method in SAFE_METHODS or auth.csrf_matches(session, request.headers.get(CSRF_HEADER)):
            return
        raise Problem(403, "a console session must send its CSRF token (X-CSRF-Token) to change anything",
                      slug="forbidden")
    raise Problem(
        401,
        "send the admin token: `Authorization: Bearer <BRIEFS_ADMIN_TOKEN>`",
        headers={"WWW-Authenticate": 'Bearer realm="briefs"'},
    )


def _here(request: Request) -> str:
    path = request.url.path
    return path + (f"?{request.url.query}" if request.url.query else "")


async def require_page(request: Request) -> Session:
    """Dependency of every console page: the session, or a redirect to the login page."""
    session = current_session(request)
    if session is None:
        raise LoginRequired(_here(request))
    return session


async def require_form(request: Request) -> Session:
    """Dependency of every console form post: the session and its CSRF token (403 without it)."""
    session = current_session(request)
    if session is None:
        raise LoginRequired("/")
    form = await request.form()
    if not web(request).auth.csrf_matches(session, form.get(CSRF_FIELD)):
        raise Problem(403, "the form has expired or did not come from this console: reload the page and try again",
                      slug="forbidden")
    return session


def login_url(next_path: str) -> str:
    return f"/login?next={quote(next_path, safe='/')}"
