"""One scheduler tick against the database: plan, check engagement, deduplicate, enqueue.

:func:`run_tick` is the whole tick. It never reads the clock: ``now`` comes in, every
instant it writes (``run_at``, ``notify_at``) is computed from it and passed to SQL as
a parameter, and no query decides anything with the database's ``now()``. (The
queue's bookkeeping columns ``updated_at``/``finished_at`` keep the database clock,
like every other queue write, because retention and pruning measure them with it.)

One transaction per tick
    The tick runs in a single transaction that starts with
    ``pg_try_advisory_xact_lock``: a second scheduler (rolling deploy) sees the lock
    taken and returns at once (``skipped_locked``). Holding the lock for the whole
    tick is what makes "one scheduler at a time" true; a transaction-scoped lock
    can never outlive a crashed scheduler or leak on a pooled connection, and a
    crash mid-tick leaves nothing half done (the next tick redoes it). The price is
    that jobs become visible to workers at commit, i.e. up to one tick duration
    (about a second per 10,000 users due, see bench/README-scheduler.md) after they
    were planned. That is slack, not lateness: a brief is seen ``lookahead`` ahead and starts at least
    ``generation_buffer`` before its ``notify_at`` (earlier when the LLM capacity needs it, below).
    A dry run is the same transaction, with no writes, rolled back. The unique
    index on live dedup keys remains the guarantee if two ticks ever overlap.

One user's tick (``run_tick(…, user_id=…)``)
    After a change to one user's preference (the API's ``PUT /users/{id}/preference``), the same
    tick for that user alone: the page query and the pending-job load are filtered to the user (two
    statements of their own, built once, so the periodic tick's plans stay as they are); its pending
    scheduler jobs are moved or cancelled, its due briefs enqueued (a brief moved to ten minutes
    from now gets its job now), and its jobs are the only "leftovers" cancelled when its
    preference is inactive or gone. The sweep of orphaned briefs, which is for every user, is left
    to the periodic tick. Instead of giving up when a periodic tick holds the lock, it waits for it
    (``pg_advisory_xact_lock`` under a transaction-local ``lock_timeout`` of
    :data:`USER_LOCK_TIMEOUT` seconds) and reports ``skipped_locked`` only if that runs out.

The tick log
    The daemon writes every tick it runs (its report, or its error) to ``scheduler_ticks`` with
    :func:`scheduler.report.record_tick`, after the tick's transaction; whoever runs a one-user
    tick records it the same way. Dry runs are never logged.

What a tick reads: the due preferences (``brief_preferences.next_due_at``, migration 0008)
    Each active preference keeps ``next_due_at``: the instant from which a tick must plan it again, NULL
    for "unknown: plan me". A periodic tick selects, through the partial index on it, the preferences
    with ``next_due_at IS NULL OR next_due_at < now + lookahead``, adds the users with pending scheduler
    jobs (so their jobs are checked as below and never taken for leftovers), sorts the ids and plans
    them page by page by primary key, with the code a full scan uses. At 1,000,000 users with 1 % due
    it reads 10,000 (bench/README-scheduler.md). After planning, each user's value is stored in the
    tick's transaction (one batched UPDATE per page, carried by the next statement, see _WRITE):

    * nothing due in the window: its first occurrence at or after ``now``;
    * briefs planned and all queued (enqueued, or blocked by a live job): its first occurrence after the
      last one planned (a catch-up's instant has passed: after ``now``);
    * a brief planned but not queued (an engagement skip, a refusal): ``now``, i.e. the next tick
      decides again, as a full scan would while the brief is in its window;
    * skipped for bad data: NULL, so it is planned (and reported) at every tick, as today, at the cost
      of one plan per tick (plans are memoised per schedule).

    The value is a cache and never trusted blindly. Applications write ``users`` and
    ``brief_preferences`` directly, so triggers set it NULL in the transaction of every change that can
    move a brief: a new preference, a change of frequency, weekday, time or activity, a change of
    timezone, and a brief job that ends failed or cancelled or is deleted while live (a full scan makes a
    new job for such a brief while it is in its window). A value is stored only if the row is still the
    version that was planned (its ``xmin``): a change committed meanwhile keeps its NULL. The tz database
    version the values were computed with is kept in ``scheduler_tzdata``; a tick running with another
    one stores its own and sets every ``next_due_at`` NULL, in its transaction (in the selection
    statement). When more than :data:`INDEXED_MAX_USERS` are due (after the migration or a new tz
    database) the tick scans every preference instead, and stores every value.

    A full scan (``run_tick(…, full_scan=True)``, and always a dry run or a detailed report, which
    account for every user) reads every active preference in user_id order (keyset pagination); a
    real one stores the values that changed. A one-user tick plans its user whatever the value.

Per page of preferences (``settings.scheduler_page_size``)
    1. one SELECT: preferences joined with users (timezone, last visit); it also stores the previous
       page's next_due_at values;
    2. plan every user in Python (memoised per tick on (timezone, frequency,
       weekday, time): users that share a schedule share a plan); an invalid
       timezone or an unusable row skips that user with a reason, never the tick;
    3. one SELECT on ``queue_jobs … WHERE dedup_key = ANY(…)``: a pending,
       processing or completed brief job for (user, local date) blocks a new one
       (failed and cancelled ones do not);
    4. at most one UPDATE that moves or cancels pending jobs (see below);
    5. one batched engagement query (only for users inactive 4+ days who need a
       new job), then the engagement decisions, isolated per user;
    6. one ``enqueue_many`` (a multi-row INSERT … ON CONFLICT DO NOTHING), each job starting
       ``generation_buffer`` ahead and carrying its expected LLM calls (``llm_calls``: the user's active
       projects, counted by the page query for the rows that may be due, plus the summary).
    Five statements per page at most, whatever the page size. One NOTIFY per tick
    (notifications are delivered at commit anyway). The last page's next_due_at values ride on the
    orphaned-briefs sweep (a one-user tick, which has no sweep, stores them with one UPDATE).

Hostile rows
    psycopg decodes a whole result at once, so one value Python cannot hold (a
    ``time_of_day`` of ``24:00``, an ``infinity`` or BC ``timestamptz``) would fail the
    page, i.e. every user. Every query the tick decodes therefore returns only values
    that decode: the page query sends 24:00 as NULL, a timezone over 255 characters as
    NULL (with its length and first characters in a last column) and the last visit as
    epoch seconds (a float8, which holds infinity and BC dates, checked in Python only
    for users that are due); queue instants outside (0001-01-03, 9999-12-29) come back
    NULL (two days of margin keep any zone's local time inside Python's years 1..9999).
    Such a user is skipped with ``invalid_timezone: …``, ``invalid_preference: …`` or
    ``invalid_last_visit: …`` and its pending jobs are left alone. A pending scheduler
    job with an unusable ``notify_at`` is moved to its planned instant; a dedup key the
    scheduler would not write is left alone. Reasons and log lines show hostile values
    clipped (:func:`briefs.contract.shown`).

Capacity-aware starts (:mod:`scheduler.starts`)
    When ``capacity_planning`` is on and an LLM is configured, the periodic tick ends by planning every
    pending brief job in its window together (:func:`scheduler.capacity.plan_starts`: deadline first, from
    the LLM's limits, concurrency and measured request time) and moving earlier the scheduler's jobs that
    must start sooner than ``generation_buffer`` ahead, never before ``max_lead`` ahead and never later than
    they were; briefs the capacity cannot finish in time are reported before it happens (``capacity`` in the
    report). Two statements: a SELECT, and an UPDATE when starts move. A one-user tick leaves its job at the
    fixed start; the next periodic tick plans it with the others.

The report
    A real tick lists what it enqueued, moved, cancelled and skipped, and counts the
    rest (``deduplicated``, ``not_due_count``). A detailed tick (the default for a dry
    run: ``briefs schedule --once --dry-run --json``) accounts for every user it looked
    at: also ``deduplicated_users`` (user, date, the existing job) and ``not_due``
    (each user's next brief date, ``notify_at`` and ``run_at``; a weekly user's may be
    days ahead). A detailed tick is a full scan: it is a diagnostic of every user. A real tick
    plans only the users it selected (``users_seen``).

Moving and cancelling pending jobs
    Only jobs the scheduler made are touched (their payload says ``"source":
    "scheduler"``); a brief queued by hand (``briefs enqueue``) is left alone. At
    the start of the tick one query loads every pending scheduler job (id, user,
    date, notify_at). Each page then checks the pending jobs of its users against the *current*
    preference and timezone:

    * a job whose key is planned again this tick: if the planned instant differs
      (preference or timezone changed) it is moved (``run_at``, ``notify_at`` and
      the payload's ``notify_at``/``catch_up``/``email``); a catch-up keeps a job
      that is already due;
    * any other pending job: the job's local date is re-evaluated under the
      current preference. No occurrence on that date any more (weekly day changed)
      → cancelled; the instant moved ahead → moved to it; the instant passed while
      the job waits for later → moved to ``now`` as a catch-up when it passed less
      than ``catch_up`` ago, cancelled when longer ago; both instants passed (the
      job is due either way) or unchanged → left alone.

    A job's brief date never changes (it is the job's dedup key): a preference
    change that moves the brief to another date cancels or moves the old date's job
    and plans the new date's job under its own key. Pending scheduler jobs of users
    that no page visited (their preference is inactive or gone: every user with a pending job is
    selected) are cancelled by one UPDATE at the end of the tick.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import math
import time as time_mod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, NamedTuple, TypeVar

import psycopg
from psycopg.rows import AsyncRowFactory, dict_row
from psycopg.types.json import Jsonb

from briefs import engagement, metrics
from briefs.contract import (
    BRIEF_JOB,
    DELIVERY_PRIORITY,
    MAX_USER_ID,
    STANDARD,
    BriefRequest,
    InvalidTimezone,
    brief_date_of_key,
    brief_dedup_key,
    brief_key_sql,
    iso_instant,
    load_timezone,
    shown,
)
from briefs.db import Database, named_rows
from briefs.settings import Settings
from scheduler import starts
from scheduler.plan import Occurrence, Preference, local_to_utc, next_occurrence, plan
from scheduler.report import TickReport, iso
from worker import queue
from worker.queue import NewJob

log = logging.getLogger(__name__)

LOCK_KEY = 0x6272696566_02  # "brief" + 2 (the migrator uses + 1): the scheduler's advisory lock
PRIORITY = DELIVERY_PRIORITY
SOURCE = "scheduler"  # payload["source"] of the jobs this module makes (the only ones it moves or cancels)
_MIN_ID = -(2**63)
_LIVE_FIRST = {"pending": 0, "processing": 1, "completed": 2}
USER_LOCK_TIMEOUT = 10.0  # seconds a one-user tick waits for a running tick to release the lock
_MICROSECOND = timedelta(microseconds=1)
# An indexed tick plans at most this many users (an id list of a few MB); when more are due (every next_due_at
# was just set NULL: the migration, a new tz database) it scans every preference instead, as a full scan does.
INDEXED_MAX_USERS = 100_000
# A stored next_due_at is at most this far after the lookahead of the tick that wrote it (the first occurrence
# after one planned inside the lookahead: a week, plus a day for offsets and gaps); one later than that after
# the current tick's lookahead was not written by a tick.
_LATEST_NEXT = timedelta(days=9)
_WARN_SKIPS = 10  # per tick, the first users skipped for bad data are logged as warnings, the rest at debug

_Row = TypeVar("_Row")


class _Schedule(NamedTuple):
    """What a plan depends on besides ``now``: users that share a schedule share a plan."""

    timezone: str
    frequency: str
    day_of_week: int | None
    time_of_day: time


# A page row's schedule as a cache key: a plain tuple, equal (and hashing equal) to the _Schedule it was cached
# under. A NULL timezone or time_of_day (see _PAGE) makes a key that is never cached.
_ScheduleKey = tuple[str | None, str, int | None, time | None]


# --------------------------------------------------------------------------- plumbing


class _Counted:
    """The tick's connection: counts every statement it issues."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.count = 0

    async def execute(self, query: Any, params: Any = None, **kw: Any) -> psycopg.AsyncCursor[Any]:
        """``AsyncConnection.execute``, counted (the queue and the engagement history query use it)."""
        self.count += 1
        return await self.conn.execute(query, params, **kw)

    async def fetch(self, query: str, params: Any, row_factory: AsyncRowFactory[_Row]) -> list[_Row]:
        """Run one statement and return its rows as ``row_factory`` makes them (one statement counted)."""
        self.count += 1
        async with self.conn.cursor(row_factory=row_factory) as cur:
            await cur.execute(query, params)
            return await cur.fetchall()


