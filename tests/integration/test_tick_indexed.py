"""The indexed tick (next_due_at): it does what a full scan does, and every change makes the user planned again."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from briefs.db import Database
from briefs.migrate import migrate_url
from briefs.settings import Settings
from scheduler import tick as tick_mod
from scheduler.report import TickReport
from scheduler.tick import run_tick, tzdata_version
from tests.conftest import SchedulerSeed, make_settings, truncate_all

NOW = datetime(2026, 3, 10, 7, 30, tzinfo=UTC)


def next_due(seed: SchedulerSeed, uid: int) -> Any:
    [row] = seed.rows("SELECT next_due_at FROM brief_preferences WHERE user_id = %s", (uid,))
    return row["next_due_at"]


def outcome(report: TickReport) -> dict[str, set[tuple[Any, ...]]]:
    """What a tick did to the queue and whom it skipped, comparable between a dry run and a real tick."""
    return {
        "enqueued": {(e["user_id"], e["brief_date"], e["notify_at"], e["run_at"], e["stage"], e["catch_up"])
                     for e in report.enqueued},
        "moved": {(m["job_id"], m["user_id"], m["brief_date"], m["notify_at"], m["run_at"], m["catch_up"])
                  for m in report.moved},
        "cancelled": {(c["job_id"], c["user_id"], c["brief_date"], c["reason"]) for c in report.cancelled},
        "skipped": {(s["user_id"], s["reason"]) for s in report.skipped},
    }


# --------------------------------------------------------------------------- what the tick reads


async def test_a_tick_reads_only_the_due_users_and_those_with_pending_jobs(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    due = sched_seed.user("UTC", "08:00")
    later = sched_seed.user("UTC", "20:00")
    weekly = sched_seed.user("UTC", "08:00", frequency="weekly", day_of_week=5)  # 2026-03-10 is a Tuesday
    first = await run_tick(db, settings, NOW)
    assert first.users_seen == 3 and [e["user_id"] for e in first.enqueued] == [due]  # all unknown at first
    assert next_due(sched_seed, due) == datetime(2026, 3, 11, 8, tzinfo=UTC)  # after the brief just queued
    assert next_due(sched_seed, later) == datetime(2026, 3, 10, 20, tzinfo=UTC)
    assert next_due(sched_seed, weekly) == datetime(2026, 3, 13, 8, tzinfo=UTC)
    # Five minutes later only the user with a pending job is read (and its job found queued).
    second = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert second.users_seen == 1 and second.deduplicated == 1 and second.enqueued == []
    # Once the job has run, nobody is read until the next brief comes into the lookahead.
    sched_seed.execute("UPDATE queue_jobs SET status = 'completed', finished_at = now()")
    third = await run_tick(db, settings, NOW + timedelta(minutes=10))
    assert third.users_seen == 0 and third.pages == 0
    evening = await run_tick(db, settings, datetime(2026, 3, 10, 19, 30, tzinfo=UTC))
    assert [e["user_id"] for e in evening.enqueued] == [later] and evening.users_seen == 1


async def test_a_direct_change_of_time_or_timezone_is_planned_at_the_next_tick(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    by_time = sched_seed.user("UTC", "20:00")
    by_zone = sched_seed.user("UTC", "20:00")
    unchanged = sched_seed.user("UTC", "20:00")
    await run_tick(db, settings, NOW)
    assert next_due(sched_seed, by_time) is not None
    sched_seed.execute("UPDATE brief_preferences SET time_of_day = '08:00' WHERE user_id = %s", (by_time,))
    sched_seed.execute("UPDATE users SET timezone = 'Europe/Paris' WHERE id = %s", (by_zone,))
    # The API writes every column it was not given back as it was: no change, no replanning.
    sched_seed.execute("UPDATE users SET timezone = timezone, name = 'n' WHERE id = %s", (unchanged,))
    sched_seed.execute("UPDATE brief_preferences SET email_enabled = true WHERE user_id = %s", (unchanged,))
    assert (next_due(sched_seed, by_time), next_due(sched_seed, by_zone)) == (None, None)
    assert next_due(sched_seed, unchanged) is not None
    report = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert report.users_seen == 2 and [e["user_id"] for e in report.enqueued] == [by_time]
    assert next_due(sched_seed, by_zone) == datetime(2026, 3, 10, 19, tzinfo=UTC)  # 20:00 CET


async def test_a_failed_job_makes_its_user_planned_again(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    [job] = (await run_tick(db, settings, NOW)).enqueued
    sched_seed.execute("UPDATE queue_jobs SET status = 'failed', finished_at = now() WHERE id = %s", (job["job_id"],))
    assert next_due(sched_seed, uid) is None
    again = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert [e["user_id"] for e in again.enqueued] == [uid]  # as a full scan does: the brief is still in its window


async def test_a_bad_row_is_planned_and_reported_at_every_tick(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    bad = sched_seed.user("Mars/Olympus_Mons", "08:00")
    midnight = sched_seed.user("UTC", "24:00")
    sched_seed.user("UTC", "20:00")
    for minutes in (0, 5, 10):
        report = await run_tick(db, settings, NOW + timedelta(minutes=minutes))
        assert {s["user_id"] for s in report.skipped} == {bad, midnight}
        assert report.users_seen == (3 if minutes == 0 else 2)
    assert (next_due(sched_seed, bad), next_due(sched_seed, midnight)) == (None, None)


async def test_an_engagement_skip_is_decided_again_at_every_tick_in_its_window(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00", last_visit_at=NOW - timedelta(days=10))
    sched_seed.brief(uid, (NOW - timedelta(days=2)).date(), "re_engagement")
    first = await run_tick(db, settings, NOW)
    assert [s["user_id"] for s in first.skipped] == [uid] and first.enqueued == []
    sched_seed.execute("UPDATE users SET last_visit_at = %s WHERE id = %s", (NOW, uid))  # the user came back
    second = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert [e["user_id"] for e in second.enqueued] == [uid]


async def test_a_new_tz_database_sets_every_next_due_at_again(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    users = [sched_seed.user("UTC", "20:00") for _ in range(3)]
    await run_tick(db, settings, NOW)
    assert (await run_tick(db, settings, NOW + timedelta(minutes=5))).users_seen == 0
    sched_seed.execute("UPDATE brief_preferences SET next_due_at = '2000-01-01' WHERE user_id = %s", (users[0],))
    sched_seed.execute("UPDATE scheduler_tzdata SET version = '1999a'")
    report = await run_tick(db, settings, NOW + timedelta(minutes=10))
    assert report.users_seen == 3
    assert sched_seed.rows("SELECT version FROM scheduler_tzdata") == [{"version": tzdata_version()}]
    assert {next_due(sched_seed, uid) for uid in users} == {datetime(2026, 3, 10, 20, tzinfo=UTC)}


async def test_a_value_no_tick_writes_is_planned_again(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    far = sched_seed.user("UTC", "20:00")
    near = sched_seed.user("UTC", "20:00")
    await run_tick(db, settings, NOW)
    sched_seed.execute("UPDATE brief_preferences SET next_due_at = 'infinity' WHERE user_id = %s", (far,))
    sched_seed.execute("UPDATE brief_preferences SET next_due_at = %s WHERE user_id = %s",
                       (NOW + timedelta(days=7), near))  # a weekly user's may be that far: trusted
    report = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert report.users_seen == 1
    assert next_due(sched_seed, far) == datetime(2026, 3, 10, 20, tzinfo=UTC)


async def test_a_one_user_tick_stores_its_users_next_due_at(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "20:00")
    other = sched_seed.user("UTC", "20:00")
    report = await run_tick(db, settings, NOW, user_id=uid)
    assert report.users_seen == 1
    assert (next_due(sched_seed, uid), next_due(sched_seed, other)) == (datetime(2026, 3, 10, 20, tzinfo=UTC), None)


async def test_more_due_users_than_an_indexed_tick_takes_make_a_full_scan(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tick_mod, "INDEXED_MAX_USERS", 4)
    sched_seed.many(10, ["UTC", "Europe/London"], "08:00")
    report = await run_tick(db, settings, NOW)
    assert report.users_seen == 10 and len(report.enqueued) == 10
    assert sched_seed.rows("SELECT count(*) AS n FROM brief_preferences WHERE next_due_at IS NULL") == [{"n": 0}]


async def test_a_pending_job_of_an_unchanged_user_is_left_alone(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    settings = make_settings(database_url, lookahead=12 * 3600)
    uid = sched_seed.user("UTC", "18:00")
    [job] = (await run_tick(db, settings, NOW)).enqueued
    assert job["user_id"] == uid
    for minutes in (5, 10):
        report = await run_tick(db, settings, NOW + timedelta(minutes=minutes))
        assert (report.cancelled, report.moved, report.deduplicated) == ([], [], 1)
    assert sched_seed.rows("SELECT status FROM queue_jobs WHERE id = %s", (job["job_id"],)) == [
        {"status": "pending"}
    ]


# --------------------------------------------------------------------------- the indexed tick is a full scan

ZONES = ["UTC", "America/New_York", "Europe/London", "Australia/Lord_Howe", "America/Nuuk", "Asia/Kolkata"]
TIMES = ["00:30", "01:30", "02:30", "07:45", "08:00", "12:00", "23:30", "24:00"]

person = st.tuples(
    st.sampled_from(ZONES),
    st.sampled_from(TIMES),
    st.one_of(st.none(), st.integers(1, 7)),  # weekly on that day, or daily
    st.booleans(),  # active
    st.sampled_from([None, 1, 5, 20]),  # days since the last visit
)
event = st.one_of(
    st.tuples(st.just("tz"), st.integers(0, 5), st.sampled_from(ZONES)),
    st.tuples(st.just("time"), st.integers(0, 5), st.sampled_from(TIMES)),
    st.tuples(st.just("weekly"), st.integers(0, 5), st.integers(1, 7)),
    st.tuples(st.just("daily"), st.integers(0, 5), st.none()),
    st.tuples(st.just("active"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("visit"), st.integers(0, 5), st.sampled_from([0, 6, 30])),
    st.tuples(st.just("work"), st.integers(0, 5), st.sampled_from(["processing", "completed", "failed"])),
)
step = st.tuples(st.sampled_from([60, 300, 1800, 3600, 5 * 3600, 7 * 3600, 25 * 3600]), st.lists(event, max_size=3))


def apply_event(seed: SchedulerSeed, uid: int, kind: str, value: Any, now: datetime) -> None:
    """One change made with SQL, as an application that owns the tables makes it."""
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
    elif kind == "visit":
        seed.execute("UPDATE users SET last_visit_at = %s WHERE id = %s", (now - timedelta(days=value), uid))
    else:  # a worker takes the user's oldest pending job
        seed.execute(
            """UPDATE queue_jobs SET status = %(s)s,
                      processing_token = CASE WHEN %(s)s = 'processing' THEN gen_random_uuid() END,
                      lease_expires_at = CASE WHEN %(s)s = 'processing' THEN now() + interval '1 h' END,
                      finished_at = CASE WHEN %(s)s <> 'processing' THEN now() END
               WHERE id = (SELECT min(id) FROM queue_jobs WHERE user_id = %(u)s AND status = 'pending')""",
            {"s": value, "u": uid},
        )


Person = tuple[str, str, int | None, bool, int | None]  # timezone, time, weekday (None: daily), active, last visit


def add_people(seed: SchedulerSeed, people: list[Person], now: datetime) -> list[int]:
    ids = []
    for tz, at, weekday, active, visited in people:
        visit = None if visited is None else now - timedelta(days=visited)
        ids.append(seed.user(tz, at, frequency="daily" if weekday is None else "weekly", day_of_week=weekday,
                             active=active, last_visit_at=visit))
        if visited == 20:  # an inactive user who had a re-engagement brief: the engagement check skips some
            seed.brief(ids[-1], (now - timedelta(days=2)).date(), "re_engagement")
    return ids


@pytest.fixture(scope="module")
def twin_url(pg_server_url: str) -> Iterator[str]:
    """A second migrated database, for the full scan of the same data."""
    name = f"briefs_twin_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(pg_server_url)._replace(path="/" + name))
    try:
        asyncio.run(migrate_url(url))
        yield url
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@hsettings(max_examples=40, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    start=st.datetimes(min_value=datetime(2026, 3, 7), max_value=datetime(2026, 4, 6)),  # US, EU, AU DST changes
    people=st.lists(person, min_size=6, max_size=6),
    lookahead=st.sampled_from([3600, 12 * 3600]),
    steps=st.lists(step, min_size=1, max_size=8),
)
async def test_the_indexed_tick_does_what_a_full_scan_does(
    database_url: str,
    twin_url: str,
    db: Database,
    start: datetime,
    people: list[Person],
    lookahead: int,
    steps: list[tuple[int, list[tuple[str, int, Any]]]],
) -> None:
    """Two databases, the same people and the same changes: full scans in one, indexed ticks in the other."""
    settings = make_settings(database_url, lookahead=lookahead, catch_up=2 * 3600)
    twin = Database(make_settings(twin_url), twin_url, pool_size=1)
    seeds = [SchedulerSeed(database_url), SchedulerSeed(twin_url)]
    try:
        now = start.replace(tzinfo=UTC)
        for seed in seeds:
            truncate_all(seed.url)
        ids, twin_ids = (add_people(seed, people, now) for seed in seeds)
        assert ids == twin_ids
        for delay, events in [(0, []), *steps]:
            now += timedelta(seconds=delay)
            for seed in seeds:
                for kind, index, value in events:
                    apply_event(seed, ids[index], kind, value, now)
            indexed = await run_tick(db, settings, now)
            full = await run_tick(twin, settings, now, full_scan=True)
            assert outcome(indexed) == outcome(full), now
            assert indexed.users_seen <= full.users_seen
    finally:
        for seed in seeds:
            seed.close()
        await twin.dispose()
