"""scheduler.plan.upcoming: the next occurrences of a preference, with what DST did to each (pure)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

import pytest

from briefs.contract import InvalidTimezone
from scheduler.plan import (
    FOLD_FIRST,
    GAP_SHIFTED,
    Preference,
    Upcoming,
    load_timezone,
    local_to_utc,
    occurrences_between,
    resolve_local,
    upcoming,
)

HOUR = timedelta(hours=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def daily(tz: str, at: time) -> Preference:
    return Preference(user_id=1, timezone=tz, frequency="daily", day_of_week=None, time_of_day=at)


def weekly(tz: str, day_of_week: int, at: time) -> Preference:
    return Preference(user_id=1, timezone=tz, frequency="weekly", day_of_week=day_of_week, time_of_day=at)


def on(listed: list[Upcoming], day: date) -> Upcoming:
    [found] = [u for u in listed if u.brief_date == day]
    return found


def test_new_york_spring_forward_moves_0230_to_0330_by_the_gap() -> None:
    listed = upcoming(daily("America/New_York", time(2, 30)), utc(2026, 3, 6), 4)
    assert [u.brief_date for u in listed] == [date(2026, 3, d) for d in (6, 7, 8, 9)]
    gap = on(listed, date(2026, 3, 8))
    assert gap == Upcoming(date(2026, 3, 8), time(3, 30), utc(2026, 3, 8, 7, 30), -4 * HOUR, GAP_SHIFTED, HOUR)
    before, after = on(listed, date(2026, 3, 7)), on(listed, date(2026, 3, 9))
    assert (before.local_time, before.utc_offset, before.dst, before.shifted_by) == (time(2, 30), -5 * HOUR, None, None)
    assert (after.local_time, after.notify_at, after.utc_offset, after.dst) == (
        time(2, 30), utc(2026, 3, 9, 6, 30), -4 * HOUR, None)


def test_new_york_fall_back_uses_the_first_0130_with_the_daylight_offset() -> None:
    listed = upcoming(daily("America/New_York", time(1, 30)), utc(2026, 10, 31), 3)
    fold = on(listed, date(2026, 11, 1))
    assert fold == Upcoming(date(2026, 11, 1), time(1, 30), utc(2026, 11, 1, 5, 30), -4 * HOUR, FOLD_FIRST, None)
    after = on(listed, date(2026, 11, 2))
    assert (after.notify_at, after.utc_offset, after.dst) == (utc(2026, 11, 2, 6, 30), -5 * HOUR, None)


def test_weekly_lists_the_matching_weekdays_only() -> None:
    listed = upcoming(weekly("Europe/Paris", 1, time(7, 0)), utc(2026, 3, 1), 21)  # Sunday 1 March
    assert [u.brief_date for u in listed] == [date(2026, 3, 2), date(2026, 3, 9), date(2026, 3, 16)]
    assert all(u.brief_date.isoweekday() == 1 and u.local_time == time(7, 0) and u.dst is None for u in listed)
    assert listed[0].notify_at == utc(2026, 3, 2, 6, 0)


def test_london_spring_forward_and_fall_back() -> None:
    # 2026-03-29: 01:00 GMT jumps to 02:00 BST; 2026-10-25: 02:00 BST falls back to 01:00 GMT.
    spring = on(upcoming(daily("Europe/London", time(1, 15)), utc(2026, 3, 28), 3), date(2026, 3, 29))
    assert (spring.local_time, spring.notify_at, spring.utc_offset, spring.dst, spring.shifted_by) == (
        time(2, 15), utc(2026, 3, 29, 1, 15), HOUR, GAP_SHIFTED, HOUR)
    autumn = on(upcoming(daily("Europe/London", time(1, 15)), utc(2026, 10, 24), 3), date(2026, 10, 25))
    assert (autumn.local_time, autumn.notify_at, autumn.utc_offset, autumn.dst) == (
        time(1, 15), utc(2026, 10, 25, 0, 15), HOUR, FOLD_FIRST)


def test_lord_howe_shifts_by_half_an_hour() -> None:
    # Lord Howe Island springs from 02:00 (+10:30) to 02:30 (+11) on 2026-10-04.
    listed = upcoming(daily("Australia/Lord_Howe", time(2, 10)), utc(2026, 10, 2), 4)
    gap = on(listed, date(2026, 10, 4))
    assert (gap.local_time, gap.dst, gap.shifted_by, gap.utc_offset) == (
        time(2, 40), GAP_SHIFTED, timedelta(minutes=30), 11 * HOUR)
    assert on(listed, date(2026, 10, 3)).utc_offset == timedelta(hours=10, minutes=30)


def test_a_gap_across_midnight_keeps_the_brief_date() -> None:
    # America/Nuuk springs from 23:00 to 00:00 in the night of Saturday 2026-03-28.
    listed = upcoming(daily("America/Nuuk", time(23, 30)), utc(2026, 3, 27), 4)
    gap = on(listed, date(2026, 3, 28))
    assert (gap.local_time, gap.dst, gap.shifted_by) == (time(0, 30), GAP_SHIFTED, HOUR)
    assert gap.notify_at.astimezone(load_timezone("America/Nuuk")).date() == date(2026, 3, 29)
    assert len({u.brief_date for u in listed}) == len(listed)


def test_only_instants_from_now_on() -> None:
    listed = upcoming(daily("UTC", time(8, 0)), utc(2026, 5, 1, 8, 0), 2)
    assert [u.notify_at for u in listed] == [utc(2026, 5, 1, 8, 0), utc(2026, 5, 2, 8, 0)]
    listed = upcoming(daily("UTC", time(8, 0)), utc(2026, 5, 1, 8, 0, 1), 2)  # [now, now + 2 days)
    assert [u.notify_at for u in listed] == [utc(2026, 5, 2, 8, 0), utc(2026, 5, 3, 8, 0)]


def test_a_year_of_daily_briefs_matches_the_planner() -> None:
    pref = daily("America/New_York", time(2, 30))
    tz = load_timezone(pref.timezone)
    now = utc(2026, 1, 1)
    listed = upcoming(pref, now, 366)
    assert [(u.brief_date, u.notify_at) for u in listed] == occurrences_between(
        pref, tz, now, now + timedelta(days=366))
    assert [u.brief_date for u in listed if u.dst] == [date(2026, 3, 8)]  # 02:30 exists twice on no day


@pytest.mark.parametrize("days", [0, -1, 367, 1.5, True, "7", None])
def test_days_is_checked(days: object) -> None:
    with pytest.raises(ValueError, match="days must be an integer from 1 to 366"):
        upcoming(daily("UTC", time(8, 0)), utc(2026, 5, 1), days)  # type: ignore[arg-type]


def test_bad_input_is_refused_like_plan() -> None:
    with pytest.raises(InvalidTimezone):
        upcoming(daily("Mars/Olympus", time(8, 0)), utc(2026, 5, 1), 7)
    with pytest.raises(ValueError, match="aware"):
        upcoming(daily("UTC", time(8, 0)), datetime(2026, 5, 1), 7)
    with pytest.raises(ValueError, match="day_of_week"):
        upcoming(weekly("UTC", 8, time(8, 0)), utc(2026, 5, 1), 7)
    with pytest.raises(ValueError, match="9999"):
        upcoming(daily("UTC", time(8, 0)), utc(9999, 12, 30), 7)


def test_resolve_local_and_local_to_utc_agree() -> None:
    tz = load_timezone("America/New_York")
    for day, at in [(date(2026, 3, 8), time(2, 30)), (date(2026, 11, 1), time(1, 30)), (date(2026, 6, 1), time(9))]:
        assert resolve_local(day, at, tz)[0] == local_to_utc(day, at, tz)
    assert resolve_local(date(2026, 6, 1), time(9), tz) == (utc(2026, 6, 1, 13), None, None)
