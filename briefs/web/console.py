"""The console's pages: server-rendered, behind the login."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from briefs.web.session import require_page
from briefs.web.state import web

router = APIRouter(include_in_schema=False)


@router.get("/", dependencies=[Depends(require_page)])
async def overview(request: Request) -> Response:
    return web(request).pages.render(request, "error.html", problem=None)
