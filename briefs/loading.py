"""Loading what one brief needs: the user, their preference, their active projects.

Everything is read in a fixed number of statements, whatever the number of
projects: one for the user (with the preference), one for the active projects
(with their open-task and activity counts), one for the relevant tasks of the
included projects (``project_id = ANY(%s)``; window functions keep the first
tasks of each bucket and count the rest) and one for the recent notes (a window
function keeps the newest five per project). All SQL of this module is in ``_SQL`` below.

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

Deleted tasks (``deleted_at IS NOT NULL``) never appear, nor do tasks and notes whose
``user_id`` is not the project owner's (a row pointing at another user's project never
leaks into that user's brief). Dates Python cannot hold are read at its limits: a
``start_date``/``due_date`` of ``±infinity`` or BC as 9999-12-31/0001-01-01, a
``last_visit_at`` outside years 1..9999 as unknown (None); one such row never stops a brief. A task may sit in two
buckets (due yesterday and starting today is both overdue and today).

Limits (:class:`Limits`, from the settings), enforced in SQL so a hostile or just huge
account never reaches Python whole: at most ``brief_max_projects`` projects, the most
active first (overdue, then today, then recently completed tasks; the rest are only
counted: ``BriefContext.more_projects``); at most ``brief_max_tasks`` tasks per bucket
of a project, in the bucket's order, with the bucket's full count alongside
(``ProjectContext.total``); and every name, title, description and note cut to
``brief_max_text`` characters by ``left()`` in the query.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import namedtuple_row

from briefs.contract import InvalidTimezone, load_timezone
from briefs.errors import PermanentError
from briefs.render import plain_inline, project_title

log = logging.getLogger(__name__)

COMPLETED_WINDOW = timedelta(hours=24)
NOTES_WINDOW = timedelta(days=7)
UPCOMING_DAYS = 7
NOTES_PER_PROJECT = 5
MORE_NAMED = 10  # projects beyond brief_max_projects named in the brief's "and N more" line
MORE_NAME_CHARS = 60

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
    tz: ZoneInfo  # the stored name's zone (a name the scheduler would skip fails the brief)
    preference: Preference | None
    last_visit_at: datetime | None

    @property
    def display_name(self) -> str:
        """The user's name as one clean line (else the address's local part, else "there")."""
        return plain_inline(self.name, 100) or plain_inline(self.email.split("@", 1)[0], 100) or "there"

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


BUCKETS = ("today", "overdue", "upcoming", "completed")


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
    # Full bucket counts when a bucket holds only its first tasks (brief_max_tasks), and
    # "overdue_high"; a missing key means the tuple is the whole bucket.
    totals: dict[str, int] = field(default_factory=dict)

    def total(self, bucket: str) -> int:
        """How many tasks the bucket really has (its tuple may hold only the first ones)."""
        return self.totals.get(bucket, len(getattr(self, bucket)))

    @property
    def quiet(self) -> bool:
        """Nothing today, nothing overdue, nothing done recently: no LLM call is worth it."""
        return not (self.today or self.overdue or self.completed)

    @property
    def overdue_high(self) -> int:
        high = self.totals.get("overdue_high")
        return high if high is not None else sum(1 for t in self.overdue if t.high)


@dataclass(frozen=True, slots=True)
class BriefContext:
    user: UserContext
    brief_date: date
    anchor: datetime  # UTC instant the "last 24 h" and "last 7 days" windows end at
    projects: tuple[ProjectContext, ...] = field(default_factory=tuple)
    more_projects: int = 0  # active projects beyond brief_max_projects: counted, not loaded
    more_names: tuple[str, ...] = ()  # the names of the first MORE_NAMED of those


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of a user's data one brief loads (see the module docstring)."""

    projects: int = 50
    tasks: int = 25
    text: int = 500

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.brief_max_projects, settings.brief_max_tasks, settings.brief_max_text)


