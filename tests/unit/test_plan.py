"""scheduler.plan: DST-safe occurrences, catch-up and timezone validation (pure, no database)."""

from __future__ import annotations

import dataclasses
import functools
import zoneinfo
from datetime import UTC, date, datetime, time, timedelta

import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st

from briefs.contract import InvalidTimezone, load_timezone, shown
from briefs.contract import brief_dedup_key as dedup_key
from scheduler.plan import Occurrence, Preference, local_to_utc, next_occurrence, occurrences_between, plan

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
LOOKAHEAD = HOUR
CATCH_UP = timedelta(hours=6)
TICK = timedelta(minutes=5)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def daily(tz: str, at: time, user_id: int = 1) -> Preference:
    return Preference(user_id=user_id, timezone=tz, frequency="daily", day_of_week=None, time_of_day=at)


def weekly(tz: str, day_of_week: int, at: time, user_id: int = 1) -> Preference:
    return Preference(user_id=user_id, timezone=tz, frequency="weekly", day_of_week=day_of_week, time_of_day=at)


def tick(pref: Preference, now: datetime, buffer: timedelta = timedelta(0)) -> list[Occurrence]:
    return plan(pref, now, lookahead=LOOKAHEAD, catch_up=CATCH_UP, generation_buffer=buffer)


def on_time(brief_date: date, notify_at: datetime, run_at: datetime | None = None) -> Occurrence:
    return Occurrence(brief_date, notify_at, run_at or notify_at, catch_up=False)


# --- DST in America/New_York -----------------------------------------------------------------------------


def test_spring_forward_gap_moves_forward_by_the_gap() -> None:
    ny = load_timezone("America/New_York")
    instant = local_to_utc(date(2026, 3, 8), time(2, 30), ny)
    assert instant == utc(2026, 3, 8, 7, 30)
    assert instant.astimezone(ny).replace(tzinfo=None) == datetime(2026, 3, 8, 3, 30)  # 03:30 EDT
    assert local_to_utc(date(2026, 3, 8), time(8), ny) == utc(2026, 3, 8, 12)  # EDT, -4
    assert local_to_utc(date(2026, 3, 7), time(8), ny) == utc(2026, 3, 7, 13)  # EST, -5


def test_spring_forward_plan_with_a_frozen_clock() -> None:
    with freeze_time("2026-03-08 07:00:00"):
        now = datetime.now(UTC)
        assert tick(daily("America/New_York", time(2, 30)), now) == [on_time(date(2026, 3, 8), utc(2026, 3, 8, 7, 30))]
    with freeze_time("2026-03-08 11:30:00"):
        now = datetime.now(UTC)
        assert tick(daily("America/New_York", time(8)), now) == [on_time(date(2026, 3, 8), utc(2026, 3, 8, 12))]


def test_fall_back_takes_the_first_occurrence_only() -> None:
    ny = load_timezone("America/New_York")
    assert local_to_utc(date(2026, 11, 1), time(1, 30), ny) == utc(2026, 11, 1, 5, 30)  # 01:30 EDT
    pref = daily("America/New_York", time(1, 30))
    assert occurrences_between(pref, ny, utc(2026, 10, 31), utc(2026, 11, 2)) == [
        (date(2026, 10, 31), utc(2026, 10, 31, 5, 30)),
        (date(2026, 11, 1), utc(2026, 11, 1, 5, 30)),
    ]
    # At 01:30 EST (06:30 UTC) the second reading of the wall time is not an occurrence.
    at_second_reading = tick(pref, utc(2026, 11, 1, 6, 30))
    assert at_second_reading == [Occurrence(date(2026, 11, 1), utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 6, 30), True)]


def test_fall_back_night_enqueues_the_brief_once() -> None:
    pref = daily("America/New_York", time(1, 30))
    enqueued: dict[date, list[Occurrence]] = {}
    proposed: list[Occurrence] = []
    now = utc(2026, 10, 31, 22)  # 18:00 EDT the evening before, through 06:00 EST
    while now <= utc(2026, 11, 1, 11):
        for occ in tick(pref, now):
            proposed.append(occ)
            if occ.brief_date not in enqueued:  # what the caller's dedup query does
                enqueued.setdefault(occ.brief_date, []).append(occ)
        now += TICK
    assert enqueued == {date(2026, 11, 1): [on_time(date(2026, 11, 1), utc(2026, 11, 1, 5, 30))]}
    # Ticks after 05:30 UTC propose it again only as a catch-up (which the dedup query drops); none
    # proposes the second reading at 06:30 UTC (01:30 EST).
    assert {occ.notify_at for occ in proposed if not occ.catch_up} == {utc(2026, 11, 1, 5, 30)}
    assert {occ.brief_date for occ in proposed} == {date(2026, 11, 1)}