@dataclass(slots=True)
class _User:
    user_id: int
    schedule: _Schedule
    email: bool
    last_visit_at: datetime | None
    llm_calls: int | None = None  # the brief's expected LLM calls (scheduler.starts), when counted


@dataclass(slots=True)
class _Pending:
    """A pending scheduler-made brief job."""

    id: int
    user_id: int | None  # None only for a job whose row lost its user_id (the pending-job load skips those)
    dedup_key: str
    brief_date: date | None
    notify_at: datetime | None
    catch_up: bool
    email: bool


@dataclass(slots=True)
class _Change:
    """A move (cancel=False) or cancel of one pending job."""

    job: _Pending
    cancel: bool
    reason: str
    notify_at: datetime | None = None
    run_at: datetime | None = None
    catch_up: bool = False
    email: bool = False


@dataclass(slots=True)
class _Due:
    user: _User
    occ: Occurrence
    key: str


class _Planner:
    """Plans for one tick, memoised per schedule (timezone, frequency, weekday, time)."""

    def __init__(self, now: datetime, settings: Settings, *, track: bool = False) -> None:
        self.now = now
        self.settings = settings
        self.lookahead = timedelta(seconds=settings.lookahead)
        self.catch_up = timedelta(seconds=settings.catch_up)
        self.buffer = timedelta(seconds=settings.generation_buffer)
        self.cache: dict[_ScheduleKey, list[Occurrence] | Exception] = {}
        self.next_cache: dict[_ScheduleKey, dict[str, Any]] = {}
        self.after_cache: dict[tuple[_ScheduleKey, datetime], datetime | None] = {}
        self.track = track  # work out each planned user's next_due_at (a real tick; a dry run writes nothing)
        self.warned = 0
        # What every page statement is given to count each due user's active projects (see _PageRow).
        self.page_params = {
            "count_projects": starts.enabled(settings),
            "until": now + self.lookahead,
            "max_projects": settings.brief_max_projects,
        }

    def plan(self, key: _Schedule, user_id: int) -> list[Occurrence] | Exception:
        """The occurrences of a schedule (timezone, frequency, weekday, time), or the exception that rejects it.

        Callers look in ``cache`` first: most users share their schedule with others.
        """
        found = self.cache.get(key)
        if found is None:
            tz, frequency, day_of_week, at = key
            pref = Preference(user_id, tz, frequency, day_of_week, at)
            try:
                found = plan(
                    pref, self.now, lookahead=self.lookahead, catch_up=self.catch_up, generation_buffer=self.buffer
                )
            except InvalidTimezone as exc:
                found = exc
            except ValueError:
                found = ValueError(
                    f"invalid_preference: frequency={shown(str(frequency), 40)} day_of_week={day_of_week!r}"
                )
            self.cache[key] = found
        return found

    def next_due(self, key: _ScheduleKey, user_id: int) -> dict[str, Any]:
        """The next occurrence of a schedule at or after now (brief_date, notify_at, run_at), for a not-due user.

        ``key`` is a schedule already planned this tick: a page row's key found in ``cache``, or a _Schedule.
        """
        found = self.next_cache.get(key)
        if found is None:
            tz, frequency, day_of_week, at = key
            assert tz is not None and at is not None, "a planned schedule has a timezone and a time of day"
            try:
                nxt = next_occurrence(Preference(user_id, tz, frequency, day_of_week, at), self.now)
            except (ValueError, OverflowError):
                nxt = None
            if nxt is None:
                found = {"brief_date": None, "notify_at": None, "run_at": None}
            else:
                day, instant = nxt
                found = {"brief_date": day, "notify_at": instant, "run_at": max(self.now, instant - self.buffer)}
            self.next_cache[key] = found
        return found

    def next_due_at(self, key: _ScheduleKey, user_id: int, occurrences: Sequence[Occurrence] = ()) -> datetime | None:
        """A planned user's next_due_at: its first occurrence after the ones just planned (``occurrences``).

        After the last occurrence planned for its instant; a catch-up's own instant has passed, and no other
        occurrence lies between it and now (it would have been planned too), so with only catch-ups (or
        nothing) planned it is the first occurrence at or after now. None (plan me at every tick) when there
        is none: dates past year 9999.
        """
        ahead = [occ.notify_at for occ in occurrences if not occ.catch_up]
        after = max(ahead) + _MICROSECOND if ahead else self.now
        memo = (key, after)
        if memo in self.after_cache:
            return self.after_cache[memo]
        tz, frequency, day_of_week, at = key
        assert tz is not None and at is not None, "a planned schedule has a timezone and a time of day"
        try:
            nxt = next_occurrence(Preference(user_id, tz, frequency, day_of_week, at), after)
        except (ValueError, OverflowError):
            nxt = None
        found = None if nxt is None else nxt[1]
        self.after_cache[memo] = found
        return found

    def skip_bad(self, report: TickReport, user_id: int, reason: str) -> None:
        """Skip a user whose data is unusable: a warning for the first few per tick, then debug lines."""
        report.skip(user_id, reason)
        self.warned += 1
        level = logging.WARNING if self.warned <= _WARN_SKIPS else logging.DEBUG
        log.log(level, "user %s skipped: %s", user_id, reason)

    def recheck(self, user: _User, job: _Pending) -> _Change | None:
        """Check a pending job outside this tick's plan against the user's current preference."""
        day = job.brief_date
        if day is None:
            return None  # not a key we wrote: leave it alone
        schedule = user.schedule
        if schedule.frequency == "weekly" and day.isoweekday() != schedule.day_of_week:
            return _Change(job, True, f"preference changed: no brief on {day} any more")
        try:
            intended = local_to_utc(day, schedule.time_of_day, load_timezone(schedule.timezone))
        except OverflowError:
            return None  # a date at the end of the calendar (9999-12-31 west of UTC): not a job we wrote
        if intended == job.notify_at:
            return _email_patch(job, user.email)
        if intended >= self.now:  # the brief's new instant is ahead (beyond this tick's window): wait for it
            return _Change(
                job, False, "preference changed", intended, max(self.now, intended - self.buffer), False, user.email
            )
        if job.notify_at is not None and job.notify_at <= self.now:
            return _email_patch(job, user.email)  # both instants passed: the job is due either way
        if intended > self.now - self.catch_up:  # the new instant passed, the job waits for later: now
            return _Change(job, False, "preference changed (catch-up)", self.now, self.now, True, user.email)
        return _Change(job, True, f"preference changed: the brief of {day} is now more than catch-up ago")


