"""Rendering console pages: one Jinja2 environment that escapes everything, and the page context.

Every page gets ``csrf`` (the session's CSRF token, for forms and for the scripts' ``X-CSRF-Token``,
read from ``<meta name="csrf-token">``), ``session`` (or None) and ``path``. Autoescaping is on for
every template, whatever its name: a user's or the model's text is always shown as text.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from importlib import resources
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from briefs.web.problems import Problem
from briefs.web.security import SESSION_COOKIE, AdminAuth


def when(value: object) -> str:
    """An instant for a page: UTC, to the second; a value Python could not hold comes as its text."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    if value is None:
        return "-"
    return str(value)[:60]


class Pages:
    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(resources.files("briefs.web") / "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = when

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        auth: AdminAuth = request.app.state.web.auth
        session = auth.session(request.cookies.get(SESSION_COOKIE))
        html = self.env.get_template(name).render(
            request=request,
            path=request.url.path,
            session=session,
            csrf=auth.csrf_token(session) if session is not None else "",
            **context,
        )
        return HTMLResponse(html, status)

    def error(self, request: Request, problem: Problem) -> HTMLResponse:
        response = self.render(request, "error.html", problem.status, problem=problem)
        response.headers.update(problem.headers)
        return response