_SQL = {
    "user": """
        SELECT u.id, left(u.email, %(text)s) AS email, left(u.name, %(text)s) AS name,
               left(u.timezone, 100) AS timezone,
               CASE WHEN u.last_visit_at BETWEEN '0001-01-03' AND '9999-12-30' THEN u.last_visit_at END
                   AS last_visit_at,
               p.user_id IS NOT NULL AS has_preference, p.frequency, p.day_of_week, p.time_of_day, p.is_active,
               p.email_enabled
        FROM users u LEFT JOIN brief_preferences p ON p.user_id = u.id
        WHERE u.id = %(user)s
    """,
    # The most active projects first (overdue, today, recently completed), at most %(limit)s of them;
    # ``total`` counts every active project (the window runs before LIMIT).
    "projects": """
        SELECT p.id, left(p.name, %(text)s) AS name, left(p.description, %(text)s) AS description, a.open_tasks,
               count(*) OVER () AS total
        FROM projects p
        CROSS JOIN LATERAL (
            -- per project through tasks_project_live: one plan whatever the table's statistics say
            SELECT count(*) FILTER (WHERE t.status NOT IN ('done', 'cancelled')) AS open_tasks,
                   count(*) FILTER (WHERE t.status NOT IN ('done', 'cancelled') AND t.due_date < %(day)s) AS overdue,
                   count(*) FILTER (WHERE t.status NOT IN ('done', 'cancelled')
                                      AND (t.start_date = %(day)s OR t.due_date = %(day)s)) AS today,
                   count(*) FILTER (WHERE t.status = 'done' AND t.completed_at > %(done_since)s
                                      AND t.completed_at <= %(anchor)s) AS completed
            FROM tasks t
            WHERE t.project_id = p.id AND t.user_id = p.user_id AND t.deleted_at IS NULL
        ) a
        WHERE p.user_id = %(user)s AND p.status = 'active'
        ORDER BY a.overdue + a.today + a.completed DESC, a.overdue DESC, a.today DESC,
                 lower(left(p.name, %(text)s)), p.id
        LIMIT %(limit)s + %(named)s
    """,
    # One row per (task, bucket) a task falls in; per project and bucket only the first %(limit)s in the
    # bucket's order (today: priority; overdue: priority, oldest due; upcoming: soonest due; completed:
    # most recent), each row carrying the bucket's full count and its high-priority count. The ranking
    # sorts narrow rows; titles are joined to the few kept rows only.
    "tasks": """
        SELECT r.project_id, r.bucket, r.id, left(t.title, %(text)s) AS title, t.status, t.priority,
               greatest(least(t.start_date, '9999-12-31'::date), '0001-01-01'::date) AS start_date,
               greatest(least(t.due_date, '9999-12-31'::date), '0001-01-01'::date) AS due_date, t.completed_at,
               r.total, r.high
        FROM (
            SELECT t.project_id, b.bucket, t.id,
                   row_number() OVER (
                       PARTITION BY t.project_id, b.bucket
                       ORDER BY CASE WHEN b.bucket IN ('today', 'overdue')
                                     THEN CASE t.priority WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END END,
                                CASE WHEN b.bucket IN ('overdue', 'upcoming') THEN t.due_date END,
                                CASE WHEN b.bucket = 'completed' THEN t.completed_at END DESC,
                                t.id
                   ) AS rank,
                   count(*) OVER (PARTITION BY t.project_id, b.bucket) AS total,
                   count(*) FILTER (WHERE t.priority = 'high') OVER (PARTITION BY t.project_id, b.bucket) AS high
            FROM tasks t
            CROSS JOIN LATERAL (VALUES
                ('today', t.status NOT IN ('done', 'cancelled') AND (t.start_date = %(day)s OR t.due_date = %(day)s)),
                ('overdue', t.status NOT IN ('done', 'cancelled') AND t.due_date < %(day)s),
                ('upcoming', t.status NOT IN ('done', 'cancelled') AND t.due_date > %(day)s
                             AND t.due_date <= %(horizon)s),
                ('completed', t.status = 'done' AND t.completed_at > %(done_since)s AND t.completed_at <= %(anchor)s)
            ) AS b(bucket, hit)
            WHERE t.project_id = ANY(%(projects)s) AND t.user_id = %(user)s AND t.deleted_at IS NULL AND b.hit
              AND (
                    (t.status NOT IN ('done', 'cancelled')
                     AND (t.start_date = %(day)s OR t.due_date <= %(horizon)s))
                 OR (t.status = 'done' AND t.completed_at > %(done_since)s AND t.completed_at <= %(anchor)s)
              )
        ) r
        JOIN tasks t ON t.id = r.id
        WHERE r.rank <= %(limit)s
        ORDER BY r.project_id, r.bucket, r.rank
    """,
    "notes": """
        SELECT project_id, id, left(title, %(text)s) AS title, left(content, %(text)s) AS content, updated_at FROM (
            SELECT n.project_id, n.id, n.title, n.content, n.updated_at,
                   row_number() OVER (PARTITION BY n.project_id ORDER BY n.updated_at DESC, n.id DESC) AS rank
            FROM notes n
            WHERE n.project_id = ANY(%(projects)s) AND n.user_id = %(user)s
              AND n.updated_at > %(since)s AND n.updated_at <= %(anchor)s
        ) ranked
        WHERE rank <= %(limit)s
        ORDER BY project_id, updated_at DESC, id DESC
    """,
}


