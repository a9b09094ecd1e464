"""The services a briefs process can run, built on the layers below for :class:`briefs.app.host.Host`.

* :class:`WorkerService` — the queue worker with every handler this application has:
  the worker's own (``noop``), the brief domain's (:mod:`briefs.jobs`) and the operator's
  (``BRIEFS_HANDLER_MODULES``);
* :class:`SchedulerService` — the APScheduler daemon that ticks the planner.

The coming web console is a service of the same shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from briefs import jobs, metrics
from briefs.app.host import Watch
from briefs.contract import JOB_TYPES
from briefs.db import Database
from briefs.settings import Settings
from scheduler.daemon import SchedulerDaemon, health_max_age
from worker.handlers import build_handlers
from worker.runner import Handler, Worker, WorkerStats


def label_job_types() -> None:
    """Metrics label the application's job types by name in every process (a scheduler-only
    process reports queue depth by job type too); any other type counts as "other"."""
    metrics.register_job_types(["noop", *JOB_TYPES])


def handlers(settings: Settings) -> dict[str, Handler]:
    """Every job type this application runs."""
    return build_handlers(settings, jobs.HANDLERS)


def worker_health_max_age(settings: Settings) -> float:
    """How stale the claim loop's last cycle may be before /healthz fails.

    The loop marks a cycle at least every poll interval, busy or idle; three of
    them plus ten seconds of slack. During a database outage the loop backs off
    and the check fails, which is the truth.
    """
    return 3 * settings.poll_interval + 10


class WorkerService:
    name = "worker"
    essential = True

    def __init__(
        self,
        db: Database,
        settings: Settings,
        resources: dict[str, Any],
        *,
        concurrency: int | None = None,
        burst: bool = False,
    ) -> None:
        jobs.warn_if_email_unusable(settings)
        label_job_types()
        self.settings = settings
        self.worker = Worker(db, settings, handlers(settings), concurrency=concurrency, burst=burst,
                             services=resources)
        self.stats: WorkerStats | None = None

    async def run(self) -> None:
        self.stats = await self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    def abort(self) -> None:
        self.worker.abort()

    def watches(self) -> Sequence[Watch]:
        return [Watch("worker", lambda: self.worker.stats.last_cycle, worker_health_max_age(self.settings))]


class SchedulerService:
    name = "scheduler"
    essential = True

    def __init__(self, db: Database, settings: Settings) -> None:
        label_job_types()
        self.settings = settings
        self.daemon = SchedulerDaemon(db, settings)
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Tick until stopped; a running tick finishes first."""
        await self.daemon.start()
        try:
            await self._stopped.wait()
        finally:
            await self.daemon.stop()

    def stop(self) -> None:
        self._stopped.set()

    def abort(self) -> None:
        self._stopped.set()  # the host exits shortly after, whatever the tick does

    def watches(self) -> Sequence[Watch]:
        return [Watch("scheduler", lambda: self.daemon.last_tick_completed, health_max_age(self.settings))]
