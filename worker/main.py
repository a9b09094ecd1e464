"""The worker process: ``python -m worker`` and ``briefs worker``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from briefs.db import Database
from briefs.migrate import require_schema
from briefs.process import exit_now, install_stop_signals
from briefs.settings import Settings
from worker.brief_handlers import warn_if_email_unusable
from worker.handlers import build_handlers
from worker.runner import Worker, WorkerStats

log = logging.getLogger(__name__)


async def close_services(services: dict[str, Any]) -> None:
    for service in services.values():
        closer = getattr(service, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except Exception:
                log.warning("closing %r failed", service, exc_info=True)


def health_max_age(settings: Settings) -> float:
    """How stale the claim loop's last cycle may be before /healthz fails.

    The loop marks a cycle at least every poll interval, busy or idle; three of
    them plus ten seconds of slack. During a database outage the loop backs off
    and the check fails, which is the truth.
    """
    return 3 * settings.poll_interval + 10


async def serve(
    settings: Settings,
    *,
    concurrency: int | None = None,
    burst: bool = False,
    db: Database | None = None,
    signals: bool = True,
) -> WorkerStats:
    """Run a worker until it is stopped (or, with ``burst``, until the queue is drained)."""
    own_db = db is None
    if db is None:
        db = await Database.connect(settings)
    services: dict[str, Any] = {}
    health = None
    try:
        async with db.raw() as conn:
            await require_schema(conn)
        handlers = build_handlers(settings)
        warn_if_email_unusable(settings)
        worker = Worker(db, settings, handlers, concurrency=concurrency, burst=burst, services=services)
        if signals:
            def hard() -> None:
                worker.abort()
                asyncio.get_running_loop().call_later(2.0, exit_now, 1)

            install_stop_signals(worker.stop, hard)
        if settings.health_port:
            from briefs.health import HealthServer

            health = HealthServer(db, settings.health_port)
            health.watch("worker", lambda: worker.stats.last_cycle, health_max_age(settings))
            await health.start()
        return await worker.run()
    finally:
        if health is not None:
            await health.stop()
        await close_services(services)
        if own_db:
            await db.dispose()


def main(argv: list[str] | None = None) -> int:
    from briefs.cli import main as cli_main

    return cli_main(["worker", *(argv or [])])
