"""The daemon: a tick at start and every interval, never two at once, missed ones as one late tick;
failures never kill it; stop() lets a tick finish."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.events import (
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from briefs.app.host import Host
from briefs.app.services import SchedulerService
from briefs.db import Database
from scheduler import daemon as daemon_mod
from scheduler.daemon import SchedulerDaemon
from scheduler.report import TickReport
from tests.conftest import SchedulerSeed, make_settings
from tests.polling import wait_for_async


def soon() -> str:
    """A local time (UTC) ten minutes from now: due within the default one-hour lookahead."""
    return (datetime.now(UTC) + timedelta(minutes=10)).strftime("%H:%M")


class FakeTick:
    """Stands in for ``run_tick`` where the daemon looks it up: counts calls, and how many ran at once.

    While ``hold`` is an event not set yet, every call waits for it: a tick that outlasts the interval.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.running = 0
        self.finished = 0  # calls that returned (not cancelled)
        self.most_at_once = 0
        self.hold: asyncio.Event | None = None

    async def __call__(self, db: Any, settings: Any, now: datetime, **kw: Any) -> TickReport:
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.hold is not None:
                await self.hold.wait()
            self.finished += 1
            return TickReport(now=now)
        finally:
            self.running -= 1


@pytest.fixture
def fake_tick(monkeypatch: pytest.MonkeyPatch) -> FakeTick:
    fake = FakeTick()
    monkeypatch.setattr(daemon_mod, "run_tick", fake)
    return fake


@pytest.fixture
def job_events(monkeypatch: pytest.MonkeyPatch) -> list[JobEvent]:
    """What became of each fire time of the daemon's APScheduler job: run, missed, or skipped (one was running)."""
    events: list[JobEvent] = []

    def recording_scheduler(*args: Any, **kwargs: Any) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(*args, **kwargs)
        scheduler.add_listener(events.append, EVENT_JOB_EXECUTED | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        return scheduler

    monkeypatch.setattr(daemon_mod, "AsyncIOScheduler", recording_scheduler)
    return events


def block_the_event_loop(seconds: float) -> None:
    """Keep the event loop busy, as a long synchronous call would: APScheduler sees no fire time meanwhile."""
    time.sleep(seconds)


def runs_between(events: list[JobEvent], start: datetime, end: datetime) -> list[int]:
    """The outcome (EVENT_JOB_EXECUTED or EVENT_JOB_MISSED) of each run scheduled from ``start`` to ``end``."""
    return [e.code for e in events if isinstance(e, JobExecutionEvent) and start <= e.scheduled_run_time <= end]


async def test_ticks_at_start_and_again(db: Database, database_url: str, sched_seed: SchedulerSeed) -> None:
    uid = sched_seed.user("UTC", soon())
    settings = make_settings(database_url, scheduler_interval=0.2)
    daemon = SchedulerDaemon(db, settings)
    await daemon.start()
    try:
        assert daemon.running
        await wait_for_async(lambda: daemon.ticks, what="the tick at start")
        assert daemon.last_report is not None and [e["user_id"] for e in daemon.last_report.enqueued] == [uid]
        await wait_for_async(lambda: daemon.ticks, what="three ticks", accept=lambda n: n >= 3)
    finally:
        await daemon.stop()
    assert not daemon.running
    assert daemon.last_tick_completed is not None and daemon.last_tick_completed <= time.monotonic()
    assert daemon.last_report is not None and daemon.last_report.deduplicated == 1
    assert len(sched_seed.jobs(uid)) == 1
    ticks = daemon.ticks
    await asyncio.sleep(0.4)
    assert daemon.ticks == ticks  # stopped means stopped


async def test_a_tick_longer_than_the_interval_never_overlaps_the_next(
    db: Database, database_url: str, fake_tick: FakeTick, job_events: list[JobEvent]
) -> None:
    fake_tick.hold = asyncio.Event()
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=0.05))
    await daemon.start()
    try:
        await wait_for_async(lambda: [e for e in job_events if e.code == EVENT_JOB_MAX_INSTANCES],
                             what="three fire times while the first tick runs",
                             accept=lambda skipped: len(skipped) >= 3)
        assert (fake_tick.calls, fake_tick.running) == (1, 1)  # they came and went; the slow tick still runs alone
        fake_tick.hold.set()
        # The daemon keeps ticking once the slow tick is over.
        await wait_for_async(lambda: daemon.ticks, what="two ticks after the slow one", accept=lambda n: n >= 3)
    finally:
        fake_tick.hold.set()  # stop() waits for the running tick
        await daemon.stop()
    assert fake_tick.most_at_once == 1
    assert daemon.last_error is None


async def test_fire_times_missed_while_the_loop_was_busy_run_as_one_tick(
    db: Database, database_url: str, fake_tick: FakeTick, job_events: list[JobEvent]
) -> None:
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=0.05))
    await daemon.start()
    try:
        await wait_for_async(lambda: daemon.ticks, what="the tick at start")
        busy_from = datetime.now(UTC)
        block_the_event_loop(0.5)  # nine fire times or more pass unseen
        busy_until = datetime.now(UTC)
        missed = await wait_for_async(lambda: runs_between(job_events, busy_from, busy_until),
                                      what="the fire times of the busy spell to be handled")
    finally:
        await daemon.stop()
    assert missed == [EVENT_JOB_EXECUTED]  # coalesced: one tick for them all, not a burst
    assert fake_tick.most_at_once == 1


