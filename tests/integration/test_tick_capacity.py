"""Capacity-aware starts in the tick (scheduler.starts): briefs start as late as the LLM capacity allows."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb

from briefs.db import Database
from briefs.settings import Settings
from scheduler import starts
from scheduler.report import TickReport
from scheduler.tick import run_tick
from tests.conftest import SchedulerSeed, make_settings
from worker import queue

NOW = datetime(2026, 3, 10, 6, 0, tzinfo=UTC)
NOTIFY = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


def planning(database_url: str, **overrides: Any) -> Settings:
    """An LLM that is configured (no call is made by a tick), a three-hour window and a two-hour max lead."""
    values: dict[str, Any] = {
        "openai_api_key": "sk-test-capacity", "lookahead": 3 * 3600.0, "max_lead": 7200.0,
        "generation_buffer": 300.0, "llm_rpm": 30, "llm_call_seconds": 1.0, "capacity_margin": 0.8,
    }
    values.update(overrides)
    return make_settings(database_url, **values)


def users_with_projects(seed: SchedulerSeed, n: int, projects: int, tz: str = "UTC", at: str = "08:00") -> list[int]:
    ids = [seed.user(tz, at) for _ in range(n)]
    seed.execute(
        "INSERT INTO projects (user_id, name) SELECT u, 'p' || g FROM unnest(%s::bigint[]) u, generate_series(1, %s) g",
        (ids, projects),
    )
    return ids


async def queued_at_the_buffer(db: Database, database_url: str, seed: SchedulerSeed) -> Settings:
    """30 briefs of 4 projects queued and planned, then every start put back at the buffer (as if unplanned)."""
    settings = planning(database_url)
    users_with_projects(seed, 30, 4)
    await run_tick(db, settings, NOW)
    seed.execute("UPDATE queue_jobs SET run_at = %s", (NOTIFY - timedelta(minutes=5),))
    return settings


def brief_jobs(seed: SchedulerSeed) -> list[dict[str, Any]]:
    return seed.rows(
        """SELECT id, user_id, run_at, notify_at, payload FROM queue_jobs
           WHERE job_type = 'generate_daily_brief' AND status = 'pending' ORDER BY id"""
    )


async def test_briefs_the_buffer_cannot_finish_start_earlier_and_carry_their_calls(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    # 30 briefs of 4 projects: 150 calls at 30 a minute, planned at 80 %: 6.25 minutes, more than the 5-minute buffer.
    users_with_projects(sched_seed, 30, 4)
    report = await run_tick(db, planning(database_url), NOW)
    assert len(report.enqueued) == 30
    jobs = brief_jobs(sched_seed)
    assert {job["payload"]["llm_calls"] for job in jobs} == {5}
    starts = sorted(job["run_at"] for job in jobs)
    assert starts[-1] <= NOTIFY - timedelta(minutes=5)  # never later than the fixed buffer
    assert starts[0] >= NOTIFY - timedelta(hours=2)  # never before the max lead
    # The whole demand fits between the first start and the deadline, at the planned rate.
    assert NOTIFY - starts[0] >= timedelta(minutes=6.25)
    assert NOTIFY - starts[0] < timedelta(minutes=8)  # and no earlier than it needs (freshness)
    plan = report.capacity
    assert plan is not None
    assert plan["briefs"] == 30 and plan["expected_late"] == 0 and plan["overloads"] == []
    assert plan["started_earlier"] > 0 and plan["calls_per_minute"] == 30
    assert "LLM capacity: 30 brief(s) in the window" in report.summary()


async def test_with_capacity_to_spare_every_brief_starts_the_buffer_ahead(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    users_with_projects(sched_seed, 5, 2)
    report = await run_tick(db, planning(database_url, llm_rpm=0), NOW)
    assert {job["run_at"] for job in brief_jobs(sched_seed)} == {NOTIFY - timedelta(minutes=5)}
    assert report.capacity is not None and report.capacity["started_earlier"] == 0


async def test_switched_off_or_without_an_llm_the_step_does_not_run(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    users_with_projects(sched_seed, 30, 4)
    report = await run_tick(db, planning(database_url, capacity_planning=False), NOW)
    assert report.capacity is None
    assert {job["run_at"] for job in brief_jobs(sched_seed)} == {NOTIFY - timedelta(minutes=5)}
    assert all("llm_calls" not in job["payload"] for job in brief_jobs(sched_seed))
    report = await run_tick(db, planning(database_url, openai_api_key=None), NOW)
    assert report.capacity is None


async def test_an_overload_is_reported_before_it_happens_in_the_users_zone(
    db: Database, database_url: str, sched_seed: SchedulerSeed, caplog: pytest.LogCaptureFixture
) -> None:
    # 04:00 in New York is 08:00Z on 10 March (daylight time, UTC-4, since the 8th).
    users_with_projects(sched_seed, 30, 4, tz="America/New_York", at="04:00")
    with caplog.at_level(logging.WARNING, logger="scheduler.starts"):
        report = await run_tick(db, planning(database_url, llm_rpm=1), NOW)
    plan = report.capacity
    assert plan is not None and plan["expected_late"] > 0
    [overload] = plan["overloads"]
    assert overload["briefs"] == 30 and overload["calls"] == 150 and overload["notify_at"] == NOTIFY
    assert overload["message"].startswith("2026-03-10 04:00 America/New_York: 30 briefs need 150 calls")
    assert "at 1 calls/min" in overload["message"]
    assert overload["start"] == NOTIFY - timedelta(hours=2)  # as early as the max lead allows
    assert overload["message"] in caplog.text
    assert f"! {overload['message']}" in report.summary()
    assert REGISTRY.get_sample_value("briefs_scheduler_briefs_expected_late") == plan["expected_late"]
    logged = report.to_dict()["capacity"]["overloads"][0]
    assert logged["notify_at"] == "2026-03-10T08:00:00Z"


async def test_planning_is_stable_and_new_demand_only_moves_starts_earlier(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    settings = planning(database_url)
    users_with_projects(sched_seed, 30, 4)
    await run_tick(db, settings, NOW)
    before = {job["id"]: job["run_at"] for job in brief_jobs(sched_seed)}
    report = await run_tick(db, settings, NOW + timedelta(minutes=5))
    assert report.capacity is not None and report.capacity["started_earlier"] == 0
    assert {job["id"]: job["run_at"] for job in brief_jobs(sched_seed)} == before
    users_with_projects(sched_seed, 20, 4)  # more demand for the same minute
    report = await run_tick(db, settings, NOW + timedelta(minutes=10))
    after = {job["id"]: job["run_at"] for job in brief_jobs(sched_seed)}
    assert len(after) == 50 and report.capacity is not None and report.capacity["started_earlier"] > 0
    assert all(after[job_id] <= run_at for job_id, run_at in before.items())
    assert any(after[job_id] < run_at for job_id, run_at in before.items())


async def test_hand_queued_and_hostile_jobs_are_counted_never_moved_and_never_stop_the_tick(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    users_with_projects(sched_seed, 30, 4)
    by_hand = sched_seed.job(sched_seed.user("UTC", "08:00"), "2026-03-10", "pending",
                             notify_at=NOTIFY, source=None)
    sched_seed.execute("UPDATE queue_jobs SET run_at = %s WHERE id = %s", (NOTIFY - timedelta(minutes=1), by_hand))
    hostile = []
    for calls in ("lots", 1e30, -5, None, {"a": 1}):
        job = sched_seed.job(sched_seed.user("UTC", "08:00"), "2026-03-10", "pending", notify_at=NOTIFY)
        sched_seed.execute(
            "UPDATE queue_jobs SET run_at = %s, payload = payload || %s WHERE id = %s",
            (NOTIFY - timedelta(minutes=1), Jsonb({"llm_calls": calls}), job),
        )
        hostile.append(job)
    report = await run_tick(db, planning(database_url), NOW)
    assert report.capacity is not None and report.capacity["briefs"] == 36
    rows = {job["id"]: job["run_at"] for job in brief_jobs(sched_seed)}
    assert rows[by_hand] == NOTIFY - timedelta(minutes=1)  # queued by hand: never moved
    assert all(rows[job] < NOTIFY - timedelta(minutes=1) for job in hostile)  # the scheduler's: planned


async def test_the_plan_uses_what_the_last_hours_briefs_measured(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    users_with_projects(sched_seed, 3, 1)
    other = sched_seed.user("UTC", "23:00")
    sched_seed.execute(
        """INSERT INTO daily_briefs (user_id, brief_date, status, completed_at, prompt_tokens, completion_tokens,
                                     metadata)
           VALUES (%s, '2026-03-09', 'completed', %s, 9000, 1000, '{"llm_requests": 25}')""",
        (other, NOW - timedelta(minutes=10)),
    )
    sched_seed.execute(
        """INSERT INTO projects (user_id, name) SELECT %s, 'm' || g FROM generate_series(1, 25) g""", (other,)
    )
    sched_seed.execute(
        """INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, metadata)
           SELECT b.id, p.id, 'completed', jsonb_build_object('request_seconds', 2.5)
           FROM daily_briefs b, projects p WHERE b.user_id = %s AND p.user_id = %s""",
        (other, other),
    )
    report = await run_tick(db, planning(database_url), NOW)
    plan = report.capacity
    assert plan is not None
    assert plan["tokens_per_call"] == 400.0 and plan["tokens_per_call_measured"] is True
    assert plan["request_seconds"] == 2.5 and plan["request_seconds_measured"] is True


async def test_a_dry_run_plans_but_writes_nothing(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    settings = await queued_at_the_buffer(db, database_url, sched_seed)
    report: TickReport = await run_tick(db, settings, NOW + timedelta(minutes=1), dry_run=True)
    assert report.capacity is not None and report.capacity["started_earlier"] > 0
    assert {job["run_at"] for job in brief_jobs(sched_seed)} == {NOTIFY - timedelta(minutes=5)}


async def test_starts_moved_earlier_wake_the_workers(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    settings = await queued_at_the_buffer(db, database_url, sched_seed)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {queue.NOTIFY_CHANNEL}")
        report = await run_tick(db, settings, NOW + timedelta(minutes=1))
        assert report.enqueued == [] and report.moved == []
        assert report.capacity is not None and report.capacity["started_earlier"] > 0
        # A worker's timer is set for the earliest run_at it saw: it must hear that one came sooner.
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [queue.NOTIFY_CHANNEL]


def test_expected_calls_and_capacity_follow_the_settings(database_url: str) -> None:
    settings = planning(database_url, brief_max_projects=3, llm_concurrency=8, worker_concurrency=1,
                        llm_brief_concurrency=4, workers_expected=3, llm_tpm=90_000)
    assert [starts.expected_calls(n, settings) for n in (None, -1, 0, 1, 3, 50)] == [None, None, 0, 2, 4, 4]
    capacity = starts.capacity_of(settings)
    assert capacity.concurrency == 4 * 3  # one brief at a time per process, four calls each, three processes
    assert (capacity.calls_per_minute, capacity.tokens_per_minute, capacity.call_latency_s) == (30, 90_000, 1.0)
    assert starts.capacity_of(settings, 2.5).call_latency_s == 2.5


async def test_a_failure_of_the_planning_step_never_fails_the_tick(
    db: Database, database_url: str, sched_seed: SchedulerSeed, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    users_with_projects(sched_seed, 30, 4)

    async def broken(conn: Any, *args: Any) -> None:
        await conn.execute("SELECT 1/0")  # a failed statement: the savepoint keeps the tick's transaction usable

    monkeypatch.setattr(starts, "plan_starts_of_tick", broken)
    with caplog.at_level(logging.ERROR, logger="scheduler.tick"):
        report = await run_tick(db, planning(database_url), NOW)
    assert len(report.enqueued) == 30 and report.capacity is not None
    assert report.capacity["error"].startswith("DivisionByZero")
    assert "planning the starts failed" in caplog.text and "planning the starts failed" in report.summary()
    assert {job["run_at"] for job in brief_jobs(sched_seed)} == {NOTIFY - timedelta(minutes=5)}


async def test_a_hostile_run_at_is_not_taken_for_a_plan(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    users_with_projects(sched_seed, 3, 1)
    for when in ("0002-01-01 00:00Z", "9999-01-01 00:00Z", "-infinity", "infinity"):
        job = sched_seed.job(sched_seed.user("UTC", "08:00"), "2026-03-10", "pending", notify_at=NOTIFY)
        sched_seed.execute("UPDATE queue_jobs SET run_at = %s::timestamptz WHERE id = %s", (when, job))
    report = await run_tick(db, planning(database_url), NOW)
    assert report.capacity is not None and report.capacity["briefs"] == 7 and "error" not in report.capacity
    assert len(report.enqueued) == 3


async def test_many_overloaded_times_log_a_few_lines_and_report_them_all(
    db: Database, database_url: str, sched_seed: SchedulerSeed, caplog: pytest.LogCaptureFixture
) -> None:
    for minute in range(7):  # 07:00, 07:08, … 07:48
        users_with_projects(sched_seed, 10, 4, at=f"07:{8 * minute:02d}")
    with caplog.at_level(logging.WARNING, logger="scheduler.starts"):
        report = await run_tick(db, planning(database_url, llm_rpm=1), NOW)
    assert report.capacity is not None and len(report.capacity["overloads"]) == 7
    lines = [r.getMessage() for r in caplog.records if r.name == "scheduler.starts"]
    assert len(lines) == starts.WARN_OVERLOADS + 1
    assert lines[-1].startswith(
        "LLM capacity: 2 more brief times are overloaded (20 briefs), the last at 2026-03-10T07:48")
