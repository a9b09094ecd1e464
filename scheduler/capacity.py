"""When to start each brief so that the LLM capacity gets every one done before its ``notify_at`` (pure).

:func:`plan_starts` takes the briefs due in the planning horizon (:class:`Demand`: when the user is notified,
how many LLM calls and tokens the brief will take) and what the LLM can deliver (:class:`Capacity`), and
returns a ``run_at`` per brief, the planned finish of each, and an :class:`Overload` per ``notify_at`` whose
briefs cannot all be done in time. No database, no clock: ``now`` comes in.

The model
    The LLM is one pipe shared by every worker. A brief takes ``work`` seconds of it: the longest of its calls
    at the request rate, its tokens at the token rate and its calls at the concurrency over the latency (the
    per-brief form of "the effective rate is the lowest of the three"), divided by the safety ``margin``.
    However free the pipe, a brief also takes its own critical path: its project calls in waves of
    ``brief_concurrency`` (all at once when 0), then the summary, each wave one latency (also over ``margin``).

Reverse scheduling (latest deadline first)
    The briefs coming (``notify_at > now``) are placed from the latest deadline back: each one's slot of the
    pipe ends at its ``notify_at`` or where the next-later brief's slot starts, whichever is earlier, and
    starts ``work`` before that. Its ``run_at`` is the earliest of the slot's start, ``notify_at`` minus its
    critical path and ``notify_at - min_lead`` (so with capacity to spare every brief starts ``min_lead``
    ahead, the fixed buffer), never later than an ``already_planned_run_at`` (a plan only moves earlier from
    tick to tick), and never before ``now`` nor ``notify_at - max_lead``. A slot that would start before that
    floor is cut there: the demand before it is more than the capacity, and the briefs of that window will be
    late; earlier windows are planned as if it were not there (the queue claims deadline first, so the late
    work waits, not theirs). Briefs already past their ``notify_at`` (catch-ups) start ``now``; their work is
    not reserved ahead of the others' slots (nor is work queued before this plan), but the forward run below
    counts it first, so any lateness it causes is reported. Instants are kept to the microsecond, rounded down.

The planned finish
    The briefs are then run forward in deadline order through the pipe (past ones first), each from its
    ``run_at``: its finish is when its work is through, and not before ``run_at`` plus its critical path.
    Whenever no slot was cut, every brief's finish is at or before its ``notify_at`` (each one's work ends
    by its slot's end). Every ``notify_at`` with a brief finishing after it gets an :class:`Overload`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo

Key = str | int

# Instants are kept this far inside Python's datetime range, so every sum the planner makes stays in it.
_EDGE = timedelta(days=800)
MAX_LEAD_LIMIT = timedelta(days=366)
MAX_COUNT = 10**9  # calls of a brief, requests in flight (also keeps every product a float can hold)
MAX_TOKENS = 10**15
_LATEST_LATE = 366 * 86400.0  # a planned finish is shown at most this many seconds after its notify_at


_LOWEST = datetime.min.replace(tzinfo=UTC) + _EDGE
_HIGHEST = datetime.max.replace(tzinfo=UTC) - _EDGE


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got {value!r}")
    if not _LOWEST <= value <= _HIGHEST:
        raise ValueError(f"{what} is too close to the ends of the calendar: {value.isoformat()}")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _count(value: object, what: str, high: int = MAX_COUNT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{what} must be an integer from 0 to {high:,}, got {value!r}")


def _number(value: object, what: str, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{what} must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True, slots=True)
class Demand:
    """One brief due in the horizon: what it will cost and when it must be ready."""

    key: Key  # the user id (or any unique key: a dedup key)
    notify_at: datetime  # aware; kept in UTC
    calls: int  # LLM calls: one per active project that gets an LLM section, plus the summary
    tokens: int  # LLM tokens of those calls, prompt and answer
    already_planned_run_at: datetime | None = None  # the run_at an earlier tick gave it, if any

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, str | int):
            raise ValueError(f"key must be a string or an integer, got {self.key!r}")
        object.__setattr__(self, "notify_at", _aware(self.notify_at, "notify_at"))
        _count(self.calls, "calls")
        _count(self.tokens, "tokens", MAX_TOKENS)
        if self.already_planned_run_at is not None:
            object.__setattr__(self, "already_planned_run_at", _aware(self.already_planned_run_at, "run_at"))


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the LLM can deliver, for all worker processes together."""

    calls_per_minute: float  # requests started per minute; 0 = unlimited
    tokens_per_minute: float  # tokens per minute; 0 = unlimited
    concurrency: int  # requests in flight at once (per process times processes)
    call_latency_s: float  # seconds one call takes
    margin: float = 0.8  # the share of the capacity planned on (jitter, retries)
    brief_concurrency: int = 0  # one brief's calls in flight at once; 0 = all its project calls at once

    def __post_init__(self) -> None:
        _number(self.calls_per_minute, "calls_per_minute", 0.0)
        _number(self.tokens_per_minute, "tokens_per_minute", 0.0)
        _count(self.concurrency, "concurrency")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        _number(self.call_latency_s, "call_latency_s", 0.0, 86400.0)
        _number(self.margin, "margin", 1e-3, 1.0)
        _count(self.brief_concurrency, "brief_concurrency")

    def work_seconds(self, calls: int, tokens: int) -> float:
        """Seconds of the whole pipe that ``calls`` calls of ``tokens`` tokens take, margin included."""
        by_calls = 60.0 * calls / self.calls_per_minute if self.calls_per_minute else 0.0
        by_tokens = 60.0 * tokens / self.tokens_per_minute if self.tokens_per_minute else 0.0
        by_flight = calls * self.call_latency_s / self.concurrency
        return max(by_calls, by_tokens, by_flight) / self.margin

    def critical_seconds(self, calls: int) -> float:
        """The shortest a brief of ``calls`` calls can take: its project calls in waves, then the summary."""
        if calls <= 0:
            return 0.0
        projects = calls - 1
        waves = math.ceil(projects / self.brief_concurrency) if self.brief_concurrency else min(projects, 1)
        return (waves + 1) * self.call_latency_s / self.margin

    def calls_per_minute_planned(self, calls: int, tokens: int) -> float:
        """The effective rate of a set of briefs (calls per minute, margin included); inf when unlimited."""
        work = self.work_seconds(calls, tokens)
        return 60.0 * calls / work if work > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Overload:
    """A ``notify_at`` whose briefs the capacity cannot all finish in time."""

    notify_at: datetime
    briefs: int  # briefs notified at that instant
    calls: int
    tokens: int
    calls_per_minute: float  # the effective rate they are planned at
    needed: timedelta  # the pipe's time their calls take
    start: datetime  # the earliest run_at among them
    late_by: timedelta  # how late the last of them is expected to finish

    @property
    def message(self) -> str:
        return self.describe()

    def describe(self, zone: tzinfo | None = None, label: str = "") -> str:
        """The warning an operator reads, its times in ``zone`` (named ``label``; UTC by default)."""
        rate = "unlimited" if math.isinf(self.calls_per_minute) else f"{self.calls_per_minute:,.0f}"
        return (
            f"{_hhmm(self.notify_at, zone, label)}: {self.briefs:,} briefs need {self.calls:,} calls "
            f"({self.tokens:,} tokens); at {rate} calls/min they need {_minutes(self.needed)}; "
            f"starting {_hhmm(self.start, zone)}, the last expected {_minutes(self.late_by)} late"
        )