# --- offsets that are not whole hours, and local dates that are not UTC dates -------------------------------


@pytest.mark.parametrize(
    ("zone", "notify_at"),
    [("Asia/Kolkata", utc(2026, 6, 15, 2, 30)), ("Asia/Kathmandu", utc(2026, 6, 15, 2, 15))],
)
def test_fractional_hour_offsets(zone: str, notify_at: datetime) -> None:
    pref = daily(zone, time(8))
    assert local_to_utc(date(2026, 6, 15), time(8), load_timezone(zone)) == notify_at
    assert tick(pref, notify_at - 30 * MINUTE) == [on_time(date(2026, 6, 15), notify_at)]
    assert tick(pref, notify_at - 61 * MINUTE) == []


def test_kiritimati_brief_date_is_a_day_ahead_of_utc() -> None:
    # 08:00 on 16 June at +14 is 18:00 UTC on 15 June.
    result = tick(daily("Pacific/Kiritimati", time(8)), utc(2026, 6, 15, 17, 30))
    assert result == [on_time(date(2026, 6, 16), utc(2026, 6, 15, 18))]


def test_pago_pago_brief_date_is_a_day_behind_utc() -> None:
    # 20:00 on 15 June at -11 is 07:00 UTC on 16 June.
    result = tick(daily("Pacific/Pago_Pago", time(20)), utc(2026, 6, 16, 6, 30))
    assert result == [on_time(date(2026, 6, 15), utc(2026, 6, 16, 7))]


def test_weekly_uses_the_local_weekday() -> None:
    pref = weekly("Pacific/Auckland", 1, time(8))  # Monday 08:00 NZST (+12) is Sunday 20:00 UTC
    assert date(2026, 6, 15).isoweekday() == 1
    assert tick(pref, utc(2026, 6, 14, 19, 30)) == [on_time(date(2026, 6, 15), utc(2026, 6, 14, 20))]
    assert tick(pref, utc(2026, 6, 15, 19, 30)) == []  # Monday 20:00 UTC is Tuesday in Auckland
    auckland = load_timezone("Pacific/Auckland")
    # Monday 1 June 08:00 NZST is 31 May 20:00 UTC, before the window; Monday 29 June is inside it.
    assert occurrences_between(pref, auckland, utc(2026, 6, 1), utc(2026, 6, 29)) == [
        (date(2026, 6, 8), utc(2026, 6, 7, 20)),
        (date(2026, 6, 15), utc(2026, 6, 14, 20)),
        (date(2026, 6, 22), utc(2026, 6, 21, 20)),
        (date(2026, 6, 29), utc(2026, 6, 28, 20)),
    ]


def test_gap_across_midnight_keeps_the_brief_on_its_own_date() -> None:
    # America/Nuuk springs from 23:00 (-02) on Saturday straight to 00:00 (-01) on Sunday.
    nuuk = load_timezone("America/Nuuk")
    pref = daily("America/Nuuk", time(23, 30))
    assert occurrences_between(pref, nuuk, utc(2026, 3, 28, 12), utc(2026, 3, 30, 12)) == [
        (date(2026, 3, 28), utc(2026, 3, 29, 1, 30)),  # delivered 00:30 Sunday, still Saturday's brief
        (date(2026, 3, 29), utc(2026, 3, 30, 0, 30)),  # Sunday's brief is not lost
    ]


