"""The engagement policy: range gates, one touch per stage per inactivity period, visits reset."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from briefs.engagement import (
    DORMANT,
    EMPTY_HISTORY,
    REENGAGE,
    REENGAGE_LATE,
    STANDARD,
    Decision,
    History,
    decide,
    inactive_days,
    needs_history,
)

VISIT = date(2026, 1, 1)  # the last visit, at noon UTC


def visit_at(day: date = VISIT) -> datetime:
    return datetime(day.year, day.month, day.day, 12, 0, tzinfo=UTC)


def day(n: int) -> date:
    """The date n days after the visit."""
    return VISIT + timedelta(days=n)


def hist(*entries: tuple[int, str | None]) -> History:
    return History(tuple((day(n), stage) for n, stage in entries))


SEND = "send"

# (case, days inactive at the brief, history as (day offset, stage), expected stage or SEND-less skip)
CASES = [
    ("visited today", 0, [], STANDARD),
    ("day 1", 1, [(0, STANDARD)], STANDARD),
    ("day 3 is still standard", 3, [(1, STANDARD), (2, STANDARD)], STANDARD),
    ("day 4: first re-engagement", 4, [(1, STANDARD), (2, STANDARD), (3, STANDARD)], REENGAGE),
    ("tick missed on day 4 -> sent on day 5", 5, [(1, STANDARD), (2, STANDARD), (3, STANDARD)], REENGAGE),
    ("scheduler down days 4-12 -> sent on day 13", 13, [(3, STANDARD)], REENGAGE),
    ("re-engagement sent once only (day 5)", 5, [(3, STANDARD), (4, REENGAGE)], None),
    ("between stages (day 13)", 13, [(4, REENGAGE)], None),
    ("day 14: late re-engagement", 14, [(4, REENGAGE)], REENGAGE_LATE),
    ("tick missed on day 14 -> late sent on day 16", 16, [(4, REENGAGE)], REENGAGE_LATE),
    ("late sent once only", 20, [(4, REENGAGE), (14, REENGAGE_LATE)], None),
    ("first seen at day 20: late only, never day-4 stage after", 20, [], REENGAGE_LATE),
    ("late already sent covers day-4 stage", 10, [(9, REENGAGE_LATE)], None),
    ("day 30: dormant check-in", 30, [(4, REENGAGE), (14, REENGAGE_LATE)], DORMANT),
    ("dormant missed on day 30 -> sent day 33", 33, [(4, REENGAGE), (14, REENGAGE_LATE)], DORMANT),
    ("dormant once, not again on day 31", 31, [(30, DORMANT)], None),
    ("dormant: 59 days later still waiting", 89, [(30, DORMANT)], None),
    ("dormant: again 60 days later", 90, [(30, DORMANT)], DORMANT),
    ("dormant: again 61 days later (missed tick)", 91, [(30, DORMANT)], DORMANT),
    ("dormant: the latest check-in counts", 100, [(30, DORMANT), (90, DORMANT)], None),
    ("a failed/unknown-stage brief counts as standard", 6, [(5, None)], REENGAGE),
    ("briefs on/after the brief date are ignored", 5, [(5, REENGAGE), (6, REENGAGE)], REENGAGE),
]


@pytest.mark.parametrize(("days", "entries", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision_table(days: int, entries: list[tuple[int, str | None]], expected: str | None) -> None:
    decision = decide(visit_at(), hist(*entries), day(days))
    if expected is None:
        assert not decision.send
        assert decision.stage is None
        assert decision.reason and decision.reason.startswith("engagement: ")
    else:
        assert decision == Decision(True, expected, None)


def test_missing_last_visit_is_standard() -> None:
    assert decide(None, hist((4, REENGAGE), (30, DORMANT)), day(100)) == Decision(True, STANDARD, None)


def test_visit_resets_the_period() -> None:
    # Re-engaged on day 4, came back on day 8: standard again, then the stages start over.
    history = hist((4, REENGAGE), (8, STANDARD))
    back = visit_at(day(8))
    assert decide(back, history, day(9)).stage == STANDARD
    assert decide(back, history, day(11)).stage == STANDARD
    assert decide(back, history, day(12)).stage == REENGAGE  # 4 days after the new visit
    # ... and only once in the new period.
    assert not decide(back, hist((4, REENGAGE), (12, REENGAGE)), day(13)).send


def test_briefs_before_the_visit_do_not_count() -> None:
    history = hist((-20, REENGAGE), (-10, REENGAGE_LATE), (-1, DORMANT))
    assert decide(visit_at(), history, day(4)).stage == REENGAGE
    assert decide(visit_at(), history, day(30)).stage == DORMANT


def test_skip_reasons_say_when_the_next_touch_is() -> None:
    reason = decide(visit_at(), hist((4, REENGAGE)), day(6)).reason
    assert reason is not None
    assert "re_engagement already sent on 2026-01-05" in reason and "day 14 (2026-01-15)" in reason
    reason = decide(visit_at(), hist((30, DORMANT)), day(40)).reason
    assert reason is not None and "next check-in from 2026-04-01" in reason


def test_days_are_counted_in_the_users_timezone() -> None:
    # 23:30 UTC on Jan 1 is already Jan 2 in Tokyo: the visit date is Jan 2 there.
    late_visit = datetime(2026, 1, 1, 23, 30, tzinfo=UTC)
    tokyo = ZoneInfo("Asia/Tokyo")
    assert inactive_days(late_visit, date(2026, 1, 5)) == 4
    assert inactive_days(late_visit, date(2026, 1, 5), tokyo) == 3
    assert decide(late_visit, EMPTY_HISTORY, date(2026, 1, 5)).stage == REENGAGE
    assert decide(late_visit, EMPTY_HISTORY, date(2026, 1, 5), tz=tokyo).stage == STANDARD


def test_needs_history_only_from_day_4() -> None:
    assert not needs_history(None, day(50))
    assert not needs_history(visit_at(), day(3))
    assert needs_history(visit_at(), day(4))


def test_a_naive_visit_is_read_as_utc() -> None:
    assert inactive_days(datetime(2026, 1, 1, 12, 0), day(5)) == 5
