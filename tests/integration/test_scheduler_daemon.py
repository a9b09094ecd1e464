"""The daemon: a tick at start and every interval; failures never kill it; stop() lets a tick finish."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from briefs.app.host import Host
from briefs.app.services import SchedulerService
from briefs.db import Database
from scheduler import daemon as daemon_mod
from scheduler.daemon import SchedulerDaemon
from scheduler.tick import TickReport
from tests.conftest import SchedulerSeed, make_settings
from tests.polling import wait_for_async


def soon() -> str:
    """A local time (UTC) ten minutes from now: due within the default one-hour lookahead."""
    return (datetime.now(UTC) + timedelta(minutes=10)).strftime("%H:%M")


async def test_ticks_at_start_and_again(db: Database, database_url: str, sched_seed: SchedulerSeed) -> None:
    uid = sched_seed.user("UTC", soon())
    settings = make_settings(database_url, scheduler_interval=0.2)
    daemon = SchedulerDaemon(db, settings)
    await daemon.start()
    try:
        assert daemon.running
        job = daemon._scheduler.get_job(daemon_mod.JOB_ID)  # type: ignore[union-attr]
        # Late ticks always run (never dropped as misfires), coalesced into one, never two at once.
        assert (job.misfire_grace_time, job.coalesce, job.max_instances) == (None, True, 1)
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


async def test_stop_lets_the_running_tick_finish(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = asyncio.Event()
    finished: list[bool] = []

    async def slow(db: Any, settings: Any, now: datetime, **kw: Any) -> TickReport:
        entered.set()
        await asyncio.sleep(0.5)
        finished.append(True)
        return TickReport(now=now)

    monkeypatch.setattr(daemon_mod, "run_tick", slow)
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=60))
    await daemon.start()
    await asyncio.wait_for(entered.wait(), 5)
    begun = time.monotonic()
    await daemon.stop()
    assert finished == [True]  # not cancelled
    assert time.monotonic() - begun >= 0.3
    assert daemon.last_report is not None and not daemon.running


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