@pytest.mark.parametrize(
    ("zone", "day", "at", "expected"),
    [
        ("Europe/London", date(2026, 10, 25), time(1, 30), utc(2026, 10, 25, 0, 30)),  # BST, first reading
        ("Europe/Berlin", date(2026, 3, 29), time(2, 30), utc(2026, 3, 29, 1, 30)),  # gap -> 03:30 CEST
        ("Australia/Lord_Howe", date(2026, 10, 4), time(2, 15), utc(2026, 10, 3, 15, 45)),  # 30-minute gap
        ("Antarctica/Troll", date(2026, 3, 29), time(1, 30), utc(2026, 3, 29, 1, 30)),  # 2-hour gap
        ("Europe/Dublin", date(2026, 10, 25), time(1, 30), utc(2026, 10, 25, 0, 30)),  # "negative DST"
    ],
)
def test_other_transitions(zone: str, day: date, at: time, expected: datetime) -> None:
    assert local_to_utc(day, at, load_timezone(zone)) == expected


# --- catch-up, buffer, timezone changes ---------------------------------------------------------------


def test_catch_up_after_downtime() -> None:
    pref = daily("Europe/Berlin", time(8))  # 06:00 UTC in summer
    with freeze_time("2026-06-15 07:40:00"):  # down at 06:00, back 100 minutes later
        now = datetime.now(UTC)
        assert tick(pref, now) == [Occurrence(date(2026, 6, 15), now, now, catch_up=True)]
    assert tick(pref, utc(2026, 6, 15, 12)) == []  # exactly catch_up ago: strict
    now = utc(2026, 6, 15, 11, 59)
    assert tick(pref, now) == [Occurrence(date(2026, 6, 15), now, now, catch_up=True)]


def test_catch_up_uses_the_local_date() -> None:
    # 23:30 on 15 June in New York is 03:30 UTC on 16 June; back at 05:00 UTC it is still the 15th's brief.
    now = utc(2026, 6, 16, 5)
    assert tick(daily("America/New_York", time(23, 30)), now) == [Occurrence(date(2026, 6, 15), now, now, True)]


def test_catch_up_and_upcoming_in_one_tick_are_ordered_by_brief_date() -> None:
    now = utc(2026, 6, 15, 12)
    result = plan(
        daily("UTC", time(8)), now, lookahead=timedelta(days=1), catch_up=CATCH_UP, generation_buffer=timedelta(0)
    )
    assert result == [
        Occurrence(date(2026, 6, 15), now, now, True),
        on_time(date(2026, 6, 16), utc(2026, 6, 16, 8)),
    ]


def test_timezone_change_between_ticks() -> None:
    berlin = daily("Europe/Berlin", time(8))
    assert tick(berlin, utc(2026, 6, 15, 5, 30)) == [on_time(date(2026, 6, 15), utc(2026, 6, 15, 6))]
    london = dataclasses.replace(berlin, timezone="Europe/London")
    assert tick(london, utc(2026, 6, 15, 5, 30)) == []
    assert tick(london, utc(2026, 6, 15, 6, 30)) == [on_time(date(2026, 6, 15), utc(2026, 6, 15, 7))]
    new_york = dataclasses.replace(berlin, timezone="America/New_York")
    assert tick(new_york, utc(2026, 6, 15, 11, 30)) == [on_time(date(2026, 6, 15), utc(2026, 6, 15, 12))]


def test_generation_buffer_never_before_now() -> None:
    pref = daily("UTC", time(8))
    buffer = timedelta(minutes=20)
    notify_at = utc(2026, 6, 15, 8)
    assert tick(pref, utc(2026, 6, 15, 7, 30), buffer) == [
        on_time(date(2026, 6, 15), notify_at, run_at=utc(2026, 6, 15, 7, 40))
    ]
    assert tick(pref, utc(2026, 6, 15, 7, 50), buffer) == [
        on_time(date(2026, 6, 15), notify_at, run_at=utc(2026, 6, 15, 7, 50))
    ]
    assert tick(pref, notify_at, buffer) == [on_time(date(2026, 6, 15), notify_at)]  # due now: not a catch-up


