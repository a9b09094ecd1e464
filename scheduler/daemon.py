"""The scheduler daemon: APScheduler fires :func:`scheduler.tick.run_tick` every interval.

APScheduler 3.x (``AsyncIOScheduler``, UTC) runs one interval job:

* ``next_run_time=now``: a tick at start, then every ``BRIEFS_SCHEDULER_INTERVAL`` seconds;
* ``misfire_grace_time=None``: a tick that fires late (event loop busy, host suspended) still
  runs, however late; with a number, APScheduler would drop it as "missed";
* ``coalesce=True``: many missed fire times run as one tick, not a burst (each tick plans from
  its own ``now`` with catch-up, so one late tick covers them all);
* ``max_instances=1``: never two ticks at once in this process. If a tick outlasts the
  interval, APScheduler skips that fire time (with a warning) and the next tick runs at the
  following one.

Leadership among several scheduler processes is the tick's advisory lock, not this module.
A failing tick (database down, a bug) is logged and the daemon carries on at the next
interval. Every tick, failed or skipped (another scheduler held the lock) included, is then
written to the tick log (``scheduler_ticks``, :func:`scheduler.report.record_tick`) in a short
transaction of its own; a tick log that cannot be written is logged and never stops the daemon.
:meth:`SchedulerDaemon.stop` lets a running tick finish before shutting
APScheduler down (its asyncio executor would otherwise cancel the tick).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from briefs.db import Database, is_connection_error
from briefs.settings import Settings
from briefs.terminal import one_line
from scheduler.report import TickReport, record_tick
from scheduler.tick import run_tick

log = logging.getLogger(__name__)

JOB_ID = "briefs-scheduler-tick"
RECORD_TIMEOUT = 5.0  # seconds to write one tick to the tick log


class SchedulerDaemon:
    """Runs a tick at start and then every ``settings.scheduler_interval`` seconds."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.last_tick_completed: float | None = None  # time.monotonic() at the end of the last tick
        self.last_report: TickReport | None = None
        self.last_error: str | None = None
        self.ticks = 0  # ticks finished (successfully or not)
        self._scheduler: AsyncIOScheduler | None = None
        self._current: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    async def start(self) -> None:
        if self._scheduler is not None:
            raise RuntimeError("the scheduler daemon is already started")
        self._stopping = False
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_job(
            self._fire,
            IntervalTrigger(seconds=self.settings.scheduler_interval, timezone=UTC),
            id=JOB_ID,
            name="scheduler tick",
            next_run_time=datetime.now(UTC),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=None,
        )
        scheduler.start()
        self._scheduler = scheduler
        log.info("scheduler started: a tick every %gs", self.settings.scheduler_interval)

    async def stop(self) -> None:
        """Stop firing, let a running tick finish, then shut APScheduler down."""
        self._stopping = True
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and scheduler.running:
            scheduler.pause()
        current = self._current
        if current is not None and not current.done():
            log.info("waiting for the running tick to finish")
            await asyncio.wait({current})
        if scheduler is not None and scheduler.running:
            scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # AsyncIOScheduler shuts down in a loop callback
        log.info("scheduler stopped")

    async def _fire(self) -> None:
        """The APScheduler job: run the tick as its own task so stop() can wait for it."""
        if self._stopping:
            return
        task = asyncio.ensure_future(self._tick())
        self._current = task
        await asyncio.shield(task)

    async def _tick(self) -> None:
        now = datetime.now(UTC)
        started = time.perf_counter()
        try:
            report = await run_tick(self.db, self.settings, now)
        except Exception as exc:
            self.last_error = one_line(f"{type(exc).__name__}: {exc}", 500)
            if is_connection_error(exc):
                log.warning(
                    "tick failed, database unavailable (next try in %gs): %s", self.settings.scheduler_interval, exc
                )
            else:
                log.exception("tick failed (next try in %gs)", self.settings.scheduler_interval)
            await self._log_tick(TickReport(now=now, duration_s=time.perf_counter() - started), self.last_error)
        else:
            self.last_report = report
            self.last_error = None
            self.last_tick_completed = time.monotonic()
            await self._log_tick(report, None)
        finally:
            self.ticks += 1

    async def _log_tick(self, report: TickReport, error: str | None) -> None:
        """Write the tick to the tick log; a failure to do so is logged, never raised."""
        try:
            # Bounded: during a database outage the pool would wait its full timeout for a connection,
            # delaying the next tick and stop() for a log line.
            async with asyncio.timeout(RECORD_TIMEOUT), self.db.raw() as conn:
                await record_tick(conn, report, error=error)
        except Exception as exc:
            log.warning("could not write the tick at %s to the tick log: %s", report.now.isoformat(),
                        one_line(f"{type(exc).__name__}: {exc}", 500))


def health_max_age(settings: Settings) -> float:
    """How stale the last completed tick may be before /healthz fails: three intervals and a minute."""
    return 3 * settings.scheduler_interval + 60
