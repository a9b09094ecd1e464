"""Pure, DST-safe planning of brief occurrences.

Nothing here touches a database, the filesystem (beyond loading tz data) or the clock: every function that
depends on time takes ``now`` (an aware datetime) as an argument.

Rules:

* A user's preference is a local wall time (``time_of_day``) in an IANA timezone, every day or on one ISO
  weekday. An occurrence belongs to a local calendar date (its ``brief_date``) and happens at one UTC instant.
* A wall time that does not exist (spring-forward gap) moves forward by the length of the gap
  (02:30 on a US spring-forward day becomes 03:30 daylight time). A wall time that exists twice (fall back)
  happens once, at its first (earlier) instant.
* At each tick, occurrences whose instant lies in ``[now, now + lookahead)`` are planned for their instant,
  starting ``generation_buffer`` early but never before ``now``. Occurrences missed within
  ``(now - catch_up, now)`` are planned as catch-ups for ``now``. The caller deduplicates against jobs that
  already exist per (user, brief_date): see :func:`dedup_key`.
* The brief date is the local date whose wall time the occurrence is. It equals the local date of the
  instant except when a gap straddles midnight (America/Nuuk springs from 23:00 to 00:00): a 23:30 brief
  for that Saturday is delivered at 00:30 Sunday, and stays Saturday's brief so Sunday's is not lost.

:func:`upcoming` lists a preference's next occurrences for people (when will this user get a brief, and
what did a DST change do to it), by the same rules: :func:`resolve_local` is the one reading of a wall
time, and :func:`local_to_utc` is its instant.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

# A user's timezone is checked and loaded in one place, shared with the brief domain.
from briefs.contract import load_timezone

__all__ = [
    "FOLD_FIRST",
    "GAP_SHIFTED",
    "MAX_UPCOMING_DAYS",
    "Occurrence",
    "Preference",
    "Upcoming",
    "local_to_utc",
    "next_occurrence",
    "occurrences_between",
    "plan",
    "resolve_local",
    "upcoming",
]

_ONE_DAY = timedelta(days=1)
_ZERO = timedelta(0)
GAP_SHIFTED = "gap_shifted"  # the wall time did not exist that day (spring forward): moved forward by the gap
FOLD_FIRST = "fold_first"  # the wall time existed twice that day (fall back): the first instant is used
MAX_UPCOMING_DAYS = 366


@dataclass(frozen=True, slots=True)
class Preference:
    user_id: int
    timezone: str
    frequency: str  # 'daily' | 'weekly'
    day_of_week: int | None  # ISO 1=Monday..7=Sunday, only for weekly
    time_of_day: time
    email_enabled: bool = False
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Occurrence:
    brief_date: date  # the local calendar date the brief belongs to, in the user's timezone
    notify_at: datetime  # aware UTC instant the user asked for (``now`` for a catch-up)
    run_at: datetime  # aware UTC: when the job should start = max(now, notify_at - generation_buffer)
    catch_up: bool  # True when this is a missed occurrence scheduled now


def resolve_local(day: date, at: time, tz: zoneinfo.ZoneInfo) -> tuple[datetime, str | None, timedelta | None]:
    """How the local wall time ``at`` on ``day`` in ``tz`` happens: (aware UTC instant, DST case, shift).

    The case is None when the wall time exists once, :data:`FOLD_FIRST` when it exists twice (the first,
    earlier instant is used) and :data:`GAP_SHIFTED` when it lies in a spring-forward gap (moved forward
    by the gap, which is the shift; the shift is None otherwise).
    """
    wall = datetime.combine(day, at.replace(tzinfo=None, fold=0))
    first = wall.replace(tzinfo=tz).astimezone(UTC)  # fold=0: read with the offset before a transition
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)  # fold=1: read with the offset after it
    if first == second:
        return first, None, None  # the wall time exists once
    if first < second:
        return first, FOLD_FIRST, None  # it exists twice (fall back): keep the first
    # Later: the wall time lies in a spring-forward gap of (first - second). Moved forward by the gap and read
    # with the new offset, it is second + gap, which is `first` (the reading with the old offset).
    return first, GAP_SHIFTED, first - second


def local_to_utc(day: date, at: time, tz: zoneinfo.ZoneInfo) -> datetime:
    """The aware UTC instant of the local wall time ``at`` on ``day`` in ``tz``.

    Nonexistent wall times move forward by the gap; ambiguous ones take the first (earlier) instant
    (:func:`resolve_local` says which case happened).
    """
    return resolve_local(day, at, tz)[0]


def _weekday(pref: Preference) -> int | None:
    if pref.frequency == "daily":
        return None
    if pref.frequency == "weekly":
        if pref.day_of_week is None or not 1 <= pref.day_of_week <= 7:
            raise ValueError(f"weekly preference of user {pref.user_id} needs day_of_week 1..7")
        return pref.day_of_week
    raise ValueError(f"unknown frequency {pref.frequency!r} for user {pref.user_id}")


def occurrences_between(
    pref: Preference, tz: zoneinfo.ZoneInfo, start: datetime, end: datetime
) -> list[tuple[date, datetime]]:
    """All (local brief date, aware UTC instant) occurrences with instant in [start, end), in order."""
    weekday = _weekday(pref)
    at = pref.time_of_day
    day = start.astimezone(tz).date() - _ONE_DAY
    last = end.astimezone(tz).date() + _ONE_DAY
    found: list[tuple[date, datetime]] = []
    while day <= last:
        if weekday is None or day.isoweekday() == weekday:
            instant = local_to_utc(day, at, tz)
            if start <= instant < end:
                found.append((day, instant))
        day += _ONE_DAY
    return found


def plan(
    pref: Preference,
    now: datetime,
    *,
    lookahead: timedelta,
    catch_up: timedelta,
    generation_buffer: timedelta,
) -> list[Occurrence]:
    """The occurrences to enqueue at the tick ``now``, ordered by brief_date, one per brief_date.

    Raises InvalidTimezone for a bad zone and ValueError for a naive ``now`` or a negative window.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    if lookahead < _ZERO or catch_up < _ZERO or generation_buffer < _ZERO:
        raise ValueError("lookahead, catch_up and generation_buffer must not be negative")
    now = now.astimezone(UTC)
    tz = load_timezone(pref.timezone)
    oldest = now - catch_up
    planned: list[Occurrence] = []
    for brief_date, instant in occurrences_between(pref, tz, oldest, now + lookahead):
        if instant >= now:
            planned.append(Occurrence(brief_date, instant, max(now, instant - generation_buffer), False))
        elif instant > oldest:  # missed, and strictly less than catch_up ago
            planned.append(Occurrence(brief_date, now, now, True))
    return planned


