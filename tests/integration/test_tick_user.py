"""A one-user tick (``run_tick(user_id=…)``): the tick's reconciliation for one user, after a preference change.

Real Postgres, every tick gets its ``now``. The lock tests hold the scheduler's advisory lock on another
connection, as a periodic tick would.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest

from briefs.db import Database
from briefs.settings import Settings
from scheduler import tick as tick_mod
from scheduler.report import TickReport
from scheduler.tick import LOCK_KEY, run_tick
from tests.conftest import SchedulerSeed
from tests.polling import wait_for_async


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


async def tick(db: Database, settings: Settings, now: str, **kw: Any) -> TickReport:
    report = await run_tick(db, settings, utc(now), **kw)
    assert not report.skipped_locked
    json.dumps(report.to_dict())  # the API's response: always serialisable
    return report


async def test_a_new_time_of_day_moves_the_pending_job(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("Europe/Paris", "09:00")  # 08:00Z on 2026-03-10
    await tick(db, settings, "2026-03-10T07:30:00Z")
    [job] = sched_seed.jobs(uid)
    assert job["notify_at"] == utc("2026-03-10T08:00:00Z")
    sched_seed.set_preference(uid, time_of_day="11:00")  # 10:00Z: beyond this tick's window
    report = await tick(db, settings, "2026-03-10T07:35:00Z", user_id=uid)
    assert report.user_id == uid and report.users_seen == 1
    [moved] = report.moved
    assert (moved["job_id"], moved["from_notify_at"], moved["notify_at"], moved["run_at"]) == (
        job["id"], utc("2026-03-10T08:00:00Z"), utc("2026-03-10T10:00:00Z"), utc("2026-03-10T09:55:00Z"))
    [after] = sched_seed.jobs(uid)
    assert (after["id"], after["status"], after["notify_at"], after["run_at"]) == (
        job["id"], "pending", utc("2026-03-10T10:00:00Z"), utc("2026-03-10T09:55:00Z"))
    assert after["payload"]["notify_at"] == "2026-03-10T10:00:00Z"
    out = report.to_dict()
    assert out["user_id"] == uid and out["moved"][0]["notify_at"] == "2026-03-10T10:00:00Z"


async def test_a_preference_moved_to_soon_is_enqueued_now(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "18:00")
    await tick(db, settings, "2026-03-10T12:00:00Z")
    assert sched_seed.jobs(uid) == []
    sched_seed.set_preference(uid, time_of_day="12:10")
    report = await tick(db, settings, "2026-03-10T12:00:00Z", user_id=uid)
    [entry] = report.enqueued
    assert (entry["user_id"], entry["brief_date"], entry["notify_at"]) == (
        uid, date(2026, 3, 10), utc("2026-03-10T12:10:00Z"))
    assert [j["id"] for j in sched_seed.jobs(uid, status="pending")] == [entry["job_id"]]


async def test_an_inactive_preference_cancels_the_pending_scheduler_job_only(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    await tick(db, settings, "2026-03-10T07:30:00Z")
    [job] = sched_seed.jobs(uid)
    by_hand = sched_seed.job(uid, "2026-03-11", "pending", notify_at=utc("2026-03-11T08:00:00Z"), source=None)
    sched_seed.set_preference(uid, is_active=False)
    report = await tick(db, settings, "2026-03-10T07:31:00Z", user_id=uid)
    assert report.users_seen == 0 and report.enqueued == []
    assert [(c["job_id"], c["reason"]) for c in report.cancelled] == [(job["id"], "preference inactive or removed")]
    statuses = {j["id"]: j["status"] for j in sched_seed.jobs(uid)}
    assert statuses == {job["id"]: "cancelled", by_hand: "pending"}


async def test_other_users_are_left_alone(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    changed = sched_seed.user("UTC", "08:00")
    moved_too = sched_seed.user("UTC", "08:00")
    inactive = sched_seed.user("UTC", "08:00")
    await tick(db, settings, "2026-03-10T07:30:00Z")
    before = {j["id"]: j for j in sched_seed.jobs()}
    assert len(before) == 3
    for uid in (changed, moved_too):
        sched_seed.set_preference(uid, time_of_day="10:00")
    sched_seed.set_preference(inactive, is_active=False)
    report = await tick(db, settings, "2026-03-10T07:31:00Z", user_id=changed)
    assert [m["user_id"] for m in report.moved] == [changed] and report.cancelled == []
    after = {j["id"]: j for j in sched_seed.jobs()}
    for job_id, job in before.items():
        if job["user_id"] != changed:
            assert after[job_id] == job  # not moved, not cancelled, not touched at all
    # The periodic tick then does the rest.
    report = await tick(db, settings, "2026-03-10T07:32:00Z")
    assert [m["user_id"] for m in report.moved] == [moved_too]
    assert [c["user_id"] for c in report.cancelled] == [inactive]


async def test_a_user_without_a_preference_has_its_scheduler_jobs_cancelled(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    await tick(db, settings, "2026-03-10T07:30:00Z")
    sched_seed.execute("DELETE FROM brief_preferences WHERE user_id = %s", (uid,))
    report = await tick(db, settings, "2026-03-10T07:31:00Z", user_id=uid)
    assert [c["user_id"] for c in report.cancelled] == [uid]
    report = await tick(db, settings, "2026-03-10T07:31:00Z", user_id=uid + 1000)  # no such user: nothing
    assert (report.users_seen, report.cancelled, report.moved, report.enqueued) == (0, [], [], [])


async def test_the_orphaned_brief_sweep_is_the_periodic_ticks(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    sched_seed.brief(uid, "2026-03-09", "standard", status="processing")
    sched_seed.job(uid, "2026-03-09", "failed")
    report = await tick(db, settings, "2026-03-10T07:30:00Z", user_id=uid)
    assert report.briefs_failed == []
    assert sched_seed.rows("SELECT status FROM daily_briefs") == [{"status": "processing"}]
    report = await tick(db, settings, "2026-03-10T07:31:00Z")
    assert [b["user_id"] for b in report.briefs_failed] == [uid]


async def test_a_dry_run_for_one_user_writes_nothing(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    other = sched_seed.user("UTC", "08:00")
    report = await tick(db, settings, "2026-03-10T07:30:00Z", user_id=uid, dry_run=True)
    assert [e["user_id"] for e in report.enqueued] == [uid] and other not in {n["user_id"] for n in report.not_due}
    assert sched_seed.jobs() == []


@pytest.mark.parametrize("bad", [0, -1, 2**63, True, "7", 1.0])
async def test_the_user_id_is_checked(db: Database, settings: Settings, bad: object) -> None:
    with pytest.raises(ValueError, match="user_id must be an integer"):
        await run_tick(db, settings, utc("2026-03-10T07:30:00Z"), user_id=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the lock


async def lock_waiters(database_url: str) -> int:
    """How many sessions wait for an advisory lock."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_a_one_user_tick_waits_for_a_running_tick(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, database_url: str
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    async with await psycopg.AsyncConnection.connect(database_url) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        periodic = await run_tick(db, settings, utc("2026-03-10T07:30:00Z"))
        assert periodic.skipped_locked  # the periodic tick does not wait
        waiting = asyncio.create_task(run_tick(db, settings, utc("2026-03-10T07:30:00Z"), user_id=uid))
        await wait_for_async(lambda: lock_waiters(database_url), what="the one-user tick to wait for the lock")
        assert not waiting.done()
        await holder.commit()  # the running tick ends: the lock is released
        report = await waiting
    assert not report.skipped_locked
    assert [e["user_id"] for e in report.enqueued] == [uid]
    assert len(sched_seed.jobs(uid)) == 1
    # The lock timeout was the tick's alone: the pooled connections are back to the server's default.
    async with await psycopg.AsyncConnection.connect(database_url) as fresh:
        default = await (await fresh.execute("SHOW lock_timeout")).fetchone()
    for _ in range(2):
        async with db.raw() as conn:
            assert await (await conn.execute("SHOW lock_timeout")).fetchone() == default


async def test_a_one_user_tick_gives_up_when_the_lock_stays_taken(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tick_mod, "USER_LOCK_TIMEOUT", 0.05)
    uid = sched_seed.user("UTC", "08:00")
    async with await psycopg.AsyncConnection.connect(database_url) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        report = await run_tick(db, settings, utc("2026-03-10T07:30:00Z"), user_id=uid)
        assert report.skipped_locked and report.enqueued == []
        assert report.to_dict()["skipped_locked"] is True
        assert "skipped" in report.summary()
    assert sched_seed.jobs(uid) == []
    report = await tick(db, settings, "2026-03-10T07:30:00Z", user_id=uid)  # the lock is free again
    assert [e["user_id"] for e in report.enqueued] == [uid]