@dataclass(frozen=True, slots=True)
class Plan:
    run_at: dict[Key, datetime] = field(default_factory=dict)
    finish: dict[Key, datetime] = field(default_factory=dict)  # the planned finish of each brief
    overloads: list[Overload] = field(default_factory=list)  # by notify_at


def _hhmm(instant: datetime, zone: tzinfo | None = None, label: str = "") -> str:
    """``2026-12-01 07:00 America/New_York`` (with a label), ``07:00`` (a zone alone) or ``2026-12-01 07:00Z``."""
    if zone is None:
        return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")
    local = instant.astimezone(zone)
    return f"{local:%Y-%m-%d %H:%M} {label}" if label else f"{local:%H:%M}"


def _minutes(span: timedelta) -> str:
    """A span as an operator reads it: ``12 min``, ``6.2 min``, or seconds under a minute (``40 s``)."""
    seconds = span.total_seconds()
    if seconds < 59.5:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    minutes = seconds / 60.0
    return f"{minutes:,.0f} min" if minutes >= 10 else f"{minutes:.1f} min"


def _after(now: datetime, seconds: float) -> datetime:
    """``now`` plus ``seconds``, rounded down to the microsecond (a start is never later than planned)."""
    return now + timedelta(microseconds=math.floor(seconds * 1e6))


def _seconds(span: timedelta) -> float:
    return span.total_seconds()


def _check(now: datetime, max_lead: timedelta, min_lead: timedelta) -> datetime:
    now = _aware(now, "now")
    if not timedelta(0) <= min_lead <= max_lead <= MAX_LEAD_LIMIT:
        raise ValueError(f"need 0 <= min_lead <= max_lead <= {MAX_LEAD_LIMIT.days} days, got {min_lead}, {max_lead}")
    return now


def _keys_unique(demands: Sequence[Demand]) -> None:
    seen: set[tuple[str, Key]] = set()
    for demand in demands:
        marker = (type(demand.key).__name__, demand.key)
        if marker in seen:
            raise ValueError(f"two demands have the same key: {demand.key!r}")
        seen.add(marker)


def _deadline_order(demands: Iterable[Demand]) -> list[Demand]:
    """Deadline first; ties in a fixed order of the keys (the order the queue's claim is told to follow)."""
    return sorted(demands, key=lambda d: (d.notify_at, type(d.key).__name__, str(d.key)))