def next_occurrence(pref: Preference, after: datetime) -> tuple[date, datetime] | None:
    """The first (local brief date, aware UTC instant) occurrence with instant at or after ``after``.

    Looks eight days ahead (a weekly preference always has one by then). None only when the dates run
    out of Python's range (year 9999). Raises like :func:`plan` for a bad zone or preference.
    """
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("after must be an aware datetime")
    tz = load_timezone(pref.timezone)
    after = after.astimezone(UTC)
    try:
        found = occurrences_between(pref, tz, after, after + 8 * _ONE_DAY)
    except OverflowError:
        return None
    return found[0] if found else None


@dataclass(frozen=True, slots=True)
class Upcoming:
    """One coming occurrence of a preference, as an operator reads it."""

    brief_date: date  # the local date the brief belongs to
    local_time: time  # the wall time the user sees it at: the shifted one when the asked time fell in a gap
    notify_at: datetime  # aware UTC
    utc_offset: timedelta  # the zone's offset at that instant
    dst: str | None  # GAP_SHIFTED, FOLD_FIRST or None (see resolve_local)
    shifted_by: timedelta | None = None  # for GAP_SHIFTED: how far the wall time moved forward


def upcoming(pref: Preference, now: datetime, days: int) -> list[Upcoming]:
    """The occurrences with instant in ``[now, now + days)``, in order, with what DST did to each.

    The same occurrences the planner plans (:func:`occurrences_between`). ``local_time`` is the wall time of
    the instant; when a gap straddles midnight (America/Nuuk) it belongs to the day after ``brief_date``.
    Raises ValueError for ``days`` outside 1..366, a naive ``now``, a bad preference or dates past year
    9999, and InvalidTimezone like :func:`plan`.
    """
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_UPCOMING_DAYS:
        raise ValueError(f"days must be an integer from 1 to {MAX_UPCOMING_DAYS}, got {days!r}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    now = now.astimezone(UTC)
    tz = load_timezone(pref.timezone)
    try:
        found = occurrences_between(pref, tz, now, now + days * _ONE_DAY)
    except OverflowError as exc:
        raise ValueError("the dates run past year 9999") from exc
    listed: list[Upcoming] = []
    for brief_date, instant in found:
        _, case, shift = resolve_local(brief_date, pref.time_of_day, tz)
        local = instant.astimezone(tz)
        offset = local.utcoffset()
        assert offset is not None, "an instant in a ZoneInfo zone has an offset"
        listed.append(Upcoming(brief_date, local.time().replace(fold=0), instant, offset, case, shift))
    return listed