def test_now_is_normalised_to_utc_and_must_be_aware() -> None:
    pref = daily("Europe/Berlin", time(8))
    berlin_now = datetime(2026, 6, 15, 7, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin"))
    (occ,) = tick(pref, berlin_now, timedelta(hours=1))
    assert occ.run_at == utc(2026, 6, 15, 5, 30) and occ.run_at.tzinfo is UTC
    assert occ.notify_at.tzinfo is UTC
    with pytest.raises(ValueError, match="aware"):
        tick(pref, datetime(2026, 6, 15, 5, 30))


def test_bad_frequency_is_rejected() -> None:
    with pytest.raises(ValueError, match="day_of_week"):
        tick(weekly("UTC", None, time(8)), utc(2026, 6, 15))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frequency"):
        tick(dataclasses.replace(daily("UTC", time(8)), frequency="hourly"), utc(2026, 6, 15))


def test_dedup_key() -> None:
    assert dedup_key(42, date(2026, 3, 8)) == "brief:42:2026-03-08"


# --- timezone validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "  ",
        "Not/AZone",
        "america/new_york",
        "../etc/passwd",
        "/usr/share/zoneinfo/UTC",
        "Factory",
        "localtime",
        " UTC",
        "Europe/../UTC",
        "Europe\\Berlin",
    ],
)
def test_invalid_timezones(name: str) -> None:
    with pytest.raises(InvalidTimezone) as info:
        load_timezone(name)
    assert repr(name) in str(info.value)
    with pytest.raises(InvalidTimezone):
        tick(daily(name, time(8)), utc(2026, 6, 15))


@pytest.mark.parametrize("name", ["UTC", "Etc/UTC", "Etc/GMT+5", "Europe/Berlin", "America/Argentina/Salta"])
def test_valid_timezones(name: str) -> None:
    tz = load_timezone(name)
    assert tz.key == name
    assert load_timezone(name) is tz  # cached


def test_invalid_timezone_is_a_value_error() -> None:
    assert issubclass(InvalidTimezone, ValueError)


@pytest.mark.parametrize(
    "name", ["Europe/" + "x" * 60_000, "UTC" + "\n" * 100, "\u202e" * 70, "America/" + "A" * 57, "UTC\x00" + "x" * 99]
)
def test_a_long_timezone_is_refused_with_a_short_one_line_message(name: str) -> None:
    with pytest.raises(InvalidTimezone) as info:
        load_timezone(name)
    message = str(info.value)
    assert "too long" in message and f"({len(name):,} characters)" in message
    assert len(message) < 300 and message.isprintable()


def test_a_timezone_of_escapes_stays_short_in_the_message() -> None:
    name = "\u202e" * 60  # short enough to be looked up, but its repr is six times longer
    with pytest.raises(InvalidTimezone) as info:
        load_timezone(name)
    assert len(str(info.value)) < 200 and "(60 characters)" in str(info.value)


@pytest.mark.parametrize("name", ["UTC\x00", "UTC\n", "Europe/Paris\u202e", "\x1b[31mUTC"])
def test_control_characters_in_a_timezone_are_refused_and_escaped(name: str) -> None:
    with pytest.raises(InvalidTimezone) as info:
        load_timezone(name)
    assert repr(name) in str(info.value) and str(info.value).isprintable()


def test_a_timezone_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidTimezone, match="not a string"):
        load_timezone(None)  # type: ignore[arg-type]


def test_shown_clips_and_escapes() -> None:
    assert shown("UTC") == "'UTC'"
    assert shown("a\nb") == "'a\\nb'"
    assert shown("x" * 101) == "'" + "x" * 100 + "'… (101 characters)"
    assert shown("y" * 60_000, 10) == "'yyyyyyyyyy'… (60,000 characters)"
    assert shown("\u202e" * 30, 20) == "'\\u202e\\u202e\\u202e\\u'… (30 characters)"  # escapes count too
    assert shown("Europe/Paris", 40, length=60_000) == "'Europe/Paris'… (60,000 characters)"


# --- the next occurrence (the dry run's "not due" account) --------------------------------------------------


def test_next_occurrence_daily_and_weekly() -> None:
    now = utc(2026, 3, 10, 7, 30)  # a Tuesday
    assert next_occurrence(daily("UTC", time(8)), now) == (date(2026, 3, 10), utc(2026, 3, 10, 8))
    assert next_occurrence(daily("UTC", time(7, 30)), now) == (date(2026, 3, 10), now)  # at now: still next
    assert next_occurrence(daily("UTC", time(7)), now) == (date(2026, 3, 11), utc(2026, 3, 11, 7))
    # Weekly on Tuesday, already passed today: a week ahead.
    assert next_occurrence(weekly("UTC", 2, time(7)), now) == (date(2026, 3, 17), utc(2026, 3, 17, 7))
    # Sunday 09:00 in Tokyo is Sunday 00:00 UTC.
    assert next_occurrence(weekly("Asia/Tokyo", 7, time(9)), now) == (date(2026, 3, 15), utc(2026, 3, 15))


