"""What every console page shares: flash messages, the paths pages link to, JSON shown as text.

Nothing a user or a row supplies is ever put into a link here except through these builders, which take
integer ids and ISO dates only (a value that is neither gets no link).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse

from briefs.web.state import web

# ?done=<code> after a form post: the message shown (a fixed text per code, never one from the URL).
FLASHES: dict[str, tuple[str, str]] = {
    "retried": ("ok", "The job is queued to run again."),
    "cancelled": ("ok", "The job is cancelled."),
    "retried_all": ("ok", "The failed jobs of this type are queued to run again."),
    "retried_none": ("ok", "There was no failed job of this type to retry."),
    "saved": ("ok", "The preference is saved; the user's scheduled briefs follow it."),
    "brief_queued": ("ok", "A brief is queued for today; it appears below when it is written."),
}


@dataclass(frozen=True)
class Flash:
    kind: str
    text: str


def flash_of(request: Request) -> Flash | None:
    found = FLASHES.get(request.query_params.get("done", ""))
    if found is None:
        return None
    kind, text = found
    count = request.query_params.get("n", "")
    if count.isdigit() and len(count) < 10:
        text = f"{text} ({int(count):,} jobs)"
    return Flash(kind, text)


def redirect(path: str, done: str, **extra: int) -> RedirectResponse:
    """Back to a console page after a form post (303: the browser GETs it), with a flash code."""
    query = urlencode({"done": done, **{k: str(v) for k, v in extra.items()}})
    return RedirectResponse(f"{path}{'&' if '?' in path else '?'}{query}", status_code=303)


def iso_date(value: object) -> str | None:
    """``value`` as an ISO date when it is one (a date, or text that parses as one), else None."""
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str) and len(value) == 10:
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            return None
    return None


def brief_path(user_id: object, brief_date: object) -> str | None:
    """``/users/<id>/briefs/<date>`` for an integer id and an ISO date; None for anything else."""
    day = iso_date(brief_date)
    if isinstance(user_id, bool) or not isinstance(user_id, int) or day is None:
        return None
    return f"/users/{user_id}/briefs/{day}"


def pretty(value: Any) -> str:
    """A JSON value as indented text for a ``<pre>`` (escaped by the template like any text)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):
        return repr(value)[:10_000]


def page_href(path: str, params: dict[str, object]) -> str:
    """``path`` with the non-empty ``params`` as its query (each value URL-encoded)."""
    query = urlencode({k: str(v) for k, v in params.items() if v is not None and v != ""})
    return f"{path}?{query}" if query else path


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A console page with the shared helpers and the flash message of ``?done=``."""
    context.setdefault("flash", flash_of(request))
    context.setdefault("error", None)
    return web(request).pages.render(request, name, status, pretty=pretty, brief_path=brief_path, **context)
