"""``/login`` and ``/logout``: the admin token exchanged for a session cookie, and back.

``GET /login?token=…`` is the one-click login URL printed at start when the token was generated
(the process binds 127.0.0.1 only then): it sets the cookie and redirects at once, so the token
does not linger in the address bar. A wrong token gets the form again with an error, after the
same work as a right one (the comparison is constant-time; nothing else depends on the token).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from briefs.web.security import SESSION_COOKIE, SESSION_SECONDS, safe_next
from briefs.web.session import current_session, require_form
from briefs.web.state import web

router = APIRouter(include_in_schema=False)


def _secure(request: Request) -> bool:
    """Whether the cookie gets ``Secure``: the request came over HTTPS, or the public URL is https."""
    public = web(request).settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def _logged_in(request: Request, next_path: str) -> Response:
    _, cookie = web(request).auth.new_session()
    response = RedirectResponse(safe_next(next_path), status_code=303)
    response.set_cookie(
        SESSION_COOKIE, cookie, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="strict",
        secure=_secure(request),
    )
    return response


@router.get("/login")
async def login_page(request: Request, next: str = "/", token: str | None = None) -> Response:
    state = web(request)
    if token is not None:
        if state.auth.token_matches(token):
            return _logged_in(request, next)
        return state.pages.render(request, "login.html", 401, next=safe_next(next), error="That token is not right.")
    if current_session(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return state.pages.render(request, "login.html", next=safe_next(next), error=None)


@router.post("/login")
async def login(request: Request, token: str = Form(""), next: str = Form("/")) -> Response:
    state = web(request)
    if state.auth.token_matches(token):
        return _logged_in(request, next)
    return state.pages.render(request, "login.html", 401, next=safe_next(next), error="That token is not right.")


@router.post("/logout", dependencies=[Depends(require_form)])
async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
    return response
