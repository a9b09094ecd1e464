"""The overview ``/``: the queue's numbers and charts, workers, the scheduler and the LLM.

The page is drawn from the same snapshot ``GET /api/v1/stats`` serves (:mod:`briefs.web.stats`, one
cache for both); ``console.js`` then polls that endpoint every second and redraws the numbers and the
charts in place.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from briefs.web import stats
from briefs.web.console_common import page_href, render
from briefs.web.session import require_page
from briefs.web.state import web

router = APIRouter(include_in_schema=False)


def number(value: object, fmt: str = "") -> str:
    """A number as the script shows it too: thousands separated, up to 3 decimals (1 with ``fixed1``)."""
    if value is None or isinstance(value, bool):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if fmt == "fixed1":
            return f"{value:,.1f}"
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value)[:60]


def jobs_href(job_type: object) -> str:
    return page_href("/jobs", {"type": str(job_type)})


@router.get("/", dependencies=[Depends(require_page)])
async def overview(request: Request) -> Response:
    state = web(request)
    snapshot = await stats.for_app(request.app, state.db).get()
    return render(request, "overview.html", stats=snapshot, number=number, jobs_href=jobs_href)
