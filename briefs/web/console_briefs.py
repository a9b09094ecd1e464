"""The brief viewer ``/users/<id>/briefs/<date>``: the email in a sandboxed frame (no scripts, a unique
origin: ``/api/v1/…/email.html`` is served with its own sandbox CSP), its text part and Markdown as tabs,
each project's section with its status and error, and live progress while the brief is written.

The brief is read by the API's own route function (:func:`briefs.web.api_briefs.get_brief`).
"""

from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from briefs.web import api_briefs, api_users
from briefs.web.console_common import render
from briefs.web.session import require_page

router = APIRouter(include_in_schema=False)

EMAILABLE = ("completed", "partial")


@router.get("/users/{user_id}/briefs/{brief_date}", dependencies=[Depends(require_page)])
async def brief_page(request: Request, user_id: int, brief_date: date) -> Response:
    user = await api_users.user_or_404(request, user_id)
    brief = await api_briefs.get_brief(request, user_id, brief_date)
    return render(request, "brief.html", user=user, brief=brief, day=brief_date.isoformat(),
                  emailable=brief.get("status") in EMAILABLE)
