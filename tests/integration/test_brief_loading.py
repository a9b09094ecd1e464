"""briefs.loading against real Postgres: buckets in the user's timezone, a fixed number of queries."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from briefs.contract import load_timezone
from briefs.db import Database
from briefs.errors import PermanentError
from briefs.loading import Limits, anchor_for, load_brief_context

AUCKLAND = load_timezone("Pacific/Auckland")  # UTC+13 in March: the local date runs ahead of UTC's
DAY = date(2026, 3, 10)
NOTIFY = datetime(2026, 3, 10, 8, 0, tzinfo=AUCKLAND)  # = 2026-03-09T19:00Z


class CountingConn:
    """Counts statements sent through a psycopg connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.statements = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        return await self.conn.execute(*args, **kwargs)


def titles(tasks: Any) -> set[str]:
    return {t.title for t in tasks}


async def test_buckets_in_a_non_utc_timezone(db: Database, brief_seed: Any) -> None:
    s = brief_seed
    uid = s.user("Kiri", tz="Pacific/Auckland")
    pid = s.project(uid, "Harbour")
    s.task(pid, "starts today", start_date=DAY)
    s.task(pid, "due today", due_date=DAY, priority="high")
    s.task(pid, "starts on the UTC date", start_date=date(2026, 3, 9))  # yesterday locally: no bucket
    s.task(pid, "overdue low", due_date=DAY - timedelta(days=1), priority="low", status="in_progress")
    s.task(pid, "overdue high", due_date=DAY - timedelta(days=5), priority="high", status="blocked")
    s.task(pid, "overdue but cancelled", due_date=DAY - timedelta(days=3), status="cancelled")
    s.task(pid, "upcoming in 7 days", due_date=DAY + timedelta(days=7))
    s.task(pid, "due in 8 days", due_date=DAY + timedelta(days=8))
    s.task(pid, "deleted today", start_date=DAY, deleted_at=NOTIFY - timedelta(hours=1))
    s.task(pid, "deleted overdue", due_date=DAY - timedelta(days=1), deleted_at=NOTIFY - timedelta(days=1))
    # Completed: 24 hours before notify_at, as instants (local 07:30 and 08:30 yesterday).
    s.task(pid, "done 23.5h ago", status="done", completed_at=NOTIFY - timedelta(hours=23, minutes=30))
    s.task(pid, "done 24.5h ago", status="done", completed_at=NOTIFY - timedelta(hours=24, minutes=30))
    s.task(pid, "done after notify", status="done", completed_at=NOTIFY + timedelta(minutes=5))
    s.task(pid, "done and deleted", status="done", completed_at=NOTIFY - timedelta(hours=1), deleted_at=NOTIFY)
    s.task(pid, "overdue but done", status="done", due_date=DAY - timedelta(days=2),
           completed_at=NOTIFY - timedelta(days=3))
    for i in range(7):
        s.note(pid, f"note {i}", "x" * 10, updated_at=NOTIFY - timedelta(days=i, hours=1))  # 0 newest
    s.note(pid, "old note", updated_at=NOTIFY - timedelta(days=8))
    archived = s.project(uid, "Old stuff", status="archived")
    s.task(archived, "archived project task", start_date=DAY)

    async with db.raw() as conn:
        ctx = await load_brief_context(conn, uid, DAY, NOTIFY)
    assert ctx is not None
    assert ctx.user.tz == AUCKLAND and ctx.user.name == "Kiri"
    assert ctx.anchor == NOTIFY.astimezone(UTC)
    [p] = ctx.projects
    assert p.name == "Harbour"
    assert titles(p.today) == {"starts today", "due today"}
    assert [t.title for t in p.overdue] == ["overdue high", "overdue low"]  # high priority first
    assert titles(p.upcoming) == {"upcoming in 7 days"}
    assert titles(p.completed) == {"done 23.5h ago"}
    assert p.completed[0].completed_at is not None and p.completed[0].completed_at.tzinfo == AUCKLAND
    assert [n.title for n in p.notes] == [f"note {i}" for i in range(5)]
    assert p.open_tasks == 7  # not done, not cancelled, not deleted
    assert not p.quiet and p.overdue_high == 1


async def test_anchor_without_notify_at_is_the_end_of_the_local_day() -> None:
    assert anchor_for(DAY, AUCKLAND, None) == datetime(2026, 3, 11, 0, 0, tzinfo=AUCKLAND).astimezone(UTC)