def test_next_occurrence_across_a_spring_forward_gap() -> None:
    # 02:30 on 2026-03-08 does not exist in New York: 03:30 EDT.
    assert next_occurrence(daily("America/New_York", time(2, 30)), utc(2026, 3, 8, 6)) == (
        date(2026, 3, 8),
        utc(2026, 3, 8, 7, 30),
    )


def test_next_occurrence_refuses_what_plan_refuses() -> None:
    with pytest.raises(InvalidTimezone):
        next_occurrence(daily("Factory", time(8)), utc(2026, 3, 10))
    with pytest.raises(ValueError, match="aware"):
        next_occurrence(daily("UTC", time(8)), datetime(2026, 3, 10))
    with pytest.raises(ValueError, match="frequency"):
        next_occurrence(dataclasses.replace(daily("UTC", time(8)), frequency="hourly"), utc(2026, 3, 10))


def test_next_occurrence_at_the_end_of_the_calendar_is_none() -> None:
    assert next_occurrence(daily("Pacific/Pago_Pago", time(23)), datetime(9999, 12, 31, 1, tzinfo=UTC)) is None


# --- properties -----------------------------------------------------------------------------------------

ZONES = sorted(zoneinfo.available_timezones() - {"Factory", "localtime", "posixrules"})
# Zones with interesting transitions in 2020-2035: gaps across midnight, 30-minute and 2-hour DST,
# negative DST, Ramadan DST, southern hemisphere, DST abolished mid-range.
DST_ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Dublin",
    "Australia/Lord_Howe",
    "America/Nuuk",
    "America/Santiago",
    "Asia/Beirut",
    "Africa/Cairo",
    "Pacific/Chatham",
    "Antarctica/Troll",
    "America/Havana",
    "Asia/Tehran",
    "Pacific/Auckland",
    "Africa/Casablanca",
    "America/Scoresbysund",
    "Asia/Gaza",
    "Australia/Sydney",
    "America/Asuncion",
]


@functools.cache
def transitions(name: str) -> tuple[datetime, ...]:
    """UTC instants in 2020-2035 where the zone's offset changes (daily scan, then bisection)."""
    tz = zoneinfo.ZoneInfo(name)
    found = []
    t = utc(2020, 1, 1)
    while t < utc(2036, 1, 1):
        nxt = t + timedelta(days=1)
        if t.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            lo, hi = t, nxt
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                lo, hi = (mid, hi) if mid.astimezone(tz).utcoffset() == t.astimezone(tz).utcoffset() else (lo, mid)
            found.append(hi)
        t = nxt
    return tuple(found)


@st.composite
def random_scenarios(draw: st.DrawFn) -> tuple[Preference, datetime]:
    zone = draw(st.sampled_from(ZONES))
    at = draw(st.times())
    day_of_week = draw(st.none() | st.integers(1, 7))
    start = draw(st.datetimes(datetime(2020, 1, 1), datetime(2035, 12, 28), timezones=st.just(UTC)))
    return _pref(zone, at, day_of_week), start


@st.composite
def transition_scenarios(draw: st.DrawFn) -> tuple[Preference, datetime]:
    zone = draw(st.sampled_from(DST_ZONES))
    change = draw(st.sampled_from(transitions(zone)))
    tz = zoneinfo.ZoneInfo(zone)
    wall_before = (change - timedelta(seconds=1)).astimezone(tz).replace(tzinfo=None)
    wall = wall_before + timedelta(minutes=draw(st.integers(-120, 120)))
    weekly_on = draw(st.sampled_from([None, wall.isoweekday(), (wall + timedelta(days=1)).isoweekday()]))
    start = change - timedelta(minutes=draw(st.integers(0, 2 * 24 * 60)))
    return _pref(zone, wall.time(), weekly_on), start


def _pref(zone: str, at: time, day_of_week: int | None) -> Preference:
    return Preference(1, zone, "daily" if day_of_week is None else "weekly", day_of_week, at)


