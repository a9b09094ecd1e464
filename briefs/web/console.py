"""The console's pages: server-rendered, behind the login; a little script (``/static/console.js``) keeps
the live parts current by reading the JSON API.

* ``/``: the overview (:mod:`briefs.web.console_overview`);
* ``/jobs``, ``/jobs/<id>``: the queue (:mod:`briefs.web.console_jobs`);
* ``/users``, ``/users/<id>``, ``/users/<id>/briefs/<date>``: users, their preferences and briefs
  (:mod:`briefs.web.console_users`, :mod:`briefs.web.console_briefs`).
"""

from __future__ import annotations

from fastapi import APIRouter

from briefs.web import console_briefs, console_jobs, console_overview, console_users

router = APIRouter(include_in_schema=False)
router.include_router(console_overview.router)
router.include_router(console_jobs.router)
router.include_router(console_users.router)
router.include_router(console_briefs.router)