def _email_patch(job: _Pending, email: bool) -> _Change | None:
    if job.email == email:
        return None
    return _Change(job, False, "email preference changed", job.notify_at, None, job.catch_up, email)


# Python's calendar holds years 1..9999; two days of margin keep any zone's local time of an instant inside it.
_EPOCH_MIN = -62135596800.0 + 2 * 86400  # 0001-01-03T00:00Z
_EPOCH_MAX = 253402300800.0 - 3 * 86400  # 9999-12-29T00:00Z


class _BadRow(ValueError):
    """A page row the scheduler cannot use; the message is the skip reason."""


def _schedule_of(row: _PageRow) -> _Schedule:
    """A row's schedule; _BadRow for a timezone that was too long to send or a time_of_day of 24:00."""
    if row.timezone is None:
        length, _, head = (row.long_timezone or "0 ").partition(" ")
        raise _BadRow(
            f"invalid_timezone: timezone {shown(head, 40, length=int(length))} is too long for a tz database name"
        )
    if row.time_of_day is None:
        raise _BadRow("invalid_preference: time_of_day '24:00:00' is out of range (00:00 to 23:59:59)")
    return _Schedule(row.timezone, row.frequency, row.day_of_week, row.time_of_day)


def _last_visit(epoch: float | None) -> datetime | None:
    """``users.last_visit_at`` from its epoch seconds; _BadRow when Python cannot hold it (infinity, BC, 10000)."""
    if epoch is None:
        return None
    if _EPOCH_MIN <= epoch <= _EPOCH_MAX:  # False for NaN too
        return datetime.fromtimestamp(epoch, UTC)
    if math.isinf(epoch):
        what = "'infinity'" if epoch > 0 else "'-infinity'"
    elif epoch > 0:
        what = "after 9999-12-29"
    else:
        what = "before 0001-01-03 (BC dates included)"
    raise _BadRow(f"invalid_last_visit: last_visit_at is {what}, outside the dates the scheduler can use")


def _clip(text: str) -> str:
    """A message (from an exception) as it goes into a reason or log line: short and on one line."""
    return text if len(text) <= 100 and text.isprintable() else shown(text)


# --------------------------------------------------------------------------- SQL

_INSTANT_FROM = "'0001-01-03 00:00+00'"
_INSTANT_UNTIL = "'9999-12-29 00:00+00'"


def _instant(column: str) -> str:
    """SQL: the instant if Python can hold it in any zone (years 1..9999, two days of margin), else NULL."""
    return f"CASE WHEN {column} > {_INSTANT_FROM} AND {column} < {_INSTANT_UNTIL} THEN {column} END"


# Every value of every row decodes, so one row cannot fail the page: a timezone over 255 characters comes back
# NULL (its length and head in the last column, NULL for every other row), a time_of_day of 24:00 (valid in
# Postgres, not in Python) comes back NULL, and the last visit comes back as epoch seconds (a float8: 'infinity'
# and BC dates decode, and the per-row check in Python costs less than a timestamptz decode). NULLs make the
# schedule key one the planner never caches, so these rows always take the checked path.
# Every page statement first stores the next_due_at values of the page before (see _Writer): no statement of its
# own for them. Only where the row is still the version the tick planned (its xmin): a change committed since
# (a trigger set next_due_at NULL) is never overwritten with a value planned from the old preference.
_WRITE = """
UPDATE brief_preferences p SET next_due_at = w.next_due_at
FROM unnest(%(w_user)s::bigint[], %(w_due)s::timestamptz[], %(w_version)s::bigint[]) AS w(user_id, next_due_at, version)
WHERE p.user_id = w.user_id AND p.xmin::text::bigint = w.version
"""
_WITH_WRITE = f"WITH written AS ({_WRITE.strip()})"

