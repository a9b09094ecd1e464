"""The tick's isolation of one user's failure, and its reading of rows by name (real Postgres).

A bug in the planner or in the check of one pending job costs that user alone; a query whose columns
drift from the row class that reads it fails loudly instead of reading the wrong column.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time
from typing import Any

import psycopg
import pytest

from briefs.db import Database, named_rows
from briefs.settings import Settings
from scheduler import tick as tick_mod
from scheduler.report import TickReport
from scheduler.tick import run_tick
from tests.conftest import SchedulerSeed


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


async def tick(db: Database, settings: Settings, now: str) -> TickReport:
    report = await run_tick(db, settings, utc(now))
    assert not report.skipped_locked
    return report


async def test_a_planner_bug_skips_the_users_of_that_schedule_only(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    london = [sched_seed.user("Europe/London", "08:00") for _ in range(2)]
    ok = sched_seed.user("UTC", "08:00")
    real = tick_mod.plan

    def plan(pref: Any, *args: Any, **kw: Any) -> Any:
        if pref.timezone == "Europe/London":
            raise RuntimeError("planner bug")
        return real(pref, *args, **kw)

    monkeypatch.setattr(tick_mod, "plan", plan)
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    assert [e["user_id"] for e in report.enqueued] == [ok]
    assert report.skipped == [{"user_id": uid, "reason": "plan_error: RuntimeError: planner bug"} for uid in london]
    assert report.skipped_by_kind() == {"plan_error": 2}
    assert [j["dedup_key"] for j in sched_seed.jobs()] == [f"brief:{ok}:2026-03-10"]


async def test_a_failing_check_of_a_pending_job_leaves_that_job_as_it_is(
    db: Database,
    settings: Settings,
    sched_seed: SchedulerSeed,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = sched_seed.user("Europe/London", "08:00")  # GMT in March: 08:00Z
    moved = sched_seed.user("UTC", "08:00")
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    assert {e["user_id"] for e in report.enqueued} == {broken, moved}
    [queued] = sched_seed.jobs(broken)
    # Both now want 09:00, outside the next tick's hour: their queued jobs are checked, not planned again.
    sched_seed.execute("UPDATE brief_preferences SET time_of_day = '09:00' WHERE user_id = ANY(%s)", ([broken, moved],))
    real = tick_mod.local_to_utc

    def local_to_utc(day: date, at: time, tz: Any) -> datetime:
        if str(tz) == "Europe/London":
            raise RuntimeError("recheck bug")
        return real(day, at, tz)

    monkeypatch.setattr(tick_mod, "local_to_utc", local_to_utc)
    with caplog.at_level(logging.ERROR, logger="scheduler.tick"):
        report = await tick(db, settings, "2026-03-10T07:35:00Z")
    assert [(m["user_id"], m["notify_at"]) for m in report.moved] == [(moved, utc("2026-03-10T09:00:00Z"))]
    assert report.cancelled == [] and report.skipped == [] and report.enqueued == []
    [job] = sched_seed.jobs(broken)
    assert job["status"] == "pending" and job["notify_at"] == utc("2026-03-10T08:00:00Z")
    [job] = sched_seed.jobs(moved)
    assert job["status"] == "pending" and job["notify_at"] == utc("2026-03-10T09:00:00Z")
    assert [r.getMessage() for r in caplog.records] == [f"checking pending job {queued['id']} of user {broken} failed"]


async def test_a_statement_whose_columns_drift_from_its_row_class_is_refused(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        counted = tick_mod._Counted(conn)
        factory = named_rows(tick_mod._PendingRow)
        [row] = await counted.fetch(
            "SELECT 1 AS id, 2 AS user_id, 'brief:2:2026-03-10' AS dedup_key, NULL::timestamptz AS notify_at, "
            "true AS catch_up, false AS email",
            None,
            factory,
        )
        assert (row.user_id, row.dedup_key, row.catch_up, row.email) == (2, "brief:2:2026-03-10", True, False)
        # The same columns in another order: refused by name, never read by position.
        with pytest.raises(TypeError, match="_PendingRow reads the columns"):
            await counted.fetch(
                "SELECT 2 AS user_id, 1 AS id, 'brief:2:2026-03-10' AS dedup_key, NULL::timestamptz AS notify_at, "
                "true AS catch_up, false AS email",
                None,
                factory,
            )
        assert counted.count == 2  # one statement counted per fetch, as per execute