# The columns of the tasks and notes queries, in order: their rows are unpacked into these names.
_TASK_COLUMNS = ("project_id", "bucket", "id", "title", "status", "priority", "start_date", "due_date", "completed_at",
                 "total", "high")
_NOTE_COLUMNS = ("project_id", "id", "title", "content", "updated_at")


def zone(name: str | None, user_id: int | None = None) -> ZoneInfo:
    """The user's zone, by the scheduler's own rule (:func:`briefs.contract.load_timezone`).

    An unusable name is a :class:`PermanentError`: the scheduler skips such a user, and a brief
    queued by hand is refused the same way rather than written in some other zone.
    """
    try:
        return load_timezone(name)
    except InvalidTimezone as exc:
        who = f"user {user_id}'s " if user_id is not None else ""
        raise PermanentError(f"{who}{exc}; fix users.timezone (the scheduler skips this user too)") from None


def anchor_for(brief_date: date, tz: ZoneInfo, notify_at: datetime | None) -> datetime:
    """The instant the brief's windows end: ``notify_at``, else the end of the local brief day."""
    if notify_at is not None:
        return notify_at.astimezone(UTC)
    next_midnight = datetime.combine(brief_date + timedelta(days=1), time(0), tz)
    return next_midnight.astimezone(UTC)


async def load_user(conn: Conn, user_id: int, limits: Limits | None = None) -> UserContext | None:
    limits = limits or Limits()
    cur = await conn.execute(_SQL["user"], {"user": user_id, "text": limits.text})
    cur.row_factory = namedtuple_row
    row = await cur.fetchone()
    if row is None:
        return None
    pref = None
    if row.has_preference:
        pref = Preference(row.frequency, row.day_of_week, row.time_of_day, row.is_active, row.email_enabled)
    return UserContext(row.id, row.email, row.name, row.timezone, zone(row.timezone, row.id), pref, row.last_visit_at)


async def load_projects(
    conn: Conn, user: UserContext, brief_date: date, anchor: datetime, limits: Limits | None = None
) -> tuple[list[ProjectContext], int, tuple[str, ...]]:
    """The included projects (most active first), how many more active projects were left out, and the
    names of the first few of those (the most active of the rest)."""
    limits = limits or Limits()
    rows = await _project_rows(conn, user, brief_date, anchor, limits)
    if not rows:
        return [], 0, ()
    included, beyond = rows[: limits.projects], rows[limits.projects :]
    more = int(rows[0].total) - len(included)
    more_names = tuple(project_title(row.name, MORE_NAME_CHARS) for row in beyond)
    ids = [row.id for row in included]
    tasks = await _load_tasks(conn, user, ids, brief_date, anchor, limits)
    notes = await _load_notes(conn, user, ids, anchor, limits)
    return [_project(row, tasks, notes) for row in included], more, more_names


async def _project_rows(
    conn: Conn, user: UserContext, brief_date: date, anchor: datetime, limits: Limits
) -> list[Any]:
    """The included projects' rows, then up to ``MORE_NAMED`` rows of those beyond the limit (named)."""
    cur = await conn.execute(
        _SQL["projects"],
        {"user": user.id, "day": brief_date, "done_since": anchor - COMPLETED_WINDOW, "anchor": anchor,
         "text": limits.text, "limit": limits.projects, "named": MORE_NAMED},
    )
    cur.row_factory = namedtuple_row
    return await cur.fetchall()