async def test_a_tick_that_fires_late_still_runs(
    db: Database, database_url: str, fake_tick: FakeTick, job_events: list[JobEvent]
) -> None:
    """The next fire time after the tick at start is seen over a second late: past APScheduler's default grace
    (1 s), after which it would drop the run as missed. It runs. The loop is kept busy from now until 1.2 s
    past that fire time, worked out from the first run's, so a slow tick at start cannot move it out."""
    interval = 1.5
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=interval))
    await daemon.start()
    try:
        [first] = await wait_for_async(
            lambda: [e.scheduled_run_time for e in job_events if isinstance(e, JobExecutionEvent)][:1],
            what="the tick at start")
        busy_from = datetime.now(UTC)
        periods = math.floor((busy_from - first).total_seconds() / interval) + 1
        next_fire = first + timedelta(seconds=periods * interval)
        block_the_event_loop((next_fire - busy_from).total_seconds() + 1.2)
        busy_until = datetime.now(UTC)
        late = await wait_for_async(lambda: runs_between(job_events, busy_from, busy_until),
                                    what="the fire time of the busy spell to be handled")
    finally:
        await daemon.stop()
    assert late == [EVENT_JOB_EXECUTED]
    assert [e for e in job_events if e.code == EVENT_JOB_MISSED] == []


async def test_the_first_tick_runs_at_start(db: Database, database_url: str, sched_seed: SchedulerSeed) -> None:
    uid = sched_seed.user("UTC", soon())
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=3600))
    await daemon.start()
    try:
        # An hour-long interval: only the tick at start can be seen.
        await wait_for_async(lambda: daemon.ticks, what="the tick at start")
    finally:
        await daemon.stop()
    assert daemon.ticks == 1 and daemon.last_report is not None
    assert [e["user_id"] for e in daemon.last_report.enqueued] == [uid]


async def test_hostile_rows_never_fail_a_tick(db: Database, database_url: str, sched_seed: SchedulerSeed) -> None:
    good = sched_seed.user("UTC", soon())
    midnight = sched_seed.user("UTC", "24:00")
    forever = sched_seed.user("UTC", soon())
    sched_seed.execute("UPDATE users SET last_visit_at = 'infinity' WHERE id = %s", (forever,))
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=0.1))
    await daemon.start()
    try:
        await wait_for_async(lambda: daemon.ticks, what="two ticks", accept=lambda n: n >= 2)
    finally:
        await daemon.stop()
    assert daemon.last_error is None and daemon.last_report is not None
    assert {s["user_id"]: s["reason"].split(":")[0] for s in daemon.last_report.skipped} == {
        midnight: "invalid_preference",
        forever: "invalid_last_visit",
    }
    assert [j["user_id"] for j in sched_seed.jobs()] == [good]


async def test_a_failing_tick_does_not_kill_the_daemon(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[datetime] = []

    async def flaky(db: Any, settings: Any, now: datetime, **kw: Any) -> TickReport:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("database on fire")
        return TickReport(now=now)

    monkeypatch.setattr(daemon_mod, "run_tick", flaky)
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=0.1))
    await daemon.start()
    try:
        await wait_for_async(lambda: daemon.ticks, what="the failing tick")
        await wait_for_async(lambda: daemon.last_report, what="a tick that succeeds", accept=lambda r: r is not None)
    finally:
        await daemon.stop()
    assert daemon.last_error is None and len(calls) >= 2
    assert all(c.tzinfo is UTC for c in calls)


async def test_stop_lets_the_running_tick_finish(db: Database, database_url: str, fake_tick: FakeTick) -> None:
    fake_tick.hold = asyncio.Event()
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=60))
    await daemon.start()
    await wait_for_async(lambda: fake_tick.running, what="the tick at start to begin")
    stopping = asyncio.create_task(daemon.stop())
    await wait_for_async(lambda: not daemon.running, what="stop() to stop the firing")
    assert not stopping.done()  # it waits for the tick
    fake_tick.hold.set()
    await stopping
    assert fake_tick.finished == 1  # the tick ran to its end, not cancelled
    assert daemon.last_report is not None and daemon.ticks == 1


async def test_the_scheduler_service_ticks_in_a_host_until_stopped(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", soon())
    settings = make_settings(database_url, scheduler_interval=30)
    service = SchedulerService(db, settings)

    async def build(db: Database, resources: dict[str, Any]) -> list[SchedulerService]:
        return [service]

    task = asyncio.create_task(Host(settings, db=db, signals=False).run(build))
    await wait_for_async(lambda: sched_seed.jobs(uid), what="the job of the tick at start",
                         accept=lambda jobs: len(jobs) == 1)
    service.stop()
    assert await task == [service]
    assert service.daemon.ticks == 1 and not service.daemon.running
    await db.check()  # the caller's database is still usable (the host does not dispose it)
