"""One scheduler tick against real Postgres: time zones, DST, catch-up, moves, cancels, dedup, engagement.

Every tick gets its ``now`` explicitly; nothing here freezes or reads the clock.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
import pytest

from briefs.db import Database
from briefs.settings import Settings
from scheduler.report import TickReport
from scheduler.tick import run_tick
from tests.conftest import SchedulerSeed


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


async def tick(db: Database, settings: Settings, now: str, **kw: Any) -> TickReport:
    report = await run_tick(db, settings, utc(now), **kw)
    assert not report.skipped_locked
    json.dumps(report.to_dict())  # always serialisable
    return report


def by_user(report: TickReport) -> dict[int, dict[str, Any]]:
    return {e["user_id"]: e for e in report.enqueued}


# --------------------------------------------------------------------------- time zones and DST


async def test_new_york_spring_forward(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT. 02:30 does not exist and moves forward by the gap.
    gap = sched_seed.user("America/New_York", "02:30")
    morning = sched_seed.user("America/New_York", "08:00")
    report = await tick(db, settings, "2026-03-08T07:00:00Z")
    got = by_user(report)
    assert set(got) == {gap}
    assert got[gap]["notify_at"] == utc("2026-03-08T07:30:00Z")  # 03:30 EDT
    assert got[gap]["run_at"] == utc("2026-03-08T07:25:00Z")
    assert got[gap]["brief_date"] == date(2026, 3, 8)
    report = await tick(db, settings, "2026-03-08T11:10:00Z")
    assert by_user(report)[morning]["notify_at"] == utc("2026-03-08T12:00:00Z")  # 08:00 EDT, not 13:00Z
    [job] = sched_seed.jobs(gap)
    assert job["dedup_key"] == f"brief:{gap}:2026-03-08"


async def test_new_york_fall_back(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    # 2026-11-01: 01:30 happens twice (EDT 05:30Z, then EST 06:30Z). Only the first one counts.
    uid = sched_seed.user("America/New_York", "01:30")
    report = await tick(db, settings, "2026-11-01T05:00:00Z")
    assert by_user(report)[uid]["notify_at"] == utc("2026-11-01T05:30:00Z")
    for now in ("2026-11-01T05:40:00Z", "2026-11-01T06:10:00Z", "2026-11-01T06:40:00Z"):
        report = await tick(db, settings, now)
        assert report.enqueued == []
    assert [j["dedup_key"] for j in sched_seed.jobs(uid)] == [f"brief:{uid}:2026-11-01"]
    # Next day: the ordinary 01:30 EST.
    report = await tick(db, settings, "2026-11-02T06:00:00Z")
    assert by_user(report)[uid]["notify_at"] == utc("2026-11-02T06:30:00Z")


async def test_half_hour_and_quarter_hour_offsets(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    kolkata = sched_seed.user("Asia/Kolkata", "08:00")  # +05:30
    kathmandu = sched_seed.user("Asia/Kathmandu", "08:00")  # +05:45
    report = await tick(db, settings, "2026-03-10T02:00:00Z")
    got = by_user(report)
    assert got[kolkata]["notify_at"] == utc("2026-03-10T02:30:00Z")
    assert got[kathmandu]["notify_at"] == utc("2026-03-10T02:15:00Z")
    assert got[kathmandu]["run_at"] == utc("2026-03-10T02:10:00Z")


async def test_local_date_differs_from_utc_date(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    ahead = sched_seed.user("Pacific/Kiritimati", "08:00")  # +14: already tomorrow
    behind = sched_seed.user("Pacific/Pago_Pago", "20:00")  # -11: still yesterday
    report = await tick(db, settings, "2026-03-09T17:30:00Z")
    assert by_user(report)[ahead]["brief_date"] == date(2026, 3, 10)
    assert by_user(report)[ahead]["notify_at"] == utc("2026-03-09T18:00:00Z")
    report = await tick(db, settings, "2026-03-10T06:30:00Z")
    assert by_user(report)[behind]["brief_date"] == date(2026, 3, 9)
    assert by_user(report)[behind]["notify_at"] == utc("2026-03-10T07:00:00Z")
    keys = {j["dedup_key"] for j in sched_seed.jobs()}
    assert keys == {f"brief:{ahead}:2026-03-10", f"brief:{behind}:2026-03-09"}


async def test_weekly_uses_the_local_weekday(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    # Sunday 2026-03-08 17:30 UTC is Monday 06:30 in Auckland (+13).
    monday = sched_seed.user("Pacific/Auckland", "07:00", frequency="weekly", day_of_week=1)
    sunday = sched_seed.user("Pacific/Auckland", "07:00", frequency="weekly", day_of_week=7)
    report = await tick(db, settings, "2026-03-08T17:30:00Z")
    assert set(by_user(report)) == {monday}
    assert by_user(report)[monday]["brief_date"] == date(2026, 3, 9)
    assert by_user(report)[monday]["notify_at"] == utc("2026-03-08T18:00:00Z")
    assert sunday not in by_user(report)


# --------------------------------------------------------------------------- catch-up


async def test_scheduler_down_then_back_100_minutes_later(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    ny = sched_seed.user("America/New_York", "08:00")  # 12:00Z on 2026-03-10
    late = sched_seed.user("UTC", "23:30")  # missed at 23:30 on the 10th, caught up after midnight
    report = await tick(db, settings, "2026-03-10T13:40:00Z")
    entry = by_user(report)[ny]
    assert entry["catch_up"] is True
    assert entry["notify_at"] == entry["run_at"] == utc("2026-03-10T13:40:00Z")
    assert entry["brief_date"] == date(2026, 3, 10)
    report = await tick(db, settings, "2026-03-11T01:10:00Z")
    entry = by_user(report)[late]
    assert entry["catch_up"] is True and entry["brief_date"] == date(2026, 3, 10)
    # A later tick does not move a catch-up job that is already due.
    report = await tick(db, settings, "2026-03-11T01:15:00Z")
    assert report.enqueued == [] and report.moved == [] and report.deduplicated == 1
    [job] = sched_seed.jobs(late)
    assert job["notify_at"] == utc("2026-03-11T01:10:00Z")
    assert job["payload"]["catch_up"] is True


async def test_too_late_for_catch_up(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    sched_seed.user("UTC", "08:00")
    report = await tick(db, settings, "2026-03-10T14:00:00Z")  # exactly catch_up (6 h) late: strict
    assert report.enqueued == []


# --------------------------------------------------------------------------- payload, dedup


async def test_payload_and_columns(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    uid = sched_seed.user("Europe/Paris", "09:15", email=True)
    report = await tick(db, settings, "2026-03-10T08:00:00Z")
    [job] = sched_seed.jobs(uid)
    assert report.enqueued[0]["job_id"] == job["id"]
    assert job["job_type"] == "generate_daily_brief"
    assert job["priority"] == 50
    assert job["dedup_key"] == f"brief:{uid}:2026-03-10"
    assert job["notify_at"] == utc("2026-03-10T08:15:00Z")
    assert job["run_at"] == utc("2026-03-10T08:10:00Z")
    assert job["payload"] == {
        "user_id": uid,
        "brief_date": "2026-03-10",
        "notify_at": "2026-03-10T08:15:00Z",
        "engagement_stage": "standard",
        "email": True,
        "catch_up": False,
        "force": False,
        "resend_email": False,
        "source": "scheduler",
    }


async def test_overlapping_ticks_enqueue_once(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    uid = sched_seed.user("UTC", "08:00")
    for minute in range(5, 60, 5):
        await tick(db, settings, f"2026-03-10T07:{minute:02d}:00Z")
    await tick(db, settings, "2026-03-10T09:00:00Z")  # catch-up window: still deduplicated
    assert len(sched_seed.jobs(uid)) == 1


@pytest.mark.parametrize(
    ("status", "blocks"),
    [("completed", True), ("processing", True), ("pending", True), ("failed", False), ("cancelled", False)],
)
async def test_existing_job_blocks_or_not(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, status: str, blocks: bool
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    sched_seed.job(uid, "2026-03-10", status, notify_at=utc("2026-03-10T08:00:00Z"))
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    if blocks:
        assert report.enqueued == [] and report.deduplicated == 1
        assert len(sched_seed.jobs(uid)) == 1
    else:
        assert [e["user_id"] for e in report.enqueued] == [uid]
        assert [j["status"] for j in sched_seed.jobs(uid)] == [status, "pending"]


# --------------------------------------------------------------------------- moves and cancels


async def test_timezone_change_moves_the_pending_job(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    later = sched_seed.user("America/New_York", "08:00")  # -> Chicago: an hour later, outside the window
    earlier = sched_seed.user("America/New_York", "08:00")  # -> Halifax: passed, caught up now
    gone = sched_seed.user("America/New_York", "08:00")  # -> Tokyo: that date's 08:00 passed 12 h ago
    report = await tick(db, settings, "2026-03-10T11:30:00Z")
    assert {e["notify_at"] for e in report.enqueued} == {utc("2026-03-10T12:00:00Z")}
    sched_seed.set_timezone(later, "America/Chicago")
    sched_seed.set_timezone(earlier, "America/Halifax")
    sched_seed.set_timezone(gone, "Asia/Tokyo")

    report = await tick(db, settings, "2026-03-10T11:35:00Z")
    assert report.enqueued == []
    moved = {m["user_id"]: m for m in report.moved}
    assert set(moved) == {later, earlier}
    assert moved[later]["notify_at"] == utc("2026-03-10T13:00:00Z")
    assert moved[earlier]["notify_at"] == utc("2026-03-10T11:35:00Z") and moved[earlier]["catch_up"]
    assert [c["user_id"] for c in report.cancelled] == [gone]

    [job] = sched_seed.jobs(later)
    assert (job["status"], job["notify_at"], job["run_at"]) == (
        "pending",
        utc("2026-03-10T13:00:00Z"),
        utc("2026-03-10T12:55:00Z"),
    )
    assert job["payload"]["notify_at"] == "2026-03-10T13:00:00Z"
    [job] = sched_seed.jobs(earlier)
    assert job["run_at"] == utc("2026-03-10T11:35:00Z") and job["payload"]["catch_up"] is True
    [job] = sched_seed.jobs(gone)
    assert job["status"] == "cancelled" and "catch-up" in job["last_error"]

    # Nothing more to do on the next tick.
    report = await tick(db, settings, "2026-03-10T11:40:00Z")
    assert (report.enqueued, report.moved, report.cancelled) == ([], [], [])


async def test_preference_time_change_inside_the_window_moves_the_job(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    await tick(db, settings, "2026-03-10T07:10:00Z")
    sched_seed.set_preference(uid, time_of_day="07:50")
    report = await tick(db, settings, "2026-03-10T07:15:00Z")
    assert [m["notify_at"] for m in report.moved] == [utc("2026-03-10T07:50:00Z")]
    [job] = sched_seed.jobs(uid)
    assert job["notify_at"] == utc("2026-03-10T07:50:00Z") and job["run_at"] == utc("2026-03-10T07:45:00Z")


async def test_date_change_plans_the_new_date_and_fixes_the_old(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    # +14 -> -11: the pending brief was for the 10th; the new zone and time make the 9th due now.
    uid = sched_seed.user("Pacific/Kiritimati", "08:00")
    await tick(db, settings, "2026-03-09T17:30:00Z")
    sched_seed.set_timezone(uid, "Pacific/Pago_Pago")
    sched_seed.set_preference(uid, time_of_day="06:40")
    report = await tick(db, settings, "2026-03-09T17:35:00Z")
    assert [(e["brief_date"], e["notify_at"]) for e in report.enqueued] == [
        (date(2026, 3, 9), utc("2026-03-09T17:40:00Z"))
    ]
    # The 10th still has a brief in the new zone: its job moves to that instant (its key is its date).
    assert [(m["brief_date"], m["notify_at"]) for m in report.moved] == [
        (date(2026, 3, 10), utc("2026-03-10T17:40:00Z"))
    ]
    keys = sorted(j["dedup_key"] for j in sched_seed.jobs(uid, status="pending"))
    assert keys == [f"brief:{uid}:2026-03-09", f"brief:{uid}:2026-03-10"]


async def test_weekly_day_change_cancels_the_pending_job(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00", frequency="weekly", day_of_week=2)  # Tuesday 2026-03-10
    await tick(db, settings, "2026-03-10T07:30:00Z")
    sched_seed.set_preference(uid, day_of_week=5)
    report = await tick(db, settings, "2026-03-10T07:35:00Z")
    assert [c["user_id"] for c in report.cancelled] == [uid]
    assert "no brief on 2026-03-10" in report.cancelled[0]["reason"]
    [job] = sched_seed.jobs(uid)
    assert job["status"] == "cancelled" and job["finished_at"] is not None


async def test_deactivated_preference_cancels_the_pending_job(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    other = sched_seed.user("UTC", "08:00")
    await tick(db, settings, "2026-03-10T07:30:00Z")
    sched_seed.set_preference(uid, is_active=False)
    report = await tick(db, settings, "2026-03-10T07:35:00Z")
    assert [(c["user_id"], c["reason"]) for c in report.cancelled] == [(uid, "preference inactive or removed")]
    assert [j["status"] for j in sched_seed.jobs(uid)] == ["cancelled"]
    assert [j["status"] for j in sched_seed.jobs(other)] == ["pending"]
    # Re-activated: a cancelled job does not block the date.
    sched_seed.set_preference(uid, is_active=True)
    report = await tick(db, settings, "2026-03-10T07:40:00Z")
    assert [e["user_id"] for e in report.enqueued] == [uid]


async def test_hand_made_and_claimed_jobs_are_left_alone(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    manual = sched_seed.user("UTC", "08:00", active=False)
    claimed = sched_seed.user("UTC", "08:00")
    hand = sched_seed.job(manual, "2026-03-10", "pending", notify_at=utc("2026-03-10T03:00:00Z"), source=None)
    await tick(db, settings, "2026-03-10T07:30:00Z")
    sched_seed.execute(
        """UPDATE queue_jobs SET status = 'processing', processing_token = gen_random_uuid(),
                  lease_expires_at = now() + interval '1 hour' WHERE user_id = %s""",
        (claimed,),
    )
    sched_seed.set_preference(claimed, time_of_day="07:45")
    report = await tick(db, settings, "2026-03-10T07:35:00Z")
    assert (report.moved, report.cancelled, report.enqueued) == ([], [], [])
    assert [(j["id"], j["status"]) for j in sched_seed.jobs(manual)] == [(hand, "pending")]


# --------------------------------------------------------------------------- skips, dry run, lock


async def test_invalid_timezone_is_skipped_others_enqueued(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    good1 = sched_seed.user("UTC", "08:00")
    bad = sched_seed.user("Mars/Olympus_Mons", "08:00")
    lower = sched_seed.user("europe/paris", "09:00")  # names are case-sensitive
    good2 = sched_seed.user("Europe/Paris", "09:00")
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    assert {e["user_id"] for e in report.enqueued} == {good1, good2}
    reasons = {s["user_id"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {bad, lower}
    assert reasons[bad].startswith("invalid_timezone: ") and "Mars/Olympus_Mons" in reasons[bad]
    assert report.to_dict()["skipped_by_kind"] == {"invalid_timezone": 2}
    assert "invalid_timezone 2" in report.summary()


async def test_dry_run_writes_nothing(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    moving = sched_seed.user("UTC", "08:00")
    await tick(db, settings, "2026-03-10T07:30:00Z")
    sched_seed.set_preference(moving, time_of_day="08:20")
    fresh = sched_seed.user("UTC", "08:10")
    before = sched_seed.rows("SELECT * FROM queue_jobs ORDER BY id")

    listener = psycopg.connect(sched_seed.url, autocommit=True)
    try:
        listener.execute("LISTEN briefs_queue")
        report = await tick(db, settings, "2026-03-10T07:35:00Z", dry_run=True)
        assert list(listener.notifies(timeout=0.2, stop_after=1)) == []
    finally:
        listener.close()
    assert report.dry_run
    assert [(e["user_id"], e["job_id"]) for e in report.enqueued] == [(fresh, None)]
    assert [m["user_id"] for m in report.moved] == [moving]
    assert sched_seed.rows("SELECT * FROM queue_jobs ORDER BY id") == before
    assert "dry run" in report.summary()


async def test_ticks_notify_workers(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    sched_seed.user("UTC", "08:00")
    listener = psycopg.connect(sched_seed.url, autocommit=True)
    try:
        listener.execute("LISTEN briefs_queue")
        await tick(db, settings, "2026-03-10T07:30:00Z")
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1
    finally:
        listener.close()


async def test_engagement_skips_and_stages(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    today = date(2026, 3, 10)
    active = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-09T18:00:00Z"))
    day4 = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-06T18:00:00Z"))
    day6_sent = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-04T18:00:00Z"))
    sched_seed.brief(day6_sent, today - timedelta(days=2), "re_engagement")
    day6_queued = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-04T18:00:00Z"))
    sched_seed.job(day6_queued, today - timedelta(days=1), "pending", notify_at=utc("2026-03-09T08:00:00Z"))
    sched_seed.execute(
        """UPDATE queue_jobs SET payload = payload || '{"engagement_stage": "re_engagement"}'
           WHERE user_id = %s""",
        (day6_queued,),
    )
    day6_failed = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-04T18:00:00Z"))
    sched_seed.brief(day6_failed, today - timedelta(days=2), "re_engagement", status="failed")
    dormant = sched_seed.user("UTC", "08:00", last_visit_at=utc("2025-12-01T12:00:00Z"))
    sched_seed.brief(dormant, date(2026, 1, 1), "re_engagement_late")
    sched_seed.brief(dormant, date(2026, 1, 30), "dormant_check_in")

    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    stages = {e["user_id"]: e["stage"] for e in report.enqueued}
    assert stages == {active: "standard", day4: "re_engagement", day6_failed: "re_engagement"}
    reasons = {s["user_id"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {day6_sent, day6_queued, dormant}
    assert all(r.startswith("engagement: ") for r in reasons.values())
    assert "dormant_check_in sent on 2026-01-30" in reasons[dormant]
    assert report.to_dict()["skipped_by_kind"] == {"engagement": 3}
    [job] = sched_seed.jobs(day4)
    assert job["payload"]["engagement_stage"] == "re_engagement"


async def test_a_failing_engagement_check_skips_only_that_user(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from briefs import engagement

    ok = sched_seed.user("UTC", "08:00")
    broken = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-01T00:00:00Z"))
    real = engagement.decide

    def decide(last_visit_at: Any, *args: Any, **kw: Any) -> engagement.Decision:
        if last_visit_at is not None:
            raise RuntimeError("boom")
        return real(last_visit_at, *args, **kw)

    monkeypatch.setattr(engagement, "decide", decide)
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    assert [e["user_id"] for e in report.enqueued] == [ok]
    assert report.skipped == [{"user_id": broken, "reason": "engagement_error: RuntimeError: boom"}]


async def test_locked_by_another_scheduler(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    from scheduler.tick import LOCK_KEY

    sched_seed.user("UTC", "08:00")
    with psycopg.connect(sched_seed.url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        report = await run_tick(db, settings, utc("2026-03-10T07:30:00Z"))
        assert report.skipped_locked and report.enqueued == [] and report.queries == 1
        assert "another scheduler" in report.summary()
    report = await run_tick(db, settings, utc("2026-03-10T07:30:00Z"))
    assert not report.skipped_locked and len(report.enqueued) == 1


async def test_naive_now_is_refused(db: Database, settings: Settings) -> None:
    with pytest.raises(ValueError, match="aware"):
        await run_tick(db, settings, datetime(2026, 3, 10, 7, 30))


async def test_report_to_dict_and_summary(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    for _ in range(7):
        sched_seed.user("UTC", "08:00")
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    data = report.to_dict()
    assert data["now"] == "2026-03-10T07:30:00Z"
    assert data["users_seen"] == 7 and data["pages"] == 1 and len(data["enqueued"]) == 7
    first = data["enqueued"][0]
    assert set(first) == {"user_id", "brief_date", "notify_at", "run_at", "job_id", "stage", "catch_up"}
    assert first["brief_date"] == "2026-03-10" and first["notify_at"] == "2026-03-10T08:00:00Z"
    text = report.summary()
    assert "enqueued 7" in text and "and 2 more" in text


async def test_a_huge_engagement_error_is_clipped_in_the_reason_and_the_log(
    db: Database,
    settings: Settings,
    sched_seed: SchedulerSeed,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from briefs import engagement

    broken = sched_seed.user("UTC", "08:00", last_visit_at=utc("2026-03-01T00:00:00Z"))

    def decide(*args: Any, **kw: Any) -> engagement.Decision:
        raise RuntimeError("line one\nline two " + "z" * 60_000)

    monkeypatch.setattr(engagement, "decide", decide)
    report = await tick(db, settings, "2026-03-10T07:30:00Z")
    [skip] = report.skipped
    assert skip["user_id"] == broken and skip["reason"].startswith("engagement_error: RuntimeError: 'line one\\nline")
    assert len(skip["reason"]) < 200 and "(60,018 characters)" in skip["reason"]
    assert all(len(r.getMessage()) < 500 and "\n" not in r.getMessage() for r in caplog.records)


def test_pending_job_keys_are_read_only_as_the_scheduler_writes_them() -> None:
    from briefs.contract import brief_date_of_key as _parse_key

    assert _parse_key("brief:7:2026-03-10", 7) == date(2026, 3, 10)
    for key in (
        "brief:7:2026-03-10",  # another user's key
        "brief:7:20260310",  # fromisoformat reads it, dedup_key never writes it
        "brief:7:2026-W11-2",
        "brief:7:2026-03-1\u0661",  # an Arabic-Indic digit
        "brief:7:2026-02-30",
        "brief:7:99999-01-01",
        "brief:07:2026-03-10",
        "brief:7:2026-03-10:x",
        "brief:7:" + "9" * 10_000,
        "",
    ):
        assert _parse_key(key, 8 if key == "brief:7:2026-03-10" else 7) is None, key


@pytest.mark.parametrize(
    ("frequency", "day_of_week", "fragment"),
    [
        ("hourly", None, "frequency='hourly'"),
        ("weekly", None, "day_of_week=None"),
        ("weekly", 8, "day_of_week=8"),
        ("daily\n" + "d" * 60_000, None, "(60,006 characters)"),
    ],
)
def test_a_preference_the_schema_would_refuse_is_skipped_not_raised(
    settings: Settings, frequency: str, day_of_week: int | None, fragment: str
) -> None:
    # The CHECK constraints refuse these rows (tests/integration/test_hostile_scheduler.py); a database
    # without them still never stops a tick.
    from scheduler.tick import _Planner

    found = _Planner(utc("2026-03-10T07:30:00Z"), settings).plan(("UTC", frequency, day_of_week, time(8)), 1)
    assert isinstance(found, ValueError)
    reason = str(found)
    assert reason.startswith("invalid_preference: ") and fragment in reason
    assert len(reason) < 200 and reason.isprintable()
