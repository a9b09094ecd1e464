"""Loading what one brief needs: the user, their preference, their active projects.

Everything is read in a fixed number of statements, whatever the number of
projects: one for the user (with the preference), one for the active projects
(with their open-task counts), one for the relevant tasks of all those projects
(``project_id = ANY(%s)``) and one for the recent notes (a window function keeps
the newest five per project). All SQL of this module is in ``_SQL`` below.

Buckets, for the user's local brief date ``D`` (the calendar date of
``notify_at`` in the user's timezone):

- ``today``: not done, not cancelled, and ``start_date = D`` or ``due_date = D``
  (a task due today is as much "today" as one starting today);
- ``overdue``: not done, not cancelled, ``due_date < D``;
- ``upcoming``: not done, not cancelled, ``D < due_date <= D + 7 days``;
- ``completed``: ``status = 'done'`` and ``completed_at`` in the 24 hours before
  the brief's *anchor* instant: ``notify_at`` when known (what the user sees at
  the moment they asked for), otherwise the end of the local day ``D``.
- ``notes``: updated in the 7 days before the anchor, newest five per project.

Deleted tasks (``deleted_at IS NOT NULL``) never appear. A task may sit in two
buckets (due yesterday and starting today is both overdue and today).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

log = logging.getLogger(__name__)

COMPLETED_WINDOW = timedelta(hours=24)
NOTES_WINDOW = timedelta(days=7)
UPCOMING_DAYS = 7
NOTES_PER_PROJECT = 5

Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class Preference:
    frequency: str
    day_of_week: int | None
    time_of_day: time
    is_active: bool
    email_enabled: bool


@dataclass(frozen=True, slots=True)
class UserContext:
    id: int
    email: str
    name: str | None
    timezone: str  # as stored
    tz: ZoneInfo  # the zone used (UTC when the stored name is invalid)
    preference: Preference | None
    last_visit_at: datetime | None

    @property
    def display_name(self) -> str:
        return (self.name or "").strip() or self.email.split("@", 1)[0]

    @property
    def wants_email(self) -> bool:
        return bool(self.preference and self.preference.email_enabled)


@dataclass(frozen=True, slots=True)
class TaskItem:
    id: int
    title: str
    status: str
    priority: str
    start_date: date | None
    due_date: date | None
    completed_at: datetime | None  # in the user's timezone

    @property
    def high(self) -> bool:
        return self.priority == "high"


@dataclass(frozen=True, slots=True)
class NoteItem:
    id: int
    title: str
    content: str
    updated_at: datetime  # in the user's timezone


@dataclass(frozen=True, slots=True)
class ProjectContext:
    id: int
    name: str
    description: str | None
    open_tasks: int
    today: tuple[TaskItem, ...] = ()
    overdue: tuple[TaskItem, ...] = ()  # high priority first, then oldest due date
    upcoming: tuple[TaskItem, ...] = ()  # soonest first
    completed: tuple[TaskItem, ...] = ()  # most recent first
    notes: tuple[NoteItem, ...] = ()  # newest first, at most five

    @property
    def quiet(self) -> bool:
        """Nothing today, nothing overdue, nothing done recently: no LLM call is worth it."""
        return not (self.today or self.overdue or self.completed)

    @property
    def overdue_high(self) -> int:
        return sum(1 for t in self.overdue if t.high)


@dataclass(frozen=True, slots=True)
class BriefContext:
    user: UserContext
    brief_date: date
    anchor: datetime  # UTC instant the "last 24 h" and "last 7 days" windows end at
    projects: tuple[ProjectContext, ...] = field(default_factory=tuple)


_PRIORITY_RANK = {"high": 0, "medium": 1, "low": 2}

_SQL = {
    "user": """
        SELECT u.id, u.email, u.name, u.timezone, u.last_visit_at,
               p.user_id IS NOT NULL, p.frequency, p.day_of_week, p.time_of_day, p.is_active, p.email_enabled
        FROM users u LEFT JOIN brief_preferences p ON p.user_id = u.id
        WHERE u.id = %s
    """,
    "projects": """
        SELECT p.id, p.name, p.description,
               (SELECT count(*) FROM tasks t
                 WHERE t.project_id = p.id AND t.deleted_at IS NULL
                   AND t.status NOT IN ('done', 'cancelled')) AS open_tasks
        FROM projects p
        WHERE p.user_id = %s AND p.status = 'active'
        ORDER BY lower(p.name), p.id
    """,
    # Only the rows some bucket wants: open tasks starting today or due by D + 7,
    # and tasks done inside the completed window.
    "tasks": """
        SELECT t.project_id, t.id, t.title, t.status, t.priority, t.start_date, t.due_date, t.completed_at
        FROM tasks t
        WHERE t.project_id = ANY(%(projects)s) AND t.deleted_at IS NULL
          AND (
                (t.status NOT IN ('done', 'cancelled')
                 AND (t.start_date = %(day)s OR t.due_date <= %(horizon)s))
             OR (t.status = 'done' AND t.completed_at > %(done_since)s AND t.completed_at <= %(anchor)s)
          )
        ORDER BY t.project_id, t.id
    """,
    "notes": """
        SELECT project_id, id, title, content, updated_at FROM (
            SELECT n.project_id, n.id, n.title, n.content, n.updated_at,
                   row_number() OVER (PARTITION BY n.project_id ORDER BY n.updated_at DESC, n.id DESC) AS rank
            FROM notes n
            WHERE n.project_id = ANY(%(projects)s)
              AND n.updated_at > %(since)s AND n.updated_at <= %(anchor)s
        ) ranked
        WHERE rank <= %(limit)s
        ORDER BY project_id, updated_at DESC, id DESC
    """,
}


def zone(name: str | None) -> ZoneInfo:
    """The user's zone; UTC (with a warning) when the stored name is not a valid IANA zone."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("invalid timezone %r; using UTC", name)
        return ZoneInfo("UTC")