_PAGE = _WITH_WRITE + f"""
SELECT p.user_id,
       CASE WHEN octet_length(u.timezone) <= 255 THEN u.timezone END AS timezone,
       p.frequency, p.day_of_week,
       NULLIF(p.time_of_day, '24:00') AS time_of_day,
       p.email_enabled,
       date_part('epoch', u.last_visit_at) AS last_visit_epoch,
       CASE WHEN octet_length(u.timezone) > 255 THEN length(u.timezone) || ' ' || left(u.timezone, 40) END
         AS long_timezone,
       {_instant("p.next_due_at")} AS next_due_at,
       p.xmin::text::bigint AS version,
       CASE WHEN %(count_projects)s AND (p.next_due_at IS NULL OR p.next_due_at < %(until)s)
            THEN (SELECT count(*) FROM (SELECT FROM projects pr WHERE pr.user_id = p.user_id AND pr.status = 'active'
                                        LIMIT %(max_projects)s) c)
       END AS active_projects
FROM brief_preferences p
JOIN users u ON u.id = p.user_id
WHERE p.is_active AND p.user_id > %(after)s
  AND u.id > %(after)s  -- redundant, but lets the merge join start both index scans at the page (not at id 1)
ORDER BY p.user_id
LIMIT %(page)s
"""

# A one-user tick's page: the same statement with the user's id as a filter. Built once, apart from _PAGE, so the
# periodic tick's plan never carries an "is the filter NULL" condition.
_PAGE_USER = _PAGE.replace("ORDER BY p.user_id", "  AND p.user_id = %(user)s\nORDER BY p.user_id")
assert _PAGE_USER != _PAGE
# An indexed tick's page: the preferences of a list of users (due, or with pending jobs), by primary key.
_PAGE_IDS = _PAGE.replace(
    "WHERE p.is_active AND p.user_id > %(after)s\n"
    "  AND u.id > %(after)s  -- redundant, but lets the merge join start both index scans at the page (not at id 1)",
    "WHERE p.is_active AND p.user_id = ANY(%(ids)s)",
)
assert _PAGE_IDS != _PAGE

# An indexed tick's selection: the active preferences due before the end of the lookahead or unknown (NULL), by
# the partial index brief_preferences_next_due. A value later than any a tick writes (_LATEST_NEXT) was not
# written by one ('infinity', a typo): that preference is planned again too. First the statement compares the
# tz database version the stored values were computed with to the tick's: when it differs (or none is stored)
# it stores the tick's, sets every next_due_at NULL, selects every active preference (the statement's own reads
# do not see its UPDATE) and returns a row with a NULL user_id to say so. The one-time filters (EXISTS on
# stamp) make both cost nothing otherwise.
_STAMP = """
WITH stamp AS (
    INSERT INTO scheduler_tzdata (version)
    SELECT %(version)s WHERE NOT EXISTS (SELECT FROM scheduler_tzdata WHERE version = %(version)s)
    ON CONFLICT (only_row) DO UPDATE SET version = EXCLUDED.version, changed_at = now()
    RETURNING version
), reset AS (
    UPDATE brief_preferences SET next_due_at = NULL WHERE next_due_at IS NOT NULL AND EXISTS (SELECT FROM stamp)
)"""
_DUE = _STAMP + """
SELECT NULL::bigint AS user_id FROM stamp
UNION ALL
(SELECT p.user_id FROM brief_preferences p
 WHERE p.is_active AND (p.next_due_at IS NULL OR p.next_due_at < %(until)s OR p.next_due_at > %(implausible)s)
 LIMIT %(cap)s)
UNION ALL
(SELECT p.user_id FROM brief_preferences p WHERE p.is_active AND EXISTS (SELECT FROM stamp) LIMIT %(cap)s)
"""
# A full scan that writes: the same version check, alone (it plans every preference anyway).
_RESET = _STAMP + "\nSELECT count(*) AS changed FROM stamp\n"


class _PageRow(NamedTuple):
    """A row of _PAGE: an active preference and its user."""

    user_id: int
    timezone: str | None  # NULL: over 255 bytes (see long_timezone)
    frequency: str
    day_of_week: int | None
    time_of_day: time | None  # NULL: 24:00
    email_enabled: bool
    last_visit_epoch: float | None
    long_timezone: str | None  # "<length> <first 40 characters>" of a timezone over 255 bytes, else NULL
    next_due_at: datetime | None  # the stored next_due_at (NULL: unknown, or outside the instants Python holds)
    version: int  # the row's xmin: the version of the preference planned (see _WRITE)
    # The user's active projects (at most brief_max_projects), counted only for a row that may be due and only
    # when capacity-aware starts apply: the brief's expected LLM calls (scheduler.starts). NULL otherwise.
    active_projects: int | None


# Scheduler-made jobs say so in their payload; hand-made ones are never moved or cancelled.
_PENDING = f"""
SELECT j.id, j.user_id, j.dedup_key, {_instant("j.notify_at")} AS notify_at,
       coalesce(j.payload->'catch_up' = 'true'::jsonb, false) AS catch_up,
       coalesce(j.payload->'email' = 'true'::jsonb, false) AS email
FROM queue_jobs j
WHERE j.status = 'pending' AND j.job_type = %s AND j.user_id IS NOT NULL AND j.dedup_key IS NOT NULL
  AND j.payload->>'source' = %s
"""
_PENDING_USER = _PENDING.rstrip() + "\n  AND j.user_id = %s\n"  # one user's (the queue_jobs_user index)


class _PendingRow(NamedTuple):
    """A row of _PENDING: a pending scheduler-made brief job."""

    id: int
    user_id: int
    dedup_key: str
    notify_at: datetime | None  # NULL: outside the instants Python can hold
    catch_up: bool
    email: bool


# The keys go in binary (%b): a text array in text form costs psycopg a regex escape per element.
_DEDUP = f"""
SELECT j.dedup_key, j.id, j.status, j.user_id, {_instant("j.notify_at")} AS notify_at,
       coalesce(j.payload->>'source' = %s, false) AS by_scheduler,
       coalesce(j.payload->'catch_up' = 'true'::jsonb, false) AS catch_up,
       coalesce(j.payload->'email' = 'true'::jsonb, false) AS email
FROM queue_jobs j
WHERE j.dedup_key = ANY(%b) AND j.job_type = %s AND j.status IN ('pending', 'processing', 'completed')
"""


class _LiveJob(NamedTuple):
    """A row of _DEDUP: a pending, processing or completed job with a key planned on this page."""

    dedup_key: str
    id: int
    status: str
    user_id: int | None
    notify_at: datetime | None  # NULL: outside the instants Python can hold
    by_scheduler: bool  # payload["source"] is SOURCE
    catch_up: bool
    email: bool