class _Costs:
    """What the loops below compute per brief, memoised per distinct value: a brief's work and critical path
    by its (calls, tokens), and the instants of its ``notify_at`` (briefs share a few of each: a handful of
    project counts, the top of the hour in a few zones), so planning tens of thousands of briefs costs
    little more than the loops themselves."""

    def __init__(self, capacity: Capacity, now: datetime, leads: tuple[timedelta, timedelta]) -> None:
        self.capacity = capacity
        self.now = now
        self.leads = leads
        self.known: dict[tuple[int, int], tuple[float, float]] = {}
        self.instants: dict[datetime, tuple[float, datetime, float, datetime]] = {}
        self.offsets: dict[datetime, float] = {}

    def around(self, notify_at: datetime) -> tuple[float, datetime, float, datetime]:
        """(seconds until it, the earliest start and its seconds after now, the latest start: min_lead ahead)."""
        found = self.instants.get(notify_at)
        if found is None:
            max_lead, min_lead = self.leads
            floor_at = max(self.now, notify_at - max_lead)
            found = (_seconds(notify_at - self.now), floor_at, _seconds(floor_at - self.now), notify_at - min_lead)
            self.instants[notify_at] = found
        return found

    def after_now(self, instant: datetime) -> float:
        """Seconds from now to ``instant``."""
        found = self.offsets.get(instant)
        if found is None:
            found = self.offsets[instant] = _seconds(instant - self.now)
        return found

    def of(self, demand: Demand) -> tuple[float, float]:
        pair = (demand.calls, demand.tokens)
        found = self.known.get(pair)
        if found is None:
            found = self.known[pair] = (self.capacity.work_seconds(*pair), self.capacity.critical_seconds(pair[0]))
        return found


def _start(demand: Demand, costs: _Costs, frontier: float) -> tuple[datetime, float]:
    """One coming brief's run_at, and the frontier (seconds after ``now``) for the next-earlier one."""
    until, floor_at, floor, last_start = costs.around(demand.notify_at)
    work, critical = costs.of(demand)
    slot_start = min(until, frontier) - work
    latest = min(slot_start, until - critical)
    if latest >= until:
        run_at = last_start
    else:
        run_at = min(_after(costs.now, max(latest, floor)), last_start)
    if demand.already_planned_run_at is not None:
        run_at = min(run_at, demand.already_planned_run_at)
    return max(run_at, floor_at), max(slot_start, floor)


def _finishes(ordered: Sequence[Demand], run_at: dict[Key, datetime], costs: _Costs,
              now: datetime) -> dict[Key, datetime]:
    """Run the briefs through the pipe in deadline order, each from its run_at: when each one is done."""
    finish: dict[Key, datetime] = {}
    pipe = 0.0  # seconds after now when the pipe is free
    for demand in ordered:
        start = costs.after_now(run_at[demand.key])
        work, critical = costs.of(demand)
        pipe = max(pipe, start) + work
        done = max(pipe, start + critical)
        latest = costs.after_now(demand.notify_at) + _LATEST_LATE
        finish[demand.key] = now + timedelta(seconds=min(done, max(latest, 0.0)))
    return finish


def _overloads(ordered: Sequence[Demand], plan: Plan, capacity: Capacity, now: datetime) -> list[Overload]:
    groups: dict[datetime, list[Demand]] = {}
    for demand in ordered:
        groups.setdefault(demand.notify_at, []).append(demand)
    found = []
    for notify_at, group in groups.items():
        late = max(plan.finish[d.key] - notify_at for d in group)
        if notify_at <= now or late <= timedelta(0):
            continue
        calls, tokens = sum(d.calls for d in group), sum(d.tokens for d in group)
        found.append(Overload(
            notify_at, len(group), calls, tokens, capacity.calls_per_minute_planned(calls, tokens),
            timedelta(seconds=min(capacity.work_seconds(calls, tokens), _LATEST_LATE)),
            min(plan.run_at[d.key] for d in group), late,
        ))
    return found


def plan_starts(demands: Sequence[Demand], capacity: Capacity, *, now: datetime, max_lead: timedelta,
                min_lead: timedelta) -> Plan:
    """A run_at per demand key, the planned finish of each, and the overloads (see the module docstring).

    Raises ValueError for a naive or out-of-range ``now``, leads outside ``0 <= min_lead <= max_lead <= 366
    days``, or two demands with the same key. Briefs whose ``notify_at`` has passed start ``now`` and are
    never reported as overloads (they are catch-ups, late by definition).
    """
    now = _check(now, max_lead, min_lead)
    _keys_unique(demands)
    ordered = _deadline_order(demands)
    run_at: dict[Key, datetime] = {}
    frontier = math.inf
    costs = _Costs(capacity, now, (max_lead, min_lead))
    for demand in reversed(ordered):
        if demand.notify_at <= now:
            run_at[demand.key] = now
        else:
            run_at[demand.key], frontier = _start(demand, costs, frontier)
    plan = Plan(run_at, _finishes(ordered, run_at, costs, now))
    plan.overloads.extend(_overloads(ordered, plan, capacity, now))
    return plan
