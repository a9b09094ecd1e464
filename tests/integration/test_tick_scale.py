"""Tick cost and concurrency: constant queries per page, two schedulers at once, never two jobs per date."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from briefs.db import Database
from briefs.settings import Settings
from scheduler import tick as tick_mod
from scheduler.plan import local_to_utc
from scheduler.tick import run_tick
from tests.conftest import SchedulerSeed, make_settings, truncate_all

NOW = datetime(2026, 3, 10, 7, 30, tzinfo=UTC)
ZONES = ["UTC", "Europe/London", "Europe/Lisbon", "Africa/Abidjan"]  # all 08:00 in [07:30, 08:30) UTC


def live_duplicates(seed: SchedulerSeed) -> list[dict[str, Any]]:
    return seed.rows(
        """SELECT user_id, dedup_key, count(*) AS n FROM queue_jobs
           WHERE job_type = 'generate_daily_brief' AND status IN ('pending', 'processing', 'completed')
           GROUP BY 1, 2 HAVING count(*) > 1"""
    )


@pytest.mark.parametrize("page_size", [10, 200])
async def test_queries_per_page_do_not_depend_on_page_size(
    db: Database, database_url: str, sched_seed: SchedulerSeed, page_size: int
) -> None:
    settings = make_settings(database_url, scheduler_page_size=page_size)
    # 400 due users, inactive 5 days (so the engagement query runs on every page too).
    sched_seed.many(400, ZONES, "08:00", last_visit_at=NOW - timedelta(days=5))
    report = await run_tick(db, settings, NOW)
    pages = 400 // page_size
    assert report.pages == pages and len(report.enqueued) == 400
    # Per tick: lock, pending jobs, the final empty page, the orphaned-briefs sweep, NOTIFY (the cancel
    # sweep has nothing to do here). Per page: preferences, dedup, engagement history, enqueue.
    assert report.queries == 5 + 4 * pages

    # Every user's timezone changes: each page now moves jobs (one UPDATE) and enqueues nothing.
    sched_seed.execute("UPDATE users SET timezone = 'Europe/Paris'")  # 08:00 CET = 07:00Z: catch-up now
    report = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert len(report.moved) == 400 and report.enqueued == []
    assert report.queries == 5 + 3 * pages


async def test_hostile_rows_on_every_page_keep_the_statement_count(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    settings = make_settings(database_url, scheduler_page_size=50)
    sched_seed.many(400, ZONES, "08:00", last_visit_at=NOW - timedelta(days=5))
    # Every tenth user gets one of four kinds of bad row; every page holds some.
    sched_seed.execute(
        """UPDATE users SET last_visit_at = CASE WHEN id % 40 = 0 THEN 'infinity'::timestamptz
                                                 WHEN id % 40 = 10 THEN '0044-03-15 BC'::timestamptz
                                                 ELSE last_visit_at END,
                            timezone = CASE WHEN id % 40 = 20 THEN repeat('x', 5000) ELSE timezone END
           WHERE id % 10 = 0"""
    )
    sched_seed.execute("UPDATE brief_preferences SET time_of_day = '24:00' WHERE user_id % 40 = 30")
    report = await run_tick(db, settings, NOW)
    assert report.pages == 8 and len(report.enqueued) == 360 and len(report.skipped) == 40
    assert report.skipped_by_kind() == {"invalid_last_visit": 20, "invalid_timezone": 10, "invalid_preference": 10}
    assert report.queries == 5 + 4 * 8


async def test_two_schedulers_at_once_make_each_job_once(
    db: Database, database_url: str, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    sched_seed.many(10_000, ZONES, "08:00")
    other = Database(settings, database_url, pool_size=2)
    try:
        first, second = await asyncio.gather(run_tick(db, settings, NOW), run_tick(other, settings, NOW))
    finally:
        await other.dispose()
    assert len(first.enqueued) + len(second.enqueued) == 10_000
    # One won the lock; the other either saw it taken or ran after and found everything queued.
    loser = second if len(first.enqueued) == 10_000 else first
    assert loser.skipped_locked or loser.deduplicated == 10_000
    [row] = sched_seed.rows("SELECT count(*) AS n, count(DISTINCT dedup_key) AS keys FROM queue_jobs")
    assert row == {"n": 10_000, "keys": 10_000}


async def test_without_the_lock_the_unique_index_still_holds(
    db: Database, database_url: str, settings: Settings, sched_seed: SchedulerSeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_lock(conn: Any) -> bool:
        await conn.execute("SELECT 1")
        return True

    monkeypatch.setattr(tick_mod, "_try_lock", no_lock)
    sched_seed.many(10_000, ZONES, "08:00")
    other = Database(settings, database_url, pool_size=2)
    try:
        first, second = await asyncio.gather(run_tick(db, settings, NOW), run_tick(other, settings, NOW))
    finally:
        await other.dispose()
    assert not first.skipped_locked and not second.skipped_locked
    assert len(first.enqueued) + len(second.enqueued) == 10_000
    assert first.deduplicated + second.deduplicated == 10_000
    [row] = sched_seed.rows("SELECT count(*) AS n, count(DISTINCT dedup_key) AS keys FROM queue_jobs")
    assert row == {"n": 10_000, "keys": 10_000}
    assert live_duplicates(sched_seed) == []


# --------------------------------------------------------------------------- property: never two jobs per date


def assert_pending_jobs_match_preferences(seed: SchedulerSeed, now: datetime) -> None:
    """After a tick, every pending scheduler job agrees with its user's current preference and timezone.

    A brief whose instant is ahead waits for exactly that instant; one whose instant passed is due now
    (a job already due stays as it is, whatever instant it recorded).
    """
    rows = seed.rows(
        """SELECT j.id, j.payload, j.notify_at, u.timezone, p.frequency, p.day_of_week, p.time_of_day, p.is_active
           FROM queue_jobs j JOIN users u ON u.id = j.user_id JOIN brief_preferences p ON p.user_id = j.user_id
           WHERE j.status = 'pending'"""
    )
    for row in rows:
        assert row["is_active"], row  # deactivated: cancelled
        day = date.fromisoformat(row["payload"]["brief_date"])
        if row["frequency"] == "weekly":
            assert day.isoweekday() == row["day_of_week"], row
        intended = local_to_utc(day, row["time_of_day"], ZoneInfo(row["timezone"]))
        if intended >= now:
            assert row["notify_at"] == intended, row
        else:
            assert row["notify_at"] <= now, row
        assert row["payload"]["notify_at"] == row["notify_at"].isoformat().replace("+00:00", "Z")


PROPERTY_ZONES = [
    "UTC",
    "America/New_York",
    "America/St_Johns",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "Australia/Lord_Howe",
    "Europe/London",
    "America/Nuuk",
]
TIMES = ["00:00", "00:30", "01:30", "02:30", "08:00", "12:15", "23:30", "23:59"]

event = st.one_of(
    st.tuples(st.just("tz"), st.integers(0, 2), st.sampled_from(PROPERTY_ZONES)),
    st.tuples(st.just("time"), st.integers(0, 2), st.sampled_from(TIMES)),
    st.tuples(st.just("weekly"), st.integers(0, 2), st.integers(1, 7)),
    st.tuples(st.just("daily"), st.integers(0, 2), st.none()),
    st.tuples(st.just("active"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("work"), st.integers(0, 2), st.sampled_from(["processing", "completed", "failed"])),
)
step = st.tuples(
    st.sampled_from([60, 300, 1800, 3600, 3 * 3600, 7 * 3600, 25 * 3600]),  # seconds to the next tick
    st.lists(event, max_size=3),
)


@hsettings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    start=st.datetimes(min_value=datetime(2026, 3, 7), max_value=datetime(2026, 3, 9)),  # across US/EU DST
    users=st.lists(st.tuples(st.sampled_from(PROPERTY_ZONES), st.sampled_from(TIMES)), min_size=3, max_size=3),
    steps=st.lists(step, min_size=1, max_size=8),
)
async def test_never_two_jobs_for_one_user_and_local_date(
    database_url: str,
    db: Database,
    start: datetime,
    users: list[tuple[str, str]],
    steps: list[tuple[int, list[tuple[str, int, Any]]]],
) -> None:
    truncate_all(database_url)
    # A long lookahead keeps jobs pending across ticks, so preference changes move and cancel them.
    settings = make_settings(database_url, lookahead=12 * 3600)
    seed = SchedulerSeed(database_url)
    try:
        ids = [seed.user(tz, at) for tz, at in users]
        now = start.replace(tzinfo=UTC)
        await run_tick(db, settings, now)
        for delay, events in steps:
            for kind, index, value in events:
                uid = ids[index]
                if kind == "tz":
                    seed.set_timezone(uid, value)
                elif kind == "time":
                    seed.set_preference(uid, time_of_day=value)
                elif kind == "weekly":
                    seed.set_preference(uid, frequency="weekly", day_of_week=value)
                elif kind == "daily":
                    seed.set_preference(uid, frequency="daily", day_of_week=None)
                elif kind == "active":
                    seed.set_preference(uid, is_active=value)
                else:  # a worker picks up the user's oldest pending job
                    seed.execute(
                        """UPDATE queue_jobs SET status = %(s)s,
                                  processing_token = CASE WHEN %(s)s = 'processing' THEN gen_random_uuid() END,
                                  lease_expires_at = CASE WHEN %(s)s = 'processing' THEN now() + interval '1 h' END,
                                  finished_at = CASE WHEN %(s)s <> 'processing' THEN now() END
                           WHERE id = (SELECT min(id) FROM queue_jobs WHERE user_id = %(u)s AND status = 'pending')""",
                        {"s": value, "u": uid},
                    )
            now += timedelta(seconds=delay)
            report = await run_tick(db, settings, now)
            assert not report.skipped_locked
            assert live_duplicates(seed) == []
            # Every job's key, payload and user agree.
            for job in seed.jobs():
                assert job["dedup_key"] == f"brief:{job['user_id']}:{job['payload']['brief_date']}"
            assert_pending_jobs_match_preferences(seed, now)
    finally:
        seed.close()