def check_brief_date(occ: Occurrence, pref: Preference, tz: zoneinfo.ZoneInfo) -> None:
    assert local_to_utc(occ.brief_date, pref.time_of_day, tz) == occ.notify_at
    local = occ.notify_at.astimezone(tz)
    if occ.brief_date != local.date():
        # Only when the wall time fell into a gap that straddles midnight (America/Nuuk).
        wall = datetime.combine(occ.brief_date, pref.time_of_day)
        assert local.replace(tzinfo=None) > wall and local.date() == occ.brief_date + timedelta(days=1)


@settings(max_examples=150, deadline=None, database=None)
@given(scenario=random_scenarios() | transition_scenarios())
def test_ticks_every_five_minutes_enqueue_each_occurrence_exactly_once(
    scenario: tuple[Preference, datetime],
) -> None:
    pref, first = scenario
    tz = load_timezone(pref.timezone)
    buffer = timedelta(minutes=10)
    enqueued: dict[date, Occurrence] = {}
    now = first
    last = first + timedelta(days=3)
    while now <= last:
        result = tick(pref, now, buffer)
        dates = [occ.brief_date for occ in result]
        assert dates == sorted(set(dates))  # ordered, never two with the same brief_date
        for occ in result:
            if occ.catch_up:
                assert occ.notify_at == occ.run_at == now
                # With a tick every 5 minutes nothing is missed after the first tick.
                assert now == first or occ.brief_date in enqueued
            else:
                assert now <= occ.notify_at < now + LOOKAHEAD
                assert occ.run_at == max(now, occ.notify_at - buffer)
                check_brief_date(occ, pref, tz)
            if occ.brief_date in enqueued:
                # A later tick may propose the date again (the dedup query filters it), but never at
                # a different instant: no second occurrence of an ambiguous wall time.
                earlier = enqueued[occ.brief_date]
                assert occ.catch_up or earlier.notify_at == occ.notify_at
            else:
                enqueued[occ.brief_date] = occ
        now += TICK
    expected = occurrences_between(pref, tz, first, last + LOOKAHEAD)
    for brief_date, instant in expected:
        assert enqueued[brief_date] == Occurrence(brief_date, instant, enqueued[brief_date].run_at, False)
    caught_up = {d for d, i in occurrences_between(pref, tz, first - CATCH_UP, first) if i > first - CATCH_UP}
    assert set(enqueued) == {d for d, _ in expected} | caught_up
    instants = [occ.notify_at for occ in enqueued.values()]
    assert len(set(instants)) == len(instants)


@st.composite
def wall_times(draw: st.DrawFn) -> tuple[str, date, time]:
    if draw(st.booleans()):
        zone = draw(st.sampled_from(ZONES))
        day = draw(st.dates(date(2020, 1, 1), date(2035, 12, 31)))
        return zone, day, draw(st.times())
    zone = draw(st.sampled_from(DST_ZONES))
    change = draw(st.sampled_from(transitions(zone)))
    wall = (change - timedelta(seconds=1)).astimezone(zoneinfo.ZoneInfo(zone)).replace(tzinfo=None)
    wall += timedelta(seconds=draw(st.integers(-3 * 3600, 3 * 3600)))
    return zone, wall.date(), wall.time()


@settings(max_examples=300, deadline=None, database=None)
@given(case=wall_times())
def test_local_to_utc_is_the_first_reading_or_moves_forward_by_the_gap(case: tuple[str, date, time]) -> None:
    zone, day, at = case
    tz = load_timezone(zone)
    wall = datetime.combine(day, at)
    instant = local_to_utc(day, at, tz)
    assert instant.tzinfo is UTC
    # Every instant whose local reading is this wall time, found independently of fold.
    offsets = {(wall.replace(tzinfo=UTC) + h * HOUR).astimezone(tz).utcoffset() for h in range(-16, 17)}
    readings = sorted(
        candidate
        for offset in offsets
        if (candidate := wall.replace(tzinfo=UTC) - offset).astimezone(tz).replace(tzinfo=None) == wall
    )
    if readings:
        assert instant == readings[0]
    else:
        gap = instant.astimezone(tz).replace(tzinfo=None) - wall
        assert timedelta(0) < gap <= 3 * HOUR
        # It fell into a jump of exactly `gap`: the offset just before was `gap` smaller.
        assert instant.astimezone(tz).utcoffset() - (instant - gap).astimezone(tz).utcoffset() == gap
