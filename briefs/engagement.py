"""Engagement policy: whether a user gets a brief on a date, and in which tone (stage).

The scheduler asks :func:`decide` once per brief it is about to enqueue; the brief
generator reads the chosen stage from the job payload (``engagement_stage``) and
changes tone and subject by stage. Everything here is pure except
:func:`load_histories`, one batched query for a page of users.

Rules (``d`` = whole days between the local date of ``users.last_visit_at`` and the
brief date, both in the user's timezone; the *inactivity period* is every brief
dated after that visit date):

* No ``last_visit_at`` (never tracked) → ``standard``.
* ``d`` ≤ 3 (visited today or in the last three days) → ``standard``. Active users get every brief.
* 4 ≤ ``d`` < 14 → one ``re_engagement`` brief per inactivity period, then skip until day 14.
* 14 ≤ ``d`` < 30 → one ``re_engagement_late`` brief per inactivity period, then skip until day 30.
* ``d`` ≥ 30 → a ``dormant_check_in``, and another one whenever the last check-in of the period is
  60 or more days old; skip in between.

The gates are ranges, never exact days: a tick missed on day 4 sends the first
re-engagement brief on day 5 (or 6, …); what matters is that the stage has not
been sent yet in this period. A later stage already sent covers an earlier one
(a user first seen at day 20 gets the late brief only, never the day-4 one
afterwards). A visit starts a new period, so a user who comes back is
``standard`` again and the stages can happen again after the next absence.

History counts briefs that were, or are being, delivered: ``daily_briefs`` rows
that are ``processing``, ``completed`` or ``partial`` and live (pending or running)
``generate_daily_brief`` jobs, so a brief still waiting in the queue is not sent
twice in another stage. Failed and skipped briefs do not count: the stage is tried
again at the next brief.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

from briefs.contract import BRIEF_JOB, DORMANT, ISO_DATE_SQL_PATTERN, REENGAGE, REENGAGE_LATE, STANDARD, parse_iso_date

REENGAGE_FROM_DAY = 4
REENGAGE_LATE_FROM_DAY = 14
DORMANT_FROM_DAY = 30
DORMANT_EVERY_DAYS = 60

# A stage "covers" the earlier ones: once sent in a period, earlier stages are not sent in that period.
_RANK = {STANDARD: 0, REENGAGE: 1, REENGAGE_LATE: 2, DORMANT: 3}

# daily_briefs statuses that mean "this brief went out or is going out".
DELIVERED_STATUSES = ("processing", "completed", "partial")


@dataclass(frozen=True, slots=True)
class Decision:
    send: bool
    stage: str | None  # one of STAGES when send is True
    reason: str | None  # why not, when send is False ("engagement: …")


@dataclass(frozen=True, slots=True)
class History:
    """A user's briefs of the current inactivity period: (brief_date, engagement_stage), any order.

    Entries dated on or before the last visit, or on or after the brief being
    decided, are ignored by :func:`decide`, so a longer history is harmless.
    """

    briefs: tuple[tuple[date, str | None], ...] = ()


EMPTY_HISTORY = History()


def visit_date(last_visit_at: datetime | None, tz: tzinfo = UTC) -> date | None:
    """The local calendar date of the last visit (None when unknown)."""
    if last_visit_at is None:
        return None
    if last_visit_at.tzinfo is None:
        last_visit_at = last_visit_at.replace(tzinfo=UTC)
    return last_visit_at.astimezone(tz).date()


def inactive_days(last_visit_at: datetime | None, brief_date: date, tz: tzinfo = UTC) -> int | None:
    """Whole local days from the last visit to ``brief_date`` (None when the visit is unknown)."""
    visited = visit_date(last_visit_at, tz)
    return None if visited is None else (brief_date - visited).days


def needs_history(last_visit_at: datetime | None, brief_date: date, tz: tzinfo = UTC) -> bool:
    """Whether :func:`decide` looks at the history at all (the user is inactive for 4+ days)."""
    days = inactive_days(last_visit_at, brief_date, tz)
    return days is not None and days >= REENGAGE_FROM_DAY


def decide(
    last_visit_at: datetime | None,
    history: History,
    brief_date: date,
    *,
    tz: tzinfo = UTC,
) -> Decision:
    """Send or skip the brief of ``brief_date``, and at which stage (see the module docstring)."""
    days = inactive_days(last_visit_at, brief_date, tz)
    if days is None or days < REENGAGE_FROM_DAY:
        return Decision(True, STANDARD, None)
    visited = visit_date(last_visit_at, tz)
    assert visited is not None
    period = [(d, s) for d, s in history.briefs if visited < d < brief_date]
    reached = max((_RANK.get(s or STANDARD, 0) for _, s in period), default=0)

    if days < REENGAGE_LATE_FROM_DAY:
        if reached < _RANK[REENGAGE]:
            return Decision(True, REENGAGE, None)
        sent = _last(period, REENGAGE, REENGAGE_LATE, DORMANT)
        return _skip(
            f"{REENGAGE} already sent on {sent} ({days} days inactive); next touch from day "
            f"{REENGAGE_LATE_FROM_DAY} ({visited + timedelta(days=REENGAGE_LATE_FROM_DAY)})"
        )
    if days < DORMANT_FROM_DAY:
        if reached < _RANK[REENGAGE_LATE]:
            return Decision(True, REENGAGE_LATE, None)
        sent = _last(period, REENGAGE_LATE, DORMANT)
        return _skip(
            f"{REENGAGE_LATE} already sent on {sent} ({days} days inactive); next touch from day "
            f"{DORMANT_FROM_DAY} ({visited + timedelta(days=DORMANT_FROM_DAY)})"
        )
    last_check_in = _last(period, DORMANT)
    if last_check_in is None or (brief_date - last_check_in).days >= DORMANT_EVERY_DAYS:
        return Decision(True, DORMANT, None)
    return _skip(
        f"{DORMANT} sent on {last_check_in} ({days} days inactive); next check-in from "
        f"{last_check_in + timedelta(days=DORMANT_EVERY_DAYS)}"
    )


def _skip(why: str) -> Decision:
    return Decision(False, None, f"engagement: {why}")


def _last(period: Iterable[tuple[date, str | None]], *stages: str) -> date | None:
    return max((d for d, s in period if s in stages), default=None)


# --------------------------------------------------------------------------- the batched loader

# Every value this query returns decodes whatever the rows hold. daily_briefs dates are compared in SQL and
# only those strictly between two Python dates come back. A queued job's payload date is text that may not be
# a date at all ('2026-02-30' passes a pattern but fails a ::date cast, which would abort the query): it is
# compared as text (ISO dates of four-digit years sort like the dates, in the "C" collation) and returned as
# text, parsed in Python, and dropped when it is not a real date. Stages are clipped (only known names count).
_HISTORY_SQL = f"""
SELECT t.user_id, t.before_date, h.brief_date, h.brief_text, left(h.stage, 40)
FROM unnest(%s::bigint[], %s::date[], %s::date[]) AS t(user_id, after_date, before_date)
JOIN LATERAL (
    SELECT b.brief_date, NULL::text AS brief_text, b.engagement_stage AS stage
    FROM daily_briefs b
    WHERE b.user_id = t.user_id AND b.brief_date > t.after_date AND b.brief_date < t.before_date
      AND b.status IN ({", ".join(f"'{s}'" for s in DELIVERED_STATUSES)})
    UNION ALL
    SELECT NULL::date, q.brief_text, q.stage
    FROM (SELECT j.payload->>'brief_date' COLLATE "C" AS brief_text, j.payload->>'engagement_stage' AS stage
          FROM queue_jobs j
          WHERE j.user_id = t.user_id AND j.job_type = '{BRIEF_JOB}'
            AND j.status IN ('pending', 'processing')) q
    WHERE q.brief_text ~ '{ISO_DATE_SQL_PATTERN}'
      AND q.brief_text > to_char(t.after_date, 'YYYY-MM-DD') AND q.brief_text < to_char(t.before_date, 'YYYY-MM-DD')
) h ON true
"""


async def load_histories(conn: Any, wanted: Sequence[tuple[int, date, date]]) -> dict[tuple[int, date], History]:
    """One query for many users: ``wanted`` holds (user_id, last visit date, brief date).

    Returns the :class:`History` of each (user_id, brief_date) that has any brief
    dated strictly between the visit and the brief date; absent keys mean none.
    ``conn`` is a psycopg async connection (or anything with its ``execute``).
    """
    if not wanted:
        return {}
    user_ids, visit_dates, brief_dates = (list(column) for column in zip(*wanted, strict=True))
    cur = await conn.execute(_HISTORY_SQL, (user_ids, visit_dates, brief_dates))
    found: dict[tuple[int, date], list[tuple[date, str | None]]] = {}
    for user_id, before, brief_date, brief_text, stage in await cur.fetchall():
        day = brief_date if brief_date is not None else parse_iso_date(brief_text or "")
        if day is not None:
            found.setdefault((user_id, before), []).append((day, stage))
    return {key: History(tuple(rows)) for key, rows in found.items()}
