"""Hostile rows never stop a tick: a table of bad users, queue rows and briefs next to innocent users.

Each bad user is skipped with a clear, short reason (or handled sensibly: a job with an absurd instant is moved
to the planned one); every innocent due user is enqueued; the tick completes. The values are the ones psycopg
cannot decode (``24:00``, ``infinity``, BC dates, years past 9999), the ones Python cannot convert to a local
time (year 1 or 9999 in a far zone), the ones a ``::date`` cast rejects ('2026-02-30'), and oversized or
malformed text.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from briefs.db import Database
from briefs.settings import Settings
from scheduler.report import TickReport
from scheduler.tick import run_tick
from tests.conftest import SchedulerSeed, make_settings

NOW = datetime(2026, 3, 10, 7, 30, tzinfo=UTC)  # UTC users at 08:00 are due
TODAY = date(2026, 3, 10)
REASON_MAX = 300  # every reason stays short whatever the value behind it
LONG_TZ = "Europe/" + "x" * (60 * 1024)


def reasons(report: TickReport) -> dict[int, str]:
    return {s["user_id"]: s["reason"] for s in report.skipped}


async def run(db: Database, settings: Settings, now: datetime = NOW, **kw: Any) -> TickReport:
    report = await run_tick(db, settings, now, **kw)
    assert not report.skipped_locked
    json.dumps(report.to_dict())
    return report


# --------------------------------------------------------------------------- bad user and preference rows

# (timezone, time_of_day, last_visit_at (SQL literal or None), expected reason prefix, a fragment of the reason)
BAD_USERS = [
    ("UTC", "24:00", None, "invalid_preference: ", "24:00:00"),
    ("UTC", "08:00", "infinity", "invalid_last_visit: ", "'infinity'"),
    ("UTC", "08:00", "-infinity", "invalid_last_visit: ", "'-infinity'"),
    ("UTC", "08:00", "0044-03-15 12:00+00 BC", "invalid_last_visit: ", "before 0001-01-03 (BC dates included)"),
    # Decodable in a UTC session, but not in the user's zone (Python dates stop at 9999 and start at 1).
    ("Pacific/Kiritimati", "22:00", "9999-12-31 20:00+00", "invalid_last_visit: ", "after 9999-12-29"),
    ("America/New_York", "03:00", "0001-01-01 00:00+00", "invalid_last_visit: ", "before 0001-01-03"),
    (LONG_TZ, "08:00", None, "invalid_timezone: ", "61,447 characters"),
    ("Factory", "08:00", None, "invalid_timezone: ", "'Factory'"),
    ("", "08:00", None, "invalid_timezone: ", "empty"),
    ("UTC\n", "08:00", None, "invalid_timezone: ", "'UTC\\n'"),
    ("Europe/Paris\u202e", "08:00", None, "invalid_timezone: ", "\\u202e"),
    ("Mars/Olympus_Mons", "08:00", None, "invalid_timezone: ", "Mars/Olympus_Mons"),
]


async def test_bad_users_are_skipped_with_a_reason_and_the_others_enqueued(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    innocent = [sched_seed.user("UTC", "08:00")]
    bad: dict[int, tuple[str, str]] = {}
    for tz, at, visit, prefix, fragment in BAD_USERS:
        uid = sched_seed.user(tz, at)
        if visit is not None:
            sched_seed.execute("UPDATE users SET last_visit_at = %s::timestamptz WHERE id = %s", (visit, uid))
        bad[uid] = (prefix, fragment)
        innocent.append(sched_seed.user("UTC", "08:00", last_visit_at=NOW - timedelta(days=1)))
    innocent.append(sched_seed.user("UTC", "08:00", last_visit_at=NOW - timedelta(days=9)))  # engagement query
    # A visit far in the future but inside Python's calendar is not unusable: the user counts as active.
    innocent.append(sched_seed.user("Pacific/Kiritimati", "21:45", last_visit_at=datetime(9000, 1, 1, tzinfo=UTC)))

    report = await run(db, settings)
    assert sorted(e["user_id"] for e in report.enqueued) == sorted(innocent)
    got = reasons(report)
    assert set(got) == set(bad)
    for uid, (prefix, fragment) in bad.items():
        assert got[uid].startswith(prefix), got[uid]
        assert fragment in got[uid], got[uid]
        assert len(got[uid]) <= REASON_MAX and "\n" not in got[uid]
    assert report.users_seen == len(innocent) + len(bad)
    # Nothing hostile reaches a log line at full length or spreads over several lines.
    for record in caplog.records:
        message = record.getMessage()
        assert len(message) <= 2000 and "x" * 200 not in message, message[:300]
    # The next tick sees the same rows and still completes.
    report = await run(db, settings, NOW + timedelta(minutes=5))
    assert set(reasons(report)) == set(bad) and report.deduplicated == len(innocent)


async def test_a_page_of_only_bad_rows_does_not_stop_the_next_page(
    db: Database, database_url: str, sched_seed: SchedulerSeed
) -> None:
    settings = make_settings(database_url, scheduler_page_size=3)
    bad = [sched_seed.user("UTC", "24:00") for _ in range(3)]
    good = [sched_seed.user("UTC", "08:00") for _ in range(3)]
    report = await run(db, settings)
    assert report.pages == 2
    assert set(reasons(report)) == set(bad)
    assert sorted(e["user_id"] for e in report.enqueued) == good
    # Constant statements per page whatever the rows hold: lock, pending, the empty last page, the
    # orphaned-briefs sweep, NOTIFY; per page the preferences, and for the page with due users dedup and
    # enqueue (no engagement query).
    assert report.queries == 5 + 1 + 3


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("users.timezone", "UTC\x00"),  # Postgres text cannot hold NUL: such a timezone never reaches a tick
        ("brief_preferences.day_of_week", 9),
        ("brief_preferences.day_of_week", 0),
        ("brief_preferences.frequency", "hourly"),
    ],
)
def test_the_schema_refuses_some_hostile_values(clean_db: str, column: str, value: object) -> None:
    table, name = column.split(".")
    with psycopg.connect(clean_db, autocommit=True) as conn:
        uid = conn.execute("INSERT INTO users (email) VALUES ('schema@example.com') RETURNING id").fetchone()
        assert uid is not None
        with pytest.raises((psycopg.errors.CheckViolation, psycopg.DataError)):
            if table == "users":
                conn.execute(f"UPDATE users SET {name} = %s WHERE id = %s", (value, uid[0]))
            else:
                conn.execute(
                    "INSERT INTO brief_preferences (user_id, frequency, day_of_week) VALUES (%s, 'weekly', 1)",
                    (uid[0],),
                )
                conn.execute(f"UPDATE brief_preferences SET {name} = %s WHERE user_id = %s", (value, uid[0]))


# --------------------------------------------------------------------------- bad queue rows


def raw_job(
    seed: SchedulerSeed,
    user_id: int | None,
    *,
    key: str | None,
    status: str = "pending",
    notify_at: str | None = None,
    payload: Any = None,
) -> int:
    """A queue row exactly as given (SQL literals for the instant), bypassing every check."""
    if payload is None:
        payload = {
            "user_id": user_id,
            "brief_date": key.rsplit(":", 1)[-1] if key else None,
            "engagement_stage": "standard",
            "email": False,
            "catch_up": False,
            "source": "scheduler",
        }
    [row] = seed.rows(
        """INSERT INTO queue_jobs (job_type, payload, status, priority, run_at, dedup_key, user_id, notify_at,
                                   processing_token, lease_expires_at, finished_at)
           VALUES ('generate_daily_brief', %(payload)s, %(status)s, 50, now(), %(key)s, %(user)s,
                   %(notify)s::timestamptz,
                   CASE WHEN %(status)s = 'processing' THEN gen_random_uuid() END,
                   CASE WHEN %(status)s = 'processing' THEN now() + interval '1 hour' END,
                   CASE WHEN %(status)s IN ('completed', 'failed', 'cancelled') THEN now() END)
           RETURNING id""",
        {"payload": Jsonb(payload), "status": status, "key": key, "user": user_id, "notify": notify_at},
    )
    return int(row["id"])  # type: ignore[call-overload]


async def test_bad_queue_rows_never_stop_the_tick(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    today = TODAY.isoformat()
    # A pending scheduler job for today with an infinite instant: moved to the planned instant (repaired).
    repaired = sched_seed.user("UTC", "08:00")
    repaired_job = raw_job(sched_seed, repaired, key=f"brief:{repaired}:{today}", notify_at="infinity")
    # A completed job for today with an infinite instant: it blocks today's brief (deduplicated).
    done = sched_seed.user("UTC", "08:00")
    raw_job(sched_seed, done, key=f"brief:{done}:{today}", status="completed", notify_at="infinity")
    # A BC instant on a pending job of another date: moved to that date's instant; today's brief is enqueued.
    ancient = sched_seed.user("UTC", "08:00")
    ancient_job = raw_job(sched_seed, ancient, key=f"brief:{ancient}:2026-03-12", notify_at="0044-03-15 BC")
    # Pending scheduler jobs with keys the scheduler never writes: left alone, today enqueued.
    garbage = sched_seed.user("UTC", "08:00")
    garbage_keys = [
        "brief:not-a-number:2026-03-10",
        f"brief:{garbage}:20260311",  # a date Python's fromisoformat accepts, but not our format
        f"brief:{garbage}:2026-02-30",
        f"brief:{garbage}:99999-01-01",
        f"brief:{garbage}:9999-12-31",  # a real date whose 20:45 in UTC-11 is past year 9999 in UTC
        f"brief:{garbage + 1000}:2026-03-11",  # another user's key on this user's row
        "brief:" + "9" * 2000,  # (the dedup index refuses keys much longer than this)
        "",
    ]
    garbage_jobs = [raw_job(sched_seed, garbage, key=k, notify_at="2026-03-11T08:00:00Z") for k in garbage_keys]
    sched_seed.set_timezone(garbage, "Pacific/Pago_Pago")
    sched_seed.set_preference(garbage, time_of_day="20:45")  # 07:45Z on the 10th, the 9th's brief in -11
    # A live job for today whose payload is not an object: a hand-made job, it blocks and is left alone.
    odd = sched_seed.user("UTC", "08:00")
    odd_job = raw_job(sched_seed, odd, key=f"brief:{odd}:{today}", payload=["not", "an", "object"])
    plain = [sched_seed.user("UTC", "08:00") for _ in range(3)]

    report = await run(db, settings)
    enqueued = {e["user_id"]: e for e in report.enqueued}
    assert set(enqueued) == {ancient, garbage, *plain}
    assert enqueued[garbage]["brief_date"] == date(2026, 3, 9)
    assert report.skipped == []
    # Jobs with an instant Python cannot hold are put at their planned instant.
    assert sorted((m["job_id"], m["notify_at"]) for m in report.moved) == [
        (repaired_job, datetime(2026, 3, 10, 8, 0, tzinfo=UTC)),
        (ancient_job, datetime(2026, 3, 12, 8, 0, tzinfo=UTC)),
    ]
    assert report.deduplicated == 2  # done, odd
    assert report.cancelled == []
    by_id = {
        j["id"]: j
        for j in sched_seed.rows(
            "SELECT id, status, payload, (notify_at AT TIME ZONE 'UTC')::text AS notify_at FROM queue_jobs"
        )
    }
    assert by_id[repaired_job]["payload"]["notify_at"] == "2026-03-10T08:00:00Z"
    assert by_id[repaired_job]["notify_at"] == "2026-03-10 08:00:00"
    assert (by_id[ancient_job]["status"], by_id[ancient_job]["notify_at"]) == ("pending", "2026-03-12 08:00:00")
    assert all(by_id[j]["status"] == "pending" for j in garbage_jobs)
    assert by_id[odd_job]["payload"] == ["not", "an", "object"]


async def test_pending_jobs_with_infinite_instants_of_inactive_users_are_cancelled(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    gone = sched_seed.user("UTC", "08:00", active=False)
    job = raw_job(sched_seed, gone, key=f"brief:{gone}:2026-03-11", notify_at="-infinity")
    report = await run(db, settings)
    assert [(c["job_id"], c["reason"]) for c in report.cancelled] == [(job, "preference inactive or removed")]


async def test_pending_jobs_of_a_deleted_user_are_cancelled(
    db: Database, settings: Settings, sched_seed: SchedulerSeed
) -> None:
    gone = sched_seed.user("UTC", "08:00")
    job = sched_seed.job(gone, "2026-03-11", "pending", notify_at=datetime(2026, 3, 11, 8, tzinfo=UTC))
    sched_seed.execute("DELETE FROM users WHERE id = %s", (gone,))  # the preference goes with it
    report = await run(db, settings)
    assert [(c["job_id"], c["user_id"]) for c in report.cancelled] == [(job, gone)]


# --------------------------------------------------------------------------- bad engagement history


@pytest.mark.parametrize(
    "brief_date",
    [
        "2026-02-30",
        "2026-13-01",
        "0000-01-01",
        "99999-01-01",
        "2026-03-07\n",
        "2026-03-07T00:00",
        20260307,
        None,
        {"y": 2026},
        "x" * 60_000,
    ],
)
async def test_bad_brief_dates_in_queued_payloads_are_ignored(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, brief_date: Any
) -> None:
    # Inactive 6 days: the engagement query reads the user's live jobs. A valid one keeps its meaning.
    visit = NOW - timedelta(days=6)
    hostile = sched_seed.user("UTC", "08:00", last_visit_at=visit)
    raw_job(
        sched_seed,
        hostile,
        key=f"brief:{hostile}:bad",
        payload={"brief_date": brief_date, "source": "x", "engagement_stage": "re_engagement"},
    )
    sent = sched_seed.user("UTC", "08:00", last_visit_at=visit)
    raw_job(
        sched_seed,
        sent,
        key=f"brief:{sent}:2026-03-08",
        notify_at="2026-03-08T08:00:00Z",
        payload={"brief_date": "2026-03-08", "engagement_stage": "re_engagement", "source": "x"},
    )
    report = await run(db, settings)
    assert {e["user_id"]: e["stage"] for e in report.enqueued} == {hostile: "re_engagement"}
    assert list(reasons(report)) == [sent]


@pytest.mark.parametrize(
    "brief_date", ["infinity", "-infinity", "9999-12-31", "10000-01-01", "4713-01-01 BC", "200000-06-01"]
)
async def test_briefs_dated_far_away_do_not_break_the_history(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, brief_date: str
) -> None:
    hostile = sched_seed.user("UTC", "08:00", last_visit_at=NOW - timedelta(days=6))
    sched_seed.execute(
        """INSERT INTO daily_briefs (user_id, brief_date, status, engagement_stage)
           VALUES (%s, %s::date, 'completed', %s)""",
        (hostile, brief_date, "re_engagement" + "!" * 60_000),
    )
    other = sched_seed.user("UTC", "08:00", last_visit_at=NOW - timedelta(days=6))
    report = await run(db, settings)
    assert {e["user_id"]: e["stage"] for e in report.enqueued} == {hostile: "re_engagement", other: "re_engagement"}


# --------------------------------------------------------------------------- a dry run accounts for everyone


async def test_dry_run_accounts_for_every_user(db: Database, settings: Settings, sched_seed: SchedulerSeed) -> None:
    due = sched_seed.user("UTC", "08:00")
    queued = sched_seed.user("UTC", "08:00")
    sched_seed.job(queued, TODAY, "pending", notify_at=datetime(2026, 3, 10, 8, tzinfo=UTC))
    later = sched_seed.user("UTC", "18:00")
    weekly = sched_seed.user("Asia/Tokyo", "09:00", frequency="weekly", day_of_week=7)  # next Sunday
    bad = sched_seed.user("UTC", "24:00")
    wrong_tz = sched_seed.user("Nowhere/Land", "08:00")
    lost = sched_seed.user("UTC", "18:00")  # not due, and its last visit is unusable
    sched_seed.execute("UPDATE users SET last_visit_at = 'infinity' WHERE id = %s", (lost,))
    dormant = sched_seed.user("UTC", "08:00", last_visit_at=NOW - timedelta(days=8))
    sched_seed.brief(dormant, TODAY - timedelta(days=2), "re_engagement")

    report = await run(db, settings, dry_run=True)
    data = report.to_dict()
    assert data["detailed"] is True
    assert [e["user_id"] for e in data["enqueued"]] == [due]
    assert data["deduplicated"] == 1
    assert [(d["user_id"], d["brief_date"], d["status"]) for d in data["deduplicated_users"]] == [
        (queued, "2026-03-10", "pending")
    ]
    not_due = {n["user_id"]: n for n in data["not_due"]}
    assert set(not_due) == {later, weekly}
    assert (not_due[later]["brief_date"], not_due[later]["notify_at"]) == ("2026-03-10", "2026-03-10T18:00:00Z")
    assert (not_due[weekly]["brief_date"], not_due[weekly]["notify_at"]) == ("2026-03-15", "2026-03-15T00:00:00Z")
    assert not_due[weekly]["run_at"] == "2026-03-14T23:55:00Z"
    assert set(reasons(report)) == {bad, wrong_tz, dormant, lost}
    assert reasons(report)[lost].startswith("invalid_last_visit: ")
    assert data["not_due_count"] == 2
    # Every user it looked at is accounted for.
    seen = (
        {e["user_id"] for e in data["enqueued"]}
        | {d["user_id"] for d in data["deduplicated_users"]}
        | set(not_due)
        | {s["user_id"] for s in data["skipped"]}
    )
    assert seen == {due, queued, later, weekly, bad, wrong_tz, dormant, lost} and data["users_seen"] == len(seen)
    text = report.summary()
    assert "not due 2" in text and f"user {bad} skipped: invalid_preference" in text

    # A real tick does not list the users that are not due (it only counts them): its cost stays the same.
    # It does not look at the last visit of a user that is not due either: that one counts as not due.
    report = await run(db, settings)
    data = report.to_dict()
    assert data["detailed"] is False and data["not_due"] == [] and data["not_due_count"] == 3
    assert set(reasons(report)) == {bad, wrong_tz, dormant}
    assert data["deduplicated_users"] == [] and data["deduplicated"] == 1


async def test_briefs_no_job_will_finish_are_marked_failed(db: Database, settings: Settings,
                                                           sched_seed: SchedulerSeed) -> None:
    """A worker killed on a brief job's last attempt leaves the brief 'processing' (the rescuer fails the job in
    SQL; no brief code runs). The tick marks such briefs failed, with the job's error; nothing else."""
    day = date(2026, 3, 9)
    orphan, cancelled, live, retried, no_job = (sched_seed.user("UTC", "23:00", active=False) for _ in range(5))
    for uid in (orphan, cancelled, live, retried, no_job):
        sched_seed.brief(uid, day, "standard", status="processing")
    sched_seed.job(orphan, day, "failed")
    sched_seed.execute("UPDATE queue_jobs SET last_error = 'lease expired: worker w1 stopped heartbeating' "
                       "WHERE user_id = %s", (orphan,))
    sched_seed.job(cancelled, day, "cancelled")
    sched_seed.job(live, day, "processing")
    sched_seed.job(retried, day, "failed")
    sched_seed.job(retried, day, "pending", source=None)  # queued again by hand: that job will finish it

    dry = await run(db, settings, dry_run=True)
    assert sorted(b["user_id"] for b in dry.briefs_failed) == [orphan, cancelled]
    assert {b["status"] for b in sched_seed.rows("SELECT status FROM daily_briefs")} == {"processing"}

    report = await run(db, settings)
    assert sorted(b["user_id"] for b in report.briefs_failed) == [orphan, cancelled]
    assert report.to_dict()["briefs_failed"][0]["brief_date"] == "2026-03-09"
    rows = {r["user_id"]: r for r in sched_seed.rows("SELECT user_id, status, error FROM daily_briefs")}
    assert rows[orphan]["status"] == "failed" and "lease expired: worker w1" in rows[orphan]["error"]
    assert rows[cancelled]["status"] == "failed" and "ended cancelled" in rows[cancelled]["error"]
    assert all(rows[u]["status"] == "processing" for u in (live, retried, no_job))
    assert (await run(db, settings)).briefs_failed == []  # once
