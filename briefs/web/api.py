"""The JSON API under ``/api/v1``: every route needs the admin token or a console session
(:func:`briefs.web.session.require_api`); errors are ``application/problem+json``.

* ``/api/v1/stats`` (here): the overview's numbers (:mod:`briefs.web.stats`).
* ``/api/v1/jobs…``: :mod:`briefs.web.api_jobs`.
* ``/api/v1/users…``: :mod:`briefs.web.api_users`; their briefs: :mod:`briefs.web.api_briefs`.
* ``/api/docs``: the browsable form of ``/api/openapi.json`` (:mod:`briefs.web.api_docs`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from briefs.web import api_briefs, api_docs, api_jobs, api_users, stats
from briefs.web.problems import Problem
from briefs.web.schemas import problems
from briefs.web.session import require_api
from briefs.web.state import web

v1 = APIRouter(prefix="/api/v1", dependencies=[Depends(require_api)])


@v1.get("/stats", summary="The overview's numbers: jobs by status and type, throughput, wait and run times, "
        "workers, the last scheduler tick, LLM health and today's tokens (a snapshot at most ~1 s old)",
        tags=["stats"], responses=problems(401, 503))
async def get_stats(request: Request) -> dict[str, Any]:
    cache = stats.for_app(request.app, web(request).db)
    try:
        return await cache.get()
    except Exception as exc:
        raise Problem(503, f"the stats could not be computed: {type(exc).__name__}") from exc


v1.include_router(api_jobs.router)
v1.include_router(api_users.router)
v1.include_router(api_briefs.router)

router = APIRouter()
router.include_router(v1)
router.include_router(api_docs.router)
