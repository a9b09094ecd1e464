"""Demo data for ``briefs run --demo``: a handful of users across timezones.

Idempotent: users are keyed by email, and a user's projects are only created the
first time. Each run moves the first demo user's brief time to one minute from
now (in their timezone) so a newcomer sees a brief being made right away; on a
second run the same day :func:`todays_brief_made` tells ``briefs run --demo`` that
today's brief exists already, and it queues a fresh one (forced) instead of
promising one the scheduler will rightly never make.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg

from briefs.contract import brief_dedup_key, load_timezone


@dataclass(frozen=True)
class DemoUser:
    email: str
    name: str
    timezone: str
    time_of_day: time
    frequency: str = "daily"
    day_of_week: int | None = None


DEMO_USERS = (
    DemoUser("ada@example.com", "Ada", "Europe/London", time(8, 0)),
    DemoUser("grace@example.com", "Grace", "America/New_York", time(7, 30)),
    DemoUser("ravi@example.com", "Ravi", "Asia/Kolkata", time(9, 0)),
    DemoUser("mei@example.com", "Mei", "Asia/Tokyo", time(8, 15)),
    DemoUser("tane@example.com", "Tane", "Pacific/Auckland", time(7, 0), "weekly", 1),
)

# (project name, description, [(title, status, priority, start offset, due offset, completed hours ago)], [notes])
_Task = tuple[str, str, str, int | None, int | None, int | None]
DEMO_PROJECTS: tuple[tuple[str, str, list[_Task], list[tuple[str, str]]], ...] = (
    (
        "Website relaunch",
        "New marketing site on the headless CMS, launching before the holidays.",
        [
            ("Migrate blog posts to the CMS", "in_progress", "high", -3, 0, None),
            ("Fix hero image on mobile Safari", "blocked", "high", -5, -2, None),
            ("Write launch announcement", "backlog", "medium", 0, 3, None),
            ("Set up redirects from old URLs", "done", "high", -4, -1, 5),
            ("Accessibility audit", "backlog", "medium", 2, 6, None),
        ],
        [
            ("Call with design", "Agreed to ship the dark theme after launch; keep the header sticky."),
            ("CMS quirks", "Preview links expire after 24h; ask vendor about longer tokens."),
        ],
    ),
    (
        "Q4 hiring",
        "Two backend engineers and one designer by end of quarter.",
        [
            ("Review take-home submissions", "in_progress", "high", -1, 1, None),
            ("Schedule onsite for candidate B", "backlog", "medium", 0, 2, None),
            ("Update job description for designer", "done", "low", -6, -3, 20),
            ("Send offer letter to candidate A", "backlog", "high", None, -1, None),
        ],
        [("Pipeline", "12 applicants this week, 3 strong. Referral bonus doubled until Dec 15.")],
    ),
    (
        "Mobile app 2.0",
        "Offline mode and a redesigned task list.",
        [
            ("Offline sync conflict resolution", "in_progress", "high", -7, 4, None),
            ("Beta build for TestFlight", "backlog", "medium", 1, 5, None),
            ("Crash on Android 12 when rotating", "done", "high", -2, 0, 3),
        ],
        [("Beta feedback", "Testers love the new list; two report slow sync on 3G.")],
    ),
    (
        "Garden shed",
        "Weekend project.",
        [("Buy timber", "backlog", "low", None, 20, None)],
        [],
    ),
)


async def seed(
    conn: psycopg.AsyncConnection[Any],
    now: datetime,
    on_user: Callable[[int, int, str], None] | None = None,
) -> list[tuple[int, str, datetime]]:
    """Create the demo users (once) and set the first one's brief a minute from ``now``.

    Returns (user_id, email, the first brief's instant or next local time) per user.
    """
    seeded: list[tuple[int, str, datetime]] = []
    for index, user in enumerate(DEMO_USERS):
        tz = load_timezone(user.timezone)
        local_now = now.astimezone(tz)
        cur = await conn.execute(
            """INSERT INTO users (email, name, timezone, last_visit_at) VALUES (%s, %s, %s, %s)
               ON CONFLICT (email) DO UPDATE SET last_visit_at = EXCLUDED.last_visit_at
               RETURNING id, (xmax = 0) AS created""",
            (user.email, user.name, user.timezone, now),
        )
        row = await cur.fetchone()
        assert row is not None
        user_id, created = row
        if created:
            await _projects(conn, user_id, local_now.date(), now)
        at = user.time_of_day
        frequency, weekday = user.frequency, user.day_of_week
        when = datetime.combine(local_now.date(), at, tz)
        if index == 0:
            # The showcase: due one minute from now, local time (its local date may be tomorrow).
            when = (local_now + timedelta(minutes=1)).replace(microsecond=0)
            at = when.time().replace(tzinfo=None)
            frequency, weekday = "daily", None
        await conn.execute(
            """INSERT INTO brief_preferences (user_id, frequency, day_of_week, time_of_day, is_active, email_enabled)
               VALUES (%s, %s, %s, %s, true, true)
               ON CONFLICT (user_id) DO UPDATE
               SET frequency = EXCLUDED.frequency, day_of_week = EXCLUDED.day_of_week,
                   time_of_day = EXCLUDED.time_of_day, is_active = true, updated_at = now()""",
            (user_id, frequency, weekday, at),
        )
        seeded.append((user_id, user.email, when.astimezone(UTC)))
        if on_user:
            on_user(index + 1, len(DEMO_USERS), user.email)
    return seeded


async def _projects(conn: psycopg.AsyncConnection[Any], user_id: int, today: date, now: datetime) -> None:
    for name, description, tasks, notes in DEMO_PROJECTS:
        cur = await conn.execute(
            "INSERT INTO projects (user_id, name, description) VALUES (%s, %s, %s) RETURNING id",
            (user_id, name, description),
        )
        row = await cur.fetchone()
        assert row is not None
        project_id = row[0]
        for title, status, priority, start, due, done_hours_ago in tasks:
            await conn.execute(
                """INSERT INTO tasks (project_id, user_id, title, status, priority, start_date, due_date, completed_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
                (
                    project_id,
                    user_id,
                    title,
                    status,
                    priority,
                    None if start is None else today + timedelta(days=start),
                    None if due is None else today + timedelta(days=due),
                    None if done_hours_ago is None else now - timedelta(hours=done_hours_ago),
                ),
            )
        for title, content in notes:
            await conn.execute(
                "INSERT INTO notes (project_id, user_id, title, content, updated_at) VALUES (%s, %s, %s, %s, %s)",
                (project_id, user_id, title, content, now - timedelta(hours=30)),
            )


async def todays_brief_made(db: Any, user_id: int, when: datetime) -> date | None:
    """The demo user's brief date (the local date of ``when``) if that brief is already made.

    "Made" is what stops the scheduler from queueing it again: a finished brief, or a
    completed job with that date's dedup key. A pending or running job will still
    produce it; a failed or cancelled one is replaced by the scheduler.
    """
    async with db.raw() as conn:
        cur = await conn.execute("SELECT timezone FROM users WHERE id = %s", (user_id,))
        row = await cur.fetchone()
        tz = load_timezone(row[0]) if row and row[0] in {u.timezone for u in DEMO_USERS} else UTC
        day = when.astimezone(tz).date()
        cur = await conn.execute(
            """SELECT EXISTS (SELECT 1 FROM daily_briefs
                              WHERE user_id = %(uid)s AND brief_date = %(day)s AND status IN ('completed', 'partial'))
                   OR EXISTS (SELECT 1 FROM queue_jobs WHERE dedup_key = %(key)s AND status = 'completed')""",
            {"uid": user_id, "day": day, "key": brief_dedup_key(user_id, day)},
        )
        made = await cur.fetchone()
    return day if made and made[0] else None