@dataclass(slots=True)
class _Tasks:
    """The loaded tasks by project and bucket, and the full counts of the buckets the limit cut."""

    buckets: defaultdict[int, defaultdict[str, list[TaskItem]]]
    totals: defaultdict[int, dict[str, int]]


async def _load_tasks(
    conn: Conn, user: UserContext, ids: list[int], brief_date: date, anchor: datetime, limits: Limits
) -> _Tasks:
    cur = await conn.execute(
        _SQL["tasks"],
        {
            "projects": ids,
            "user": user.id,
            "day": brief_date,
            "horizon": brief_date + timedelta(days=UPCOMING_DAYS),
            "done_since": anchor - COMPLETED_WINDOW,
            "anchor": anchor,
            "text": limits.text,
            "limit": limits.tasks,
        },
    )
    # The one query whose rows grow with the data (up to brief_max_projects × 4 × brief_max_tasks): its rows
    # stay psycopg's plain tuples, built in C, unpacked into the names the query gives its columns (checked).
    # A row factory makes a Python call per row: 1,250 tasks took 13 → 17 ms of CPU with namedtuple_row.
    assert _column_names(cur) == _TASK_COLUMNS
    tz = user.tz
    out = _Tasks(defaultdict(lambda: defaultdict(list)), defaultdict(dict))
    for project_id, bucket, task_id, title, status, priority, start_date, due_date, completed_at, total, high in (
        await cur.fetchall()
    ):
        local_completed_at = completed_at.astimezone(tz) if completed_at else None
        task = TaskItem(task_id, title, status, priority, start_date, due_date, local_completed_at)
        out.buckets[project_id][bucket].append(task)
        if total > limits.tasks:
            out.totals[project_id][bucket] = int(total)
            if bucket == "overdue":
                out.totals[project_id]["overdue_high"] = int(high)
    return out


async def _load_notes(
    conn: Conn, user: UserContext, ids: list[int], anchor: datetime, limits: Limits
) -> dict[int, list[NoteItem]]:
    cur = await conn.execute(
        _SQL["notes"],
        {"projects": ids, "user": user.id, "since": anchor - NOTES_WINDOW, "anchor": anchor, "limit": NOTES_PER_PROJECT,
         "text": limits.text},
    )
    assert _column_names(cur) == _NOTE_COLUMNS  # unpacked like the tasks: up to five rows per project
    tz = user.tz
    notes: dict[int, list[NoteItem]] = defaultdict(list)
    for project_id, note_id, title, content, updated_at in await cur.fetchall():
        notes[project_id].append(NoteItem(note_id, title, content or "", updated_at.astimezone(tz)))
    return notes


def _column_names(cur: Any) -> tuple[str, ...]:
    return tuple(column.name for column in cur.description or ())


def _project(row: Any, tasks: _Tasks, notes: dict[int, list[NoteItem]]) -> ProjectContext:
    """One included project from its row, its tasks by bucket and its notes."""
    b: dict[str, list[TaskItem]] = tasks.buckets.get(row.id, {})
    return ProjectContext(
        id=row.id,
        name=row.name,
        description=row.description,
        open_tasks=int(row.open_tasks),
        today=tuple(b.get("today", ())),
        overdue=tuple(b.get("overdue", ())),
        upcoming=tuple(b.get("upcoming", ())),
        completed=tuple(b.get("completed", ())),
        notes=tuple(notes.get(row.id, ())),
        totals=tasks.totals.get(row.id, {}),
    )


async def load_brief_context(
    conn: Conn, user_id: int, brief_date: date, notify_at: datetime | None, limits: Limits | None = None
) -> BriefContext | None:
    """Everything one brief needs, or None when the user does not exist."""
    user = await load_user(conn, user_id, limits)
    if user is None:
        return None
    anchor = anchor_for(brief_date, user.tz, notify_at)
    projects, more, names = await load_projects(conn, user, brief_date, anchor, limits)
    return BriefContext(user, brief_date, anchor, tuple(projects), more, names)