# Briefs left 'processing' whose latest brief job (by the dedup key contract) ended failed or cancelled:
# no job will finish them. Rows a running generator holds (FOR SHARE while it saves) are skipped.
# The partial index daily_briefs_processing keeps this to the few processing rows.
# It also stores the last page's next_due_at values (see _WRITE).
_ORPHANED_BRIEFS = _WITH_WRITE + f""",
stale AS (
    SELECT b.id, j.id AS job_id, j.status AS job_status, j.last_error
    FROM daily_briefs b
    JOIN LATERAL (
        SELECT q.id, q.status, q.last_error FROM queue_jobs q
        WHERE q.dedup_key = {brief_key_sql("b.user_id", "b.brief_date")}
          AND q.job_type = %(job_type)s
        ORDER BY q.id DESC
        LIMIT 1
    ) j ON true
    WHERE b.status = 'processing' AND j.status IN ('failed', 'cancelled')
    FOR UPDATE OF b SKIP LOCKED
)
UPDATE daily_briefs b
SET status = 'failed', completed_at = %(now)s, updated_at = now(),
    error = left(format('its job %%s ended %%s, so nothing will finish this brief: %%s',
                        stale.job_id, stale.job_status, coalesce(stale.last_error, 'no error recorded')), 4000)
FROM stale
WHERE b.id = stale.id
RETURNING b.user_id, to_char(b.brief_date, 'YYYY-MM-DD') AS brief_date,  -- text: any date
          stale.job_id, stale.job_status
"""

# Moves and cancels in one statement; only jobs still pending (a worker may have claimed one meanwhile).
_CHANGE = """
UPDATE queue_jobs j
SET status = CASE WHEN c.cancel THEN 'cancelled' ELSE j.status END,
    notify_at = CASE WHEN c.cancel OR c.notify_at IS NULL THEN j.notify_at ELSE c.notify_at END,
    run_at = CASE WHEN c.cancel OR c.run_at IS NULL THEN j.run_at ELSE c.run_at END,
    payload = CASE WHEN c.cancel THEN j.payload ELSE j.payload || c.patch END,
    finished_at = CASE WHEN c.cancel THEN now() ELSE j.finished_at END,
    last_error = CASE WHEN c.cancel THEN 'cancelled by the scheduler: ' || c.reason ELSE j.last_error END,
    updated_at = now()
FROM unnest(%s::bigint[], %s::boolean[], %s::timestamptz[], %s::timestamptz[], %s::jsonb[], %s::text[])
     AS c(id, cancel, notify_at, run_at, patch, reason)
WHERE j.id = c.id AND j.status = 'pending'
RETURNING j.id
"""


# --------------------------------------------------------------------------- the tick


async def run_tick(
    db: Database,
    settings: Settings,
    now: datetime,
    *,
    dry_run: bool = False,
    detailed: bool | None = None,
    user_id: int | None = None,
    full_scan: bool = False,
) -> TickReport:
    """Run one tick at the instant ``now`` (aware); see the module docstring.

    ``detailed`` (default: the same as ``dry_run``) makes the report account for every user it looked at
    (``deduplicated_users``, ``not_due`` with the next due time), at the cost of planning every user.
    ``user_id``: a one-user tick (after a change to that user's preference): the same tick for that user
    alone, which waits up to :data:`USER_LOCK_TIMEOUT` seconds for a running tick to finish.
    ``full_scan``: read every active preference instead of the due ones (``next_due_at``); always so for a
    dry run and a detailed report. It does the same and writes the same.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("run_tick needs an aware datetime for now")
    if user_id is not None and (
        isinstance(user_id, bool) or not isinstance(user_id, int) or not 1 <= user_id <= MAX_USER_ID
    ):
        raise ValueError(f"user_id must be an integer from 1 to {MAX_USER_ID}, got {shown(repr(user_id), 40)}")
    now = now.astimezone(UTC)
    report = TickReport(now=now, dry_run=dry_run, detailed=dry_run if detailed is None else detailed, user_id=user_id)
    started = time_mod.perf_counter()
    async with db.raw() as raw:
        conn = _Counted(raw)
        try:
            if not await (_try_lock(conn) if user_id is None else _wait_lock(conn, USER_LOCK_TIMEOUT)):
                report.skipped_locked = True
                log.info("%s skipped: another scheduler holds the lock", _what(report))
            else:
                await _tick(conn, settings, now, report, full_scan or dry_run or report.detailed)
        finally:
            report.queries = conn.count
            if dry_run and not raw.closed:
                await raw.rollback()
    report.duration_s = time_mod.perf_counter() - started
    _record(report)
    return report


def _what(report: TickReport) -> str:
    """The tick as log lines name it."""
    if report.user_id is None:
        return f"tick at {iso(report.now)}"
    return f"tick for user {report.user_id} at {iso(report.now)}"


async def _try_lock(conn: _Counted) -> bool:
    """Take the scheduler's transaction-scoped advisory lock, or report that another tick holds it."""
    rows = await conn.fetch("SELECT pg_try_advisory_xact_lock(%s) AS locked", (LOCK_KEY,), dict_row)
    return bool(rows and rows[0]["locked"])


async def _wait_lock(conn: _Counted, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the scheduler's advisory lock (a one-user tick); False when it timed out.

    On a timeout the transaction is rolled back (nothing was done in it yet); otherwise the connection's
    own lock timeout is back for the rest of the tick.
    """
    rows = await conn.fetch(
        "SELECT current_setting('lock_timeout') AS before, set_config('lock_timeout', %s, true) AS now",
        (f"{max(1, round(timeout * 1000))}ms",),
        dict_row,
    )
    try:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        await conn.conn.rollback()
        return False
    await conn.execute("SELECT set_config('lock_timeout', %s, true)", (rows[0]["before"],))
    return True


async def _tick(conn: _Counted, settings: Settings, now: datetime, report: TickReport, full_scan: bool) -> None:
    planner = _Planner(now, settings, track=not report.dry_run)
    writer = _Writer()
    user_id = report.user_id
    pending = await _load_pending(conn, user_id)
    ids = None
    if user_id is None and not full_scan:
        ids = await _select(conn, planner, pending)
    elif user_id is None and not report.dry_run:
        await _check_tzdata(conn)
    if ids is None:
        await _scan_pages(conn, settings, planner, pending, report, writer)
    else:
        await _id_pages(conn, settings, planner, ids, pending, report, writer)
    # Pending scheduler jobs of users no page visited: their preference is inactive or gone.
    leftovers = [_Change(job, True, "preference inactive or removed") for jobs in pending.values() for job in jobs]
    await _apply(conn, leftovers, report)
    if user_id is None:  # the sweep is for every user: the periodic tick's
        await _fail_orphaned_briefs(conn, now, report, writer)
    elif writer.users:
        await conn.execute(_WRITE, writer.take())
    if user_id is None and starts.enabled(settings):  # every brief in the window, planned together
        await _plan_starts(conn, settings, now, report)
    started_earlier = report.capacity is not None and report.capacity["started_earlier"]
    if not report.dry_run and (report.enqueued or report.moved or started_earlier):
        await conn.execute("SELECT pg_notify(%s, '')", (queue.NOTIFY_CHANNEL,))  # workers re-arm their timers


async def _plan_starts(conn: _Counted, settings: Settings, now: datetime, report: TickReport) -> None:
    """The capacity-aware starts, in a savepoint: if they fail, the tick's work stands (briefs start the buffer
    ahead) and the failure is logged and reported, never the tick's."""
    try:
        async with conn.conn.transaction():
            await starts.plan_starts_of_tick(conn, settings, now, report)
    except Exception as exc:
        log.exception("%s: planning the starts failed; briefs start generation_buffer ahead", _what(report))
        report.capacity = {"error": f"{type(exc).__name__}: {_clip(str(exc))}", "started_earlier": 0}