async def test_a_fixed_number_of_queries_whatever_the_number_of_projects(db: Database, brief_seed: Any) -> None:
    s = brief_seed
    few, many = s.user("Few"), s.user("Many")
    s.busy_project(few, "Only", DAY)
    for i in range(30):
        pid = s.busy_project(many, f"P{i:02d}", DAY)
        s.note(pid, "n", updated_at=NOTIFY - timedelta(hours=2))
    counts = []
    for uid, expected in ((few, 1), (many, 30)):
        async with db.raw() as conn:
            counting = CountingConn(conn)
            ctx = await load_brief_context(counting, uid, DAY, NOTIFY)  # type: ignore[arg-type]
        assert ctx is not None and len(ctx.projects) == expected
        counts.append(counting.statements)
    assert counts[0] == counts[1] == 4
    assert all(len(p.notes) == 1 for p in ctx.projects)


async def test_missing_user_and_quiet_project(db: Database, brief_seed: Any) -> None:
    async with db.raw() as conn:
        assert await load_brief_context(conn, 999, DAY, NOTIFY) is None
    uid = brief_seed.user("Quiet", tz="UTC")
    pid = brief_seed.project(uid, "Calm")
    brief_seed.task(pid, "someday", due_date=DAY + timedelta(days=30))
    async with db.raw() as conn:
        ctx = await load_brief_context(conn, uid, DAY, None)
    assert ctx is not None and str(ctx.user.tz) == "UTC"
    [p] = ctx.projects
    assert p.quiet and p.open_tasks == 1


async def test_a_zone_the_scheduler_skips_fails_the_brief_for_the_same_reason(db: Database, brief_seed: Any) -> None:
    """It used to fall back to UTC, so `briefs enqueue` wrote a UTC brief for a user the scheduler skips."""
    uid = brief_seed.user("Lost", tz="Not/AZone")
    brief_seed.project(uid, "Calm")
    async with db.raw() as conn:
        with pytest.raises(PermanentError, match=rf"^user {uid}'s timezone 'Not/AZone' is not in the tz database"):
            await load_brief_context(conn, uid, DAY, None)


async def test_limits_are_applied_in_sql_with_full_counts(db: Database, brief_seed: Any) -> None:
    s = brief_seed
    uid = s.user("N" * 5000)
    conn = s.conn
    busy = s.project(uid, "Busy " + "b" * 5000, description="d" * 5000)
    # 60 overdue (every third high), 7 today, 3 done recently, 40 upcoming; titles of 10,000 characters.
    conn.execute("""INSERT INTO tasks (project_id, user_id, title, priority, due_date)
                    SELECT %s, user_id, lpad(g::text, 10000, '0'), CASE WHEN g %% 3 = 0 THEN 'high' ELSE 'low' END,
                           %s::date - g FROM projects p, generate_series(1, 60) g WHERE p.id = %s""",
                 (busy, DAY, busy))
    for i in range(7):
        s.task(busy, f"today {i}", start_date=DAY)
    for i in range(3):
        s.task(busy, f"done {i}", status="done", completed_at=NOTIFY - timedelta(hours=i + 1))
    for i in range(40):
        s.task(busy, f"soon {i}", due_date=DAY + timedelta(days=1 + i % 7))
    s.note(busy, "T" * 5000, "C" * 5000, updated_at=NOTIFY - timedelta(hours=1))
    less = s.project(uid, "A less busy one")  # sorts first by name, comes second by activity
    s.task(less, "one overdue", due_date=DAY - timedelta(days=1))
    quiet = [s.project(uid, f"Quiet {i}") for i in range(5)]
    s.task(quiet[0], "someday")

    limits = Limits(projects=2, tasks=5, text=30)
    async with db.raw() as conn_:
        counting = CountingConn(conn_)
        ctx = await load_brief_context(counting, uid, DAY, NOTIFY, limits)  # type: ignore[arg-type]
    assert ctx is not None and counting.statements == 4
    assert ctx.user.name == "N" * 30
    assert [p.id for p in ctx.projects] == [busy, less]  # most active first
    assert ctx.more_projects == 5 and ctx.more_names == tuple(f"Quiet {i}" for i in range(5))
    p = ctx.projects[0]
    assert p.name == ("Busy " + "b" * 5000)[:30] and p.description == "d" * 30
    assert all(len(t.title) <= 30 for b in ("overdue", "today", "upcoming", "completed") for t in getattr(p, b))
    assert [len(getattr(p, b)) for b in ("overdue", "today", "upcoming", "completed")] == [5, 5, 5, 3]
    assert [p.total(b) for b in ("overdue", "today", "upcoming", "completed")] == [60, 7, 40, 3]
    assert p.overdue_high == 20
    assert all(t.high for t in p.overdue)  # high priority first, then the oldest due date
    assert [t.due_date for t in p.overdue] == sorted(t.due_date for t in p.overdue)
    assert [t.title for t in p.completed] == ["done 0", "done 1", "done 2"]  # most recent first
    assert [t.due_date for t in p.upcoming] == sorted(t.due_date for t in p.upcoming)
    assert p.notes[0].title == "T" * 30 and p.notes[0].content == "C" * 30
    assert ctx.projects[1].total("overdue") == 1 and ctx.projects[1].overdue_high == 0
