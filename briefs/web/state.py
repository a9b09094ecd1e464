"""What every route reaches through ``request.app.state.web``: :func:`web` returns it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from briefs.db import Database
from briefs.health import HealthServer
from briefs.settings import Settings
from briefs.terminal import one_line
from briefs.web.pages import Pages
from briefs.web.security import AdminAuth
from scheduler import report as tick_log
from scheduler.tick import run_tick

log = logging.getLogger(__name__)

RECONCILED = ("moved", "cancelled", "enqueued", "skipped", "skipped_locked", "briefs_failed")


@dataclass
class WebState:
    db: Database
    settings: Settings
    auth: AdminAuth
    pages: Pages
    health: HealthServer  # its checks and its own connection only: never started as a server

    async def after_preference_change(self, user_id: int) -> dict[str, Any]:
        """Reconcile one user's pending scheduler jobs with their changed preference or timezone: the
        scheduler's own tick, restricted to that user (one implementation of moving and cancelling),
        recorded in the tick log like every tick. Returns what it did (:data:`RECONCILED`); when it
        fails (the change itself is saved), ``error`` says why and the next periodic tick reconciles."""
        try:
            report = await run_tick(self.db, self.settings, datetime.now(UTC), user_id=user_id)
        except Exception as exc:
            log.warning("reconciling user %s after a preference change failed (the next tick will): %s",
                        user_id, one_line(f"{type(exc).__name__}: {exc}", 300))
            return {"error": f"not reconciled now ({type(exc).__name__}); the scheduler's next tick will"}
        try:
            async with self.db.raw() as conn:
                await tick_log.record_tick(conn, report, user_id=user_id)
        except Exception:
            log.warning("recording the one-user tick of user %s failed", user_id, exc_info=True)
        done = report.to_dict()
        return {key: done.get(key) for key in RECONCILED}


def web(request: Request) -> WebState:
    state = request.app.state.web
    assert isinstance(state, WebState)
    return state
