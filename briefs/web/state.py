"""What every route reaches through ``request.app.state.web``: :func:`web` returns it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request

from briefs.db import Database
from briefs.health import HealthServer
from briefs.settings import Settings
from briefs.web.pages import Pages
from briefs.web.security import AdminAuth
from scheduler import report as tick_log
from scheduler.report import TickReport
from scheduler.tick import run_tick

log = logging.getLogger(__name__)


@dataclass
class WebState:
    db: Database
    settings: Settings
    auth: AdminAuth
    pages: Pages
    health: HealthServer  # its checks and its own connection only: never started as a server

    async def after_preference_change(self, user_id: int) -> TickReport:
        """Reconcile one user's pending scheduler jobs with their changed preference or timezone: the
        scheduler's own tick, restricted to that user (one implementation of moving and cancelling),
        recorded in the tick log like every tick."""
        report = await run_tick(self.db, self.settings, datetime.now(UTC), user_id=user_id)
        try:
            async with self.db.raw() as conn:
                await tick_log.record_tick(conn, report, user_id=user_id)
        except Exception:
            log.warning("recording the one-user tick of user %s failed", user_id, exc_info=True)
        return report


def web(request: Request) -> WebState:
    state = request.app.state.web
    assert isinstance(state, WebState)
    return state