def anchor_for(brief_date: date, tz: ZoneInfo, notify_at: datetime | None) -> datetime:
    """The instant the brief's windows end: ``notify_at``, else the end of the local brief day."""
    if notify_at is not None:
        return notify_at.astimezone(UTC)
    next_midnight = datetime.combine(brief_date + timedelta(days=1), time(0), tz)
    return next_midnight.astimezone(UTC)


async def load_user(conn: Conn, user_id: int) -> UserContext | None:
    cur = await conn.execute(_SQL["user"], (user_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    uid, email, name, tzname, last_visit, has_pref, freq, dow, tod, active, email_enabled = row
    pref = Preference(freq, dow, tod, active, email_enabled) if has_pref else None
    return UserContext(uid, email, name, tzname, zone(tzname), pref, last_visit)


async def load_projects(conn: Conn, user: UserContext, brief_date: date, anchor: datetime) -> list[ProjectContext]:
    cur = await conn.execute(_SQL["projects"], (user.id,))
    projects = await cur.fetchall()
    if not projects:
        return []
    ids = [row[0] for row in projects]
    tz = user.tz

    cur = await conn.execute(
        _SQL["tasks"],
        {
            "projects": ids,
            "day": brief_date,
            "horizon": brief_date + timedelta(days=UPCOMING_DAYS),
            "done_since": anchor - COMPLETED_WINDOW,
            "anchor": anchor,
        },
    )
    buckets: dict[int, dict[str, list[TaskItem]]] = defaultdict(lambda: defaultdict(list))
    for pid, tid, title, status, priority, start, due, completed_at in await cur.fetchall():
        task = TaskItem(tid, title, status, priority, start, due, completed_at.astimezone(tz) if completed_at else None)
        mine = buckets[pid]
        if status == "done":
            mine["completed"].append(task)
            continue
        if start == brief_date or due == brief_date:
            mine["today"].append(task)
        if due is not None and due < brief_date:
            mine["overdue"].append(task)
        elif due is not None and brief_date < due:
            mine["upcoming"].append(task)

    cur = await conn.execute(
        _SQL["notes"],
        {"projects": ids, "since": anchor - NOTES_WINDOW, "anchor": anchor, "limit": NOTES_PER_PROJECT},
    )
    notes: dict[int, list[NoteItem]] = defaultdict(list)
    for pid, nid, title, content, updated in await cur.fetchall():
        notes[pid].append(NoteItem(nid, title, content or "", updated.astimezone(tz)))

    far = date.max
    out: list[ProjectContext] = []
    for pid, name, description, open_tasks in projects:
        b = buckets.get(pid, {})
        out.append(
            ProjectContext(
                id=pid,
                name=name,
                description=description,
                open_tasks=int(open_tasks),
                today=tuple(sorted(b.get("today", ()), key=lambda t: (_PRIORITY_RANK.get(t.priority, 3), t.id))),
                overdue=tuple(
                    sorted(b.get("overdue", ()), key=lambda t: (_PRIORITY_RANK.get(t.priority, 3), t.due_date, t.id))
                ),
                upcoming=tuple(sorted(b.get("upcoming", ()), key=lambda t: (t.due_date or far, t.id))),
                completed=tuple(sorted(b.get("completed", ()), key=lambda t: t.completed_at or anchor, reverse=True)),
                notes=tuple(notes.get(pid, ())),
            )
        )
    return out


async def load_brief_context(
    conn: Conn, user_id: int, brief_date: date, notify_at: datetime | None
) -> BriefContext | None:
    """Everything one brief needs, or None when the user does not exist."""
    user = await load_user(conn, user_id)
    if user is None:
        return None
    anchor = anchor_for(brief_date, user.tz, notify_at)
    projects = await load_projects(conn, user, brief_date, anchor)
    return BriefContext(user, brief_date, anchor, tuple(projects))
