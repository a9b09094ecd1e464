"""Errors as ``application/problem+json`` (RFC 9457) for the API, and as pages for the console.

Every error the API returns has ``type``, ``title``, ``status``, ``detail`` and ``instance``;
validation errors add ``errors`` (one entry per field: where, and what is wrong, never the
rejected input itself, which may be huge or hostile). A ``type`` is a URI reference to the
problem's entry in the API docs (``/api/docs#problem-<slug>``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from html import escape
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from briefs.terminal import one_line

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

# slug -> (status, title): the problem types the API documents.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "bad-request": (400, "Bad request"),
    "unauthorized": (401, "Authentication required"),
    "forbidden": (403, "Forbidden"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "conflict": (409, "Conflict"),
    "validation": (422, "Invalid request"),
    "unavailable": (503, "Service unavailable"),
    "internal": (500, "Internal error"),
}
_SLUG_OF_STATUS = {status: slug for slug, (status, _) in PROBLEM_TYPES.items()}


def problem_type(slug: str) -> str:
    return f"/api/docs#problem-{slug}"


class Problem(Exception):
    """An error to answer with: ``raise Problem(409, "the brief exists", brief_url=…)``."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug or _SLUG_OF_STATUS.get(status, "bad-request" if status < 500 else "internal")
        self.title = title or PROBLEM_TYPES.get(self.slug, (status, "Error"))[1]
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_body(request: Request, problem: Problem) -> dict[str, Any]:
    return {
        "type": problem_type(problem.slug),
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
        **problem.extra,
    }


def is_api(request: Request) -> bool:
    """Whether the request is for the JSON API (errors as problem+json) rather than a console page."""
    path = request.url.path
    return path.startswith("/api/") or path in ("/healthz", "/readyz", "/metrics")


def field_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    """pydantic's errors as ``{"field": "body.timezone", "message": "…"}``, without the rejected input."""
    out = []
    for error in errors[:50]:
        loc = ".".join(str(part) for part in error.get("loc", ()))
        out.append({"field": one_line(loc, 200), "message": one_line(str(error.get("msg", "invalid")), 500)})
    return out


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    if not is_api(request):
        return error_page(request, exc)
    return JSONResponse(problem_body(request, exc), exc.status, headers=exc.headers, media_type=PROBLEM_JSON)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return await _problem(request, Problem(422, one_line(detail, 1000), errors=errors))


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else PROBLEM_TYPES.get(
        _SLUG_OF_STATUS.get(exc.status_code, ""), (0, "Error"))[1]
    return await _problem(request, Problem(exc.status_code, detail, headers=dict(exc.headers or {})))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, one_line(request.url.path, 200))
    return await _problem(request, Problem(500, "an unexpected error; the server log has the details"))


def error_page(request: Request, problem: Problem) -> Response:
    """A console page for an error (the console's own layout when it can render, plain HTML otherwise)."""
    render = getattr(request.app.state, "render_error", None)
    if render is not None:
        try:
            response: Response = render(request, problem)
            return response
        except Exception:
            log.exception("rendering the error page failed")
    body = f"<!doctype html><title>{problem.status}</title><h1>{escape(problem.title)}</h1><p>{escape(problem.detail)}"
    return HTMLResponse(body, problem.status, headers=problem.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