async def _scan_pages(
    conn: _Counted,
    settings: Settings,
    planner: _Planner,
    pending: dict[int, list[_Pending]],
    report: TickReport,
    writer: _Writer,
) -> None:
    """Every active preference (or the one-user tick's), page by page in user_id order (keyset)."""
    user_id = report.user_id
    after = _MIN_ID
    page_size = settings.scheduler_page_size
    page_sql = _PAGE if user_id is None else _PAGE_USER
    while True:
        params = {"after": after, "page": page_size, "user": user_id, **planner.page_params, **writer.take()}
        rows = await conn.fetch(page_sql, params, named_rows(_PageRow))
        if not rows:
            break
        report.pages += 1
        report.users_seen += len(rows)
        after = rows[-1].user_id
        await _page(conn, settings, planner, rows, pending, report, writer)
        if len(rows) < page_size:
            break


async def _id_pages(
    conn: _Counted,
    settings: Settings,
    planner: _Planner,
    ids: list[int],
    pending: dict[int, list[_Pending]],
    report: TickReport,
    writer: _Writer,
) -> None:
    """The preferences of ``ids`` (sorted), page by page; an id whose preference is not active has no row."""
    page_size = settings.scheduler_page_size
    for start in range(0, len(ids), page_size):
        params = {"ids": ids[start : start + page_size], "page": page_size, **planner.page_params, **writer.take()}
        rows = await conn.fetch(_PAGE_IDS, params, named_rows(_PageRow))
        if not rows:
            continue
        report.pages += 1
        report.users_seen += len(rows)
        await _page(conn, settings, planner, rows, pending, report, writer)


async def _select(conn: _Counted, planner: _Planner, pending: dict[int, list[_Pending]]) -> list[int] | None:
    """The users an indexed tick plans, in order: due (or unknown) ones and those with pending scheduler jobs.

    None when more than :data:`INDEXED_MAX_USERS` are due: the tick then scans every preference.
    """
    version = tzdata_version()
    until = planner.now + planner.lookahead
    params = {"version": version, "until": until, "implausible": until + _LATEST_NEXT, "cap": INDEXED_MAX_USERS}
    rows = await conn.fetch(_DUE, params, dict_row)
    selected = {row["user_id"] for row in rows}
    if None in selected:
        log.info("tz database %s: every next_due_at is recomputed", version)
        selected.discard(None)
    if len(rows) >= INDEXED_MAX_USERS:
        return None
    return sorted(selected.union(pending))


async def _check_tzdata(conn: _Counted) -> None:
    """A full scan that writes: store the tz database version, and set every next_due_at NULL if it changed."""
    version = tzdata_version()
    rows = await conn.fetch(_RESET, {"version": version}, dict_row)
    if rows and rows[0]["changed"]:
        log.info("tz database %s: every next_due_at is recomputed", version)


@functools.cache
def tzdata_version() -> str:
    """The version of the tz database the planner reads (the ``tzdata`` package: briefs.contract.load_timezone)."""
    try:
        found = getattr(importlib.import_module("tzdata"), "IANA_VERSION", None)
    except ImportError:
        found = None
    return found if isinstance(found, str) and found else "unknown"


class _Writer:
    """The next_due_at values a page planned, until the next statement that stores them (see _WRITE)."""

    def __init__(self) -> None:
        self.users: list[int] = []
        self.due: list[datetime | None] = []
        self.versions: list[int] = []

    def add_page(self, rows: list[_PageRow], values: dict[int, datetime | None]) -> None:
        """Keep the values of a page's rows that differ from the stored ones."""
        for row in rows:
            value = values.get(row.user_id, row.next_due_at)
            if value != row.next_due_at:
                self.users.append(row.user_id)
                self.due.append(value)
                self.versions.append(row.version)

    def take(self) -> dict[str, list[Any]]:
        """The parameters of _WRITE (``w_user``, ``w_due``, ``w_version``), and nothing kept."""
        params: dict[str, list[Any]] = {"w_user": self.users, "w_due": self.due, "w_version": self.versions}
        self.users, self.due, self.versions = [], [], []
        return params


async def _fail_orphaned_briefs(conn: _Counted, now: datetime, report: TickReport, writer: _Writer) -> None:
    """Mark failed the briefs that no job will ever finish: one statement per tick.

    A brief job's handler marks its brief failed when the job gives up; a worker killed on the
    job's last attempt never gets there (the rescuer fails the job in SQL), so the brief would say
    'processing' for ever. A dry run reports them and rolls back with the rest of the tick.
    """
    # Each row, {user_id, brief_date, job_id, job_status}, is the report's item as it is.
    params = {"now": now, "job_type": BRIEF_JOB, **writer.take()}
    report.briefs_failed += await conn.fetch(_ORPHANED_BRIEFS, params, dict_row)
    if report.briefs_failed and not report.dry_run:
        log.warning("marked %d brief(s) failed: left processing by a job that ended %s",
                    len(report.briefs_failed), ", ".join(sorted({b["job_status"] for b in report.briefs_failed})))


async def _load_pending(conn: _Counted, user_id: int | None) -> dict[int, list[_Pending]]:
    """The pending scheduler jobs by user: every user's, or only ``user_id``'s (a one-user tick)."""
    pending: dict[int, list[_Pending]] = {}
    if user_id is None:
        rows = await conn.fetch(_PENDING, (BRIEF_JOB, SOURCE), named_rows(_PendingRow))
    else:
        rows = await conn.fetch(_PENDING_USER, (BRIEF_JOB, SOURCE, user_id), named_rows(_PendingRow))
    for row in rows:
        pending.setdefault(row.user_id, []).append(
            _Pending(
                id=row.id,
                user_id=row.user_id,
                dedup_key=row.dedup_key,
                brief_date=brief_date_of_key(row.dedup_key, row.user_id),
                notify_at=row.notify_at,
                catch_up=row.catch_up,
                email=row.email,
            )
        )
    return pending


async def _page(
    conn: _Counted,
    settings: Settings,
    planner: _Planner,
    rows: list[_PageRow],
    pending: dict[int, list[_Pending]],
    report: TickReport,
    writer: _Writer,
) -> None:
    """One page of users: plan, deduplicate, move or cancel pending jobs, check engagement and enqueue.

    Then the page's next_due_at values go to ``writer``; a user whose brief was planned but not queued
    (engagement, a refusal) is due again at the next tick (next_due_at = now), as a full scan would see it.
    """
    page = _plan_page(planner, rows, pending, report)
    new = await _deduplicate(conn, page.due, planner.now, page.changes, report)
    await _apply(conn, page.changes, report)
    if new:
        for user_id in await _enqueue(conn, settings, new, report):
            page.next_due[user_id] = planner.now
    if planner.track:
        writer.add_page(rows, page.next_due)


@dataclass(slots=True)
class _PagePlan:
    """What planning a page found: the briefs due now and the moves or cancels of pending jobs."""

    due: list[_Due] = field(default_factory=list)
    changes: list[_Change] = field(default_factory=list)
    next_due: dict[int, datetime | None] = field(default_factory=dict)  # each user's (when the planner tracks)


