"""scheduler.capacity: capacity-aware start times (pure, frozen time: ``now`` is an argument)."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.capacity import Capacity, Demand, Plan, plan_starts

NOW = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
SEVEN = datetime(2026, 12, 2, 7, 0, tzinfo=UTC)
MAX_LEAD = timedelta(hours=2)
MIN_LEAD = timedelta(minutes=5)
HUGE = Capacity(calls_per_minute=0, tokens_per_minute=0, concurrency=10**6, call_latency_s=1.0, margin=1.0)


def plan(demands: list[Demand], capacity: Capacity, now: datetime = NOW,
         max_lead: timedelta = MAX_LEAD, min_lead: timedelta = MIN_LEAD) -> Plan:
    return plan_starts(demands, capacity, now=now, max_lead=max_lead, min_lead=min_lead)


# --- examples ------------------------------------------------------------------------------------------------


def test_with_capacity_to_spare_every_brief_starts_min_lead_ahead() -> None:
    demands = [Demand(i, SEVEN + timedelta(minutes=i % 50), calls=5, tokens=4000) for i in range(1000)]
    result = plan(demands, HUGE)
    assert result.run_at == {d.key: d.notify_at - MIN_LEAD for d in demands}
    assert result.overloads == []
    assert all(result.finish[d.key] <= d.notify_at for d in demands)


def test_a_full_window_starts_early_enough_for_the_rate() -> None:
    # 3,000 briefs at 07:00, 5 calls each, 3,000 calls/min at a margin of 0.8: 15,000 / 2,400 = 6.25 min.
    capacity = Capacity(calls_per_minute=3000, tokens_per_minute=0, concurrency=10_000, call_latency_s=2.0)
    demands = [Demand(i, SEVEN, calls=5, tokens=1000) for i in range(3000)]
    result = plan(demands, capacity)
    assert result.overloads == []
    assert min(result.run_at.values()) == SEVEN - timedelta(minutes=6.25)
    assert max(result.run_at.values()) == SEVEN - MIN_LEAD  # the last ones keep the fixed buffer
    assert all(result.finish[d.key] <= SEVEN for d in demands)


def test_the_token_rate_and_the_concurrency_limit_too() -> None:
    demand = [Demand(1, SEVEN, calls=10, tokens=600_000)]
    by_tokens = Capacity(calls_per_minute=0, tokens_per_minute=60_000, concurrency=100, call_latency_s=1.0,
                         margin=1.0)
    assert plan(demand, by_tokens).run_at[1] == SEVEN - timedelta(minutes=10)
    by_flight = Capacity(calls_per_minute=0, tokens_per_minute=0, concurrency=1, call_latency_s=60.0, margin=1.0)
    assert plan(demand, by_flight).run_at[1] == SEVEN - timedelta(minutes=10)


def test_a_brief_takes_at_least_its_critical_path() -> None:
    capacity = dataclasses.replace(HUGE, call_latency_s=240.0, brief_concurrency=2)
    # 5 calls: 4 projects in 2 waves, then the summary: 3 latencies = 12 min.
    result = plan([Demand(1, SEVEN, calls=5, tokens=10)], capacity)
    assert result.run_at[1] == SEVEN - timedelta(minutes=12)
    assert result.finish[1] == SEVEN
    assert capacity.critical_seconds(1) == 240.0
    assert capacity.critical_seconds(0) == 0.0


def test_an_overload_is_reported_with_its_numbers() -> None:
    capacity = Capacity(calls_per_minute=3000, tokens_per_minute=0, concurrency=10_000, call_latency_s=2.0)
    demands = [Demand(i, SEVEN, calls=5, tokens=1000) for i in range(3000)]
    result = plan(demands, capacity, max_lead=timedelta(minutes=3), min_lead=timedelta(0))
    assert min(result.run_at.values()) == SEVEN - timedelta(minutes=3)  # max_lead: no earlier
    [overload] = result.overloads
    assert (overload.notify_at, overload.briefs, overload.calls, overload.tokens) == (SEVEN, 3000, 15_000, 3_000_000)
    assert overload.calls_per_minute == pytest.approx(2400)
    assert overload.needed == timedelta(minutes=6.25)
    assert overload.late_by == timedelta(minutes=3.25)
    assert overload.message == (
        "2026-12-02 07:00Z: 3,000 briefs need 15,000 calls (3,000,000 tokens); at 2,400 calls/min they need"
        " 6.2 min; starting 2026-12-02 06:57Z, the last expected 3.2 min late"
    )
    # In the zone of its users, and a small lateness in seconds (not "0.0 min").
    small = dataclasses.replace(overload, late_by=timedelta(seconds=0.9), needed=timedelta(seconds=40))
    assert small.describe(ZoneInfo("America/New_York"), "America/New_York") == (
        "2026-12-02 02:00 America/New_York: 3,000 briefs need 15,000 calls (3,000,000 tokens); at 2,400 calls/min"
        " they need 40 s; starting 01:57, the last expected 0.9 s late"
    )


def test_an_overload_later_does_not_push_an_earlier_window() -> None:
    capacity = Capacity(calls_per_minute=60, tokens_per_minute=0, concurrency=100, call_latency_s=1.0, margin=1.0)
    early = [Demand(f"a{i}", SEVEN, calls=1, tokens=1) for i in range(10)]
    late = [Demand(f"b{i}", SEVEN + timedelta(hours=1), calls=1, tokens=1) for i in range(600)]
    result = plan(early + late, capacity, max_lead=timedelta(minutes=5), min_lead=timedelta(0))
    assert [o.notify_at for o in result.overloads] == [SEVEN + timedelta(hours=1)]
    assert all(result.finish[d.key] <= SEVEN for d in early)


def test_a_passed_brief_starts_now_and_is_no_overload() -> None:
    result = plan([Demand(1, NOW - timedelta(minutes=1), calls=3, tokens=3)], HUGE)
    assert result.run_at[1] == NOW
    assert result.overloads == []


def test_an_already_planned_brief_never_moves_later() -> None:
    earlier = SEVEN - timedelta(minutes=30)
    result = plan([Demand(1, SEVEN, calls=1, tokens=1, already_planned_run_at=earlier)], HUGE)
    assert result.run_at[1] == earlier
    too_early = SEVEN - timedelta(hours=1)  # before notify_at - max_lead: the lead limit wins
    demand = Demand(1, SEVEN, calls=1, tokens=1, already_planned_run_at=too_early)
    assert plan([demand], HUGE, max_lead=timedelta(minutes=30)).run_at[1] == SEVEN - timedelta(minutes=30)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Demand(1, datetime(2026, 12, 2, 7), calls=1, tokens=1),  # naive
        lambda: Demand(1, SEVEN, calls=-1, tokens=1),
        lambda: Demand(1, SEVEN, calls=1, tokens=True),
        lambda: Demand(True, SEVEN, calls=1, tokens=1),
        lambda: Demand(1, SEVEN, calls=10**400, tokens=1),
        lambda: Demand(1, SEVEN, calls=1, tokens=10**400),
        lambda: Demand(1, datetime.max.replace(tzinfo=UTC), calls=1, tokens=1),
        lambda: Capacity(calls_per_minute=math.nan, tokens_per_minute=0, concurrency=1, call_latency_s=1),
        lambda: Capacity(calls_per_minute=1, tokens_per_minute=-1, concurrency=1, call_latency_s=1),
        lambda: Capacity(calls_per_minute=1, tokens_per_minute=0, concurrency=0, call_latency_s=1),
        lambda: Capacity(calls_per_minute=1, tokens_per_minute=0, concurrency=10**400, call_latency_s=1),
        lambda: Capacity(calls_per_minute=1, tokens_per_minute=0, concurrency=1, call_latency_s=1, margin=0),
    ],
)
def test_bad_values_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="same key"):
        plan([Demand(1, SEVEN, 1, 1), Demand(1, SEVEN, 1, 1)], HUGE)
    with pytest.raises(ValueError, match="min_lead"):
        plan([], HUGE, min_lead=timedelta(hours=3))
    with pytest.raises(ValueError, match="now"):
        plan([], HUGE, now=datetime(2026, 12, 2))
    assert plan([Demand(1, SEVEN, 1, 1), Demand("1", SEVEN, 1, 1)], HUGE).run_at.keys() == {1, "1"}


# --- properties ----------------------------------------------------------------------------------------------

capacities = st.builds(
    Capacity,
    calls_per_minute=st.sampled_from([0, 1, 10, 100, 1000, 10_000]),
    tokens_per_minute=st.sampled_from([0, 1000, 100_000, 10_000_000]),
    concurrency=st.integers(1, 200),
    call_latency_s=st.floats(0.0, 30.0),
    margin=st.floats(0.3, 1.0),
    brief_concurrency=st.integers(0, 8),
)


@st.composite
def demand_lists(draw: st.DrawFn, past: bool = True) -> list[Demand]:
    low = -600 if past else 1
    offsets = draw(st.lists(st.integers(low, 4 * 3600), max_size=60))
    return [
        Demand(i, NOW + timedelta(seconds=offset), calls=draw(st.integers(0, 20)), tokens=draw(st.integers(0, 50_000)))
        for i, offset in enumerate(offsets)
    ]


leads = st.tuples(st.integers(0, 900), st.integers(900, 3 * 3600)).map(
    lambda pair: (timedelta(seconds=pair[0]), timedelta(seconds=pair[1]))
)


@settings(max_examples=300, deadline=None)
@given(demand_lists(), capacities, leads)
def test_no_brief_starts_before_its_max_lead_or_now(demands: list[Demand], capacity: Capacity,
                                                    lead: tuple[timedelta, timedelta]) -> None:
    min_lead, max_lead = lead
    result = plan(demands, capacity, max_lead=max_lead, min_lead=min_lead)
    assert result.run_at.keys() == {d.key for d in demands}
    for d in demands:
        assert result.run_at[d.key] >= max(NOW, d.notify_at - max_lead)
        assert result.run_at[d.key] <= max(NOW, d.notify_at - min_lead)


def _enough(demands: list[Demand], capacity: Capacity, max_lead: timedelta) -> bool:
    """Whether every window of deadlines fits: the work due by each deadline after each floor fits in between."""
    ordered = sorted(demands, key=lambda d: d.notify_at)
    for d in ordered:
        if capacity.critical_seconds(d.calls) > min(max_lead, d.notify_at - NOW).total_seconds() * 0.99:
            return False
    for j, first in enumerate(ordered):
        floor = max(NOW, first.notify_at - max_lead)
        work = 0.0
        for last in ordered[j:]:
            work += capacity.work_seconds(last.calls, last.tokens)
            if work > (last.notify_at - floor).total_seconds() * 0.99:
                return False
    return True


@settings(max_examples=300, deadline=None)
@given(demand_lists(past=False), capacities, leads)
def test_with_enough_capacity_every_brief_finishes_in_time(demands: list[Demand], capacity: Capacity,
                                                          lead: tuple[timedelta, timedelta]) -> None:
    min_lead, max_lead = lead
    result = plan(demands, capacity, max_lead=max_lead, min_lead=min_lead)
    if _enough(demands, capacity, max_lead):
        assert result.overloads == []
        for d in demands:
            assert result.finish[d.key] <= d.notify_at
    late = {d.notify_at for d in demands if result.finish[d.key] > d.notify_at}
    assert late == {o.notify_at for o in result.overloads}  # every late brief is reported, and only those


@settings(max_examples=300, deadline=None)
@given(demand_lists(), capacities, leads, st.integers(0, 600))
def test_planning_again_never_moves_a_brief_later(demands: list[Demand], capacity: Capacity,
                                                  lead: tuple[timedelta, timedelta], later: int) -> None:
    min_lead, max_lead = lead
    first = plan(demands, capacity, max_lead=max_lead, min_lead=min_lead)
    now = NOW + timedelta(seconds=later)
    kept = [dataclasses.replace(d, already_planned_run_at=first.run_at[d.key]) for d in demands]
    second = plan(kept, capacity, now=now, max_lead=max_lead, min_lead=min_lead)
    for d in demands:
        assert second.run_at[d.key] <= max(first.run_at[d.key], now)  # a run_at already past starts now


@settings(max_examples=300, deadline=None)
@given(demand_lists(), capacities, leads, st.sampled_from(["rate", "tokens", "concurrency", "latency", "margin"]))
def test_more_capacity_never_starts_a_brief_earlier(demands: list[Demand], capacity: Capacity,
                                                    lead: tuple[timedelta, timedelta], more: str) -> None:
    min_lead, max_lead = lead
    bigger = {
        "rate": dataclasses.replace(capacity, calls_per_minute=capacity.calls_per_minute * 2),
        "tokens": dataclasses.replace(capacity, tokens_per_minute=capacity.tokens_per_minute * 2),
        "concurrency": dataclasses.replace(capacity, concurrency=capacity.concurrency + 1),
        "latency": dataclasses.replace(capacity, call_latency_s=capacity.call_latency_s / 2),
        "margin": dataclasses.replace(capacity, margin=min(1.0, capacity.margin * 1.5)),
    }[more]
    less = plan(demands, capacity, max_lead=max_lead, min_lead=min_lead)
    plenty = plan(demands, bigger, max_lead=max_lead, min_lead=min_lead)
    for d in demands:
        assert plenty.run_at[d.key] >= less.run_at[d.key]