def _plan_page(
    planner: _Planner, rows: list[_PageRow], pending: dict[int, list[_Pending]], report: TickReport
) -> _PagePlan:
    """Plan every user of a page (taking its pending jobs out of ``pending``); skipped users are reported."""
    page = _PagePlan()
    cache = planner.cache
    detailed = report.detailed
    track = planner.track
    not_due = 0
    for row in rows:
        jobs = pending.pop(row.user_id, None)  # a skipped user's pending jobs are left as they are
        key: _ScheduleKey = (row.timezone, row.frequency, row.day_of_week, row.time_of_day)
        occurrences = cache.get(key)
        if not occurrences and not jobs and occurrences is not None:
            # The common case: nothing due and nothing queued (a bad last visit only matters when due).
            if not detailed or _list_not_due(planner, row, key, report):
                not_due += 1
            if track:
                page.next_due[row.user_id] = planner.next_due_at(key, row.user_id)
        elif _plan_user(planner, row, occurrences, jobs or [], page, report):
            not_due += 1
    report.not_due_count += not_due
    return page


def _list_not_due(planner: _Planner, row: _PageRow, key: _ScheduleKey, report: TickReport) -> bool:
    """List a user with nothing to do in a detailed report; False when it is skipped instead (bad last visit).

    ``key``: the row's schedule, found in the planner's cache.
    """
    try:
        _last_visit(row.last_visit_epoch)
    except _BadRow as exc:
        planner.skip_bad(report, row.user_id, str(exc))
        return False
    report.not_due.append({"user_id": row.user_id, **planner.next_due(key, row.user_id)})
    return True


def _plan_user(
    planner: _Planner,
    row: _PageRow,
    occurrences: list[Occurrence] | Exception | None,
    jobs: list[_Pending],
    page: _PagePlan,
    report: TickReport,
) -> bool:
    """Plan a user with something due or queued: its due briefs, then a check of its other pending jobs.

    ``occurrences`` is the cached plan of the user's schedule, None when not cached yet. True when the user
    has nothing to do: nothing due, and its queued jobs are as they should be.
    """
    planned = _user_and_plan(planner, row, occurrences, report)
    if planned is None:
        page.next_due[row.user_id] = None  # skipped, with its reason: planned again at every tick
        return False
    user, occurrences = planned
    if planner.track:
        page.next_due[user.user_id] = planner.next_due_at(user.schedule, user.user_id, occurrences)
    keys = set()
    for occ in occurrences:
        key = brief_dedup_key(user.user_id, occ.brief_date)
        keys.add(key)
        page.due.append(_Due(user, occ, key))
    changes = _recheck_pending(planner, user, jobs, keys)
    page.changes += changes
    if occurrences or changes:
        return False
    if report.detailed:
        report.not_due.append({"user_id": user.user_id, **planner.next_due(user.schedule, user.user_id)})
    return True


def _user_and_plan(
    planner: _Planner, row: _PageRow, occurrences: list[Occurrence] | Exception | None, report: TickReport
) -> tuple[_User, list[Occurrence]] | None:
    """The user of a row and its occurrences; None when the user is skipped (its reason reported)."""
    try:
        schedule = _schedule_of(row)  # _BadRow for a NULL timezone or time (never a cached schedule)
        if occurrences is None:
            occurrences = planner.plan(schedule, row.user_id)
    except _BadRow as exc:
        planner.skip_bad(report, row.user_id, str(exc))
        return None
    except Exception as exc:  # a planner bug must not stop the tick
        log.exception("planning failed for user %s", row.user_id)
        occurrences = exc
    if isinstance(occurrences, Exception):
        _skip_unplanned(planner, report, row.user_id, occurrences)
        return None
    try:
        last_visit = _last_visit(row.last_visit_epoch)
    except _BadRow as exc:
        planner.skip_bad(report, row.user_id, str(exc))
        return None
    user = _User(user_id=row.user_id, schedule=schedule, email=row.email_enabled, last_visit_at=last_visit,
                 llm_calls=starts.expected_calls(row.active_projects, planner.settings))
    return user, occurrences


def _skip_unplanned(planner: _Planner, report: TickReport, user_id: int, error: Exception) -> None:
    """Skip a user whose schedule the planner rejected (bad data: a warning) or failed on (a bug)."""
    if isinstance(error, InvalidTimezone):
        planner.skip_bad(report, user_id, f"invalid_timezone: {error}")
    elif isinstance(error, ValueError):
        planner.skip_bad(report, user_id, _clip(str(error)))
    else:
        report.skip(user_id, f"plan_error: {type(error).__name__}: {_clip(str(error))}")


def _recheck_pending(planner: _Planner, user: _User, jobs: list[_Pending], planned: set[str]) -> list[_Change]:
    """The moves and cancels of a user's pending jobs outside this tick's plan (``planned``: its keys)."""
    changes = []
    for job in jobs:
        if job.dedup_key in planned:
            continue  # reconciled with the plan by _deduplicate
        try:
            change = planner.recheck(user, job)
        except Exception:  # leave the job as it is rather than stop the page
            log.exception("checking pending job %s of user %s failed", job.id, user.user_id)
            continue
        if change is not None:
            changes.append(change)
    return changes


async def _deduplicate(
    conn: _Counted, due: list[_Due], now: datetime, changes: list[_Change], report: TickReport
) -> list[_Due]:
    """The due briefs no live job blocks: one query for the page.

    A blocked brief is counted as deduplicated, unless the job that blocks it is a pending scheduler job
    whose instant or email changed: that job's move is added to ``changes``.
    """
    if not due:
        return []
    existing: dict[str, list[_LiveJob]] = {}
    for live in await conn.fetch(_DEDUP, (SOURCE, [d.key for d in due], BRIEF_JOB), named_rows(_LiveJob)):
        existing.setdefault(live.dedup_key, []).append(live)
    new: list[_Due] = []
    for d in due:
        lives = existing.get(d.key)
        if not lives:
            new.append(d)
            continue
        change = _reconcile(d, lives, now)
        if change is None:
            _count_deduplicated(report, d, lives)
        else:
            changes.append(change)
    return new


def _count_deduplicated(report: TickReport, d: _Due, lives: list[_LiveJob]) -> None:
    report.deduplicated += 1
    if report.detailed:
        job = min(lives, key=lambda live: _LIVE_FIRST.get(live.status, 3))  # the job that blocks: live first
        report.deduplicated_users.append(
            {"user_id": d.user.user_id, "brief_date": d.occ.brief_date, "job_id": job.id, "status": job.status}
        )


def _reconcile(d: _Due, lives: list[_LiveJob], now: datetime) -> _Change | None:
    """An existing job blocks the new one; a pending scheduler job whose instant changed is moved."""
    pend = next((live for live in lives if live.status == "pending"), None)
    if pend is None or not pend.by_scheduler:
        return None  # running, completed, or queued by hand: leave it
    notify_at = pend.notify_at
    job = _Pending(
        id=pend.id,
        user_id=pend.user_id,
        dedup_key=d.key,
        brief_date=d.occ.brief_date,
        notify_at=notify_at,
        catch_up=pend.catch_up,
        email=pend.email,
    )
    occ = d.occ
    if occ.catch_up:
        if notify_at is not None and notify_at <= now:
            return _email_patch(job, d.user.email)  # already due: keep it
        return _Change(job, False, "preference changed (catch-up)", now, now, True, d.user.email)
    if notify_at != occ.notify_at:
        return _Change(job, False, "preference changed", occ.notify_at, occ.run_at, False, d.user.email)
    return _email_patch(job, d.user.email)


async def _apply(conn: _Counted, changes: Sequence[_Change], report: TickReport) -> None:
    if not changes:
        return
    if report.dry_run:
        done = {c.job.id for c in changes}
    else:
        done = {row["id"] for row in await conn.fetch(_CHANGE, _change_params(changes), dict_row)}
    for c in changes:
        if c.job.id not in done:
            continue  # claimed by a worker meanwhile: it runs as it is
        item: dict[str, Any] = {
            "job_id": c.job.id,
            "user_id": c.job.user_id,
            "brief_date": c.job.brief_date,
            "reason": c.reason,
        }
        if c.cancel:
            report.cancelled.append(item)
        else:
            item.update(from_notify_at=c.job.notify_at, notify_at=c.notify_at, run_at=c.run_at, catch_up=c.catch_up)
            report.moved.append(item)


def _change_params(changes: Sequence[_Change]) -> tuple[list[Any], ...]:
    """The arrays _CHANGE unnests: one element per change."""
    return (
        [c.job.id for c in changes],
        [c.cancel for c in changes],
        [c.notify_at for c in changes],
        [c.run_at for c in changes],
        [
            None
            if c.cancel
            else Jsonb({"notify_at": iso_instant(c.notify_at) if c.notify_at else None,
                        "catch_up": c.catch_up, "email": c.email})
            for c in changes
        ],
        [c.reason for c in changes],
    )


async def _enqueue(conn: _Counted, settings: Settings, new: list[_Due], report: TickReport) -> set[int]:
    """Check engagement for the briefs no job blocks and insert the jobs of those to send: one statement.

    Returns the users with a brief not queued: skipped by engagement or refused by the queue.
    """
    histories = await engagement.load_histories(conn, _history_wanted(new))
    decisions = await _decide(new, histories)
    sends = _sends(new, decisions, report)
    sent = {id(send.due) for send in sends}
    unqueued = {d.user.user_id for d in new if id(d) not in sent}
    if not sends:
        return unqueued
    jobs = [_new_job(settings, send) for send in sends]
    if report.dry_run:
        ids: Sequence[int | None] = [None] * len(jobs)
        refused: dict[int, str] = {}
    else:
        result = await queue.enqueue_many(
            conn, jobs, default_max_attempts=settings.max_attempts, notify=False,  # type: ignore[arg-type]
            max_payload_bytes=settings.max_payload_bytes,
        )
        ids = result
        refused = {r.index: r.reason for r in result.rejected}
    _report_inserted(report, sends, ids, refused)
    return unqueued.union(sends[index].due.user.user_id for index in refused)


def _history_wanted(new: list[_Due]) -> list[tuple[int, date, date]]:
    """(user_id, last visit date, brief date) of the users whose engagement decision reads their history.

    History only matters for users inactive 4+ days; one query loads it for all of them.
    """
    wanted: list[tuple[int, date, date]] = []
    for d in new:
        try:
            tz = load_timezone(d.user.schedule.timezone)
            if engagement.needs_history(d.user.last_visit_at, d.occ.brief_date, tz):
                visited = engagement.visit_date(d.user.last_visit_at, tz)
                assert visited is not None
                wanted.append((d.user.user_id, visited, d.occ.brief_date))
        except Exception:  # decide() meets the same error and skips just this user
            pass
    return wanted


async def _decide(
    new: list[_Due], histories: dict[tuple[int, date], engagement.History]
) -> list[engagement.Decision | BaseException]:
    """The engagement decision of each brief, in order, or the exception its check raised."""
    # A user with two occurrences in one tick: the earlier decision is history for the later one.
    extra: dict[int, list[tuple[date, str | None]]] = {}

    async def check(d: _Due) -> engagement.Decision:
        history = histories.get((d.user.user_id, d.occ.brief_date), engagement.EMPTY_HISTORY)
        more = extra.get(d.user.user_id)
        if more:
            history = engagement.History(history.briefs + tuple(more))
        tz = load_timezone(d.user.schedule.timezone)
        decision = engagement.decide(d.user.last_visit_at, history, d.occ.brief_date, tz=tz)
        if decision.send:
            extra.setdefault(d.user.user_id, []).append((d.occ.brief_date, decision.stage))
        return decision

    # Checks are pure and cheap; gather isolates them: one failing check skips its user, never the page.
    return await asyncio.gather(*(check(d) for d in new), return_exceptions=True)


@dataclass(slots=True)
class _Send:
    """A brief to enqueue, at the engagement stage its check decided."""

    due: _Due
    stage: str


def _sends(
    new: list[_Due], decisions: list[engagement.Decision | BaseException], report: TickReport
) -> list[_Send]:
    """The briefs whose engagement check says send; the others' users are skipped with the reason."""
    sends: list[_Send] = []
    for d, decision in zip(new, decisions, strict=True):
        if isinstance(decision, BaseException):
            if not isinstance(decision, Exception):
                raise decision
            reason = f"engagement_error: {type(decision).__name__}: {_clip(str(decision))}"
            log.error("engagement check failed for user %s: %s", d.user.user_id, reason)
            report.skip(d.user.user_id, reason)
        elif not decision.send:
            report.skip(d.user.user_id, decision.reason or "engagement: skipped")
        else:
            sends.append(_Send(d, decision.stage or STANDARD))
    return sends


def _new_job(settings: Settings, send: _Send) -> NewJob:
    user, occ = send.due.user, send.due.occ
    payload = BriefRequest(
        user.user_id, occ.brief_date, occ.notify_at, send.stage, email=user.email, catch_up=occ.catch_up
    ).to_payload(source=SOURCE)
    if user.llm_calls is not None:
        payload[starts.CALLS_KEY] = user.llm_calls
    return NewJob(
        job_type=BRIEF_JOB,
        payload=payload,
        priority=PRIORITY,
        run_at=occ.run_at,
        max_attempts=settings.max_attempts,
        dedup_key=send.due.key,
        user_id=user.user_id,
        notify_at=occ.notify_at,
    )


def _report_inserted(
    report: TickReport, sends: list[_Send], ids: Sequence[int | None], refused: dict[int, str]
) -> None:
    """Report each brief sent: enqueued (``ids``: None in a dry run), refused by the queue, or deduplicated."""
    for index, (send, job_id) in enumerate(zip(sends, ids, strict=True)):
        d = send.due
        if index in refused:  # the queue would not take it (a field out of range): that user alone
            report.skip(d.user.user_id, f"enqueue_refused: {refused[index]}")
            continue
        if job_id is None and not report.dry_run:
            report.deduplicated += 1  # a live job with this key appeared since the dedup query
            if report.detailed:
                report.deduplicated_users.append(
                    {"user_id": d.user.user_id, "brief_date": d.occ.brief_date, "job_id": None, "status": None}
                )
            continue
        report.enqueued.append(
            {
                "user_id": d.user.user_id,
                "brief_date": d.occ.brief_date,
                "notify_at": d.occ.notify_at,
                "run_at": d.occ.run_at,
                "job_id": job_id,
                "stage": send.stage,
                "catch_up": d.occ.catch_up,
            }
        )


def _record(report: TickReport) -> None:
    if report.user_id is None:  # the duration metric is the periodic tick's
        metrics.TICK_DURATION.observe(report.duration_s)
    if report.dry_run or report.skipped_locked:
        return
    metrics.TICK_USERS_ENQUEUED.inc(len(report.enqueued))
    for kind, count in report.skipped_by_kind().items():
        metrics.TICK_USERS_SKIPPED.labels(reason=kind).inc(count)
    log.info(
        "%s: %d users, %d enqueued, %d already queued, %d moved, %d cancelled, %d skipped "
        "(%d pages, %d queries, %.3fs)",
        _what(report),
        report.users_seen,
        len(report.enqueued),
        report.deduplicated,
        len(report.moved),
        len(report.cancelled),
        len(report.skipped),
        report.pages,
        report.queries,
        report.duration_s,
    )
