"""The tick's last step: start each brief as late as the LLM capacity allows (:mod:`scheduler.capacity`).

The pages enqueue a brief with the fixed start, ``notify_at - generation_buffer`` (the latest a brief may
start). Then :func:`plan_starts_of_tick`, in the tick's transaction, plans every pending brief job due in the
tick's window together, deadline first, and moves earlier the scheduler's jobs that must start sooner for the
capacity to get every brief done by its ``notify_at``. Two statements: one SELECT (the pending brief jobs whose
``notify_at`` lies ahead within the lookahead, and what the last hour's briefs measured), and one UPDATE when
starts move. A start only ever moves earlier (:func:`scheduler.capacity.plan_starts` is told each job's
current ``run_at``), so planning is stable from tick to tick, and a job a worker claimed meanwhile is left as
it is (the UPDATE checks it is still pending and still later than planned).

What a brief costs
    Each job the scheduler makes carries ``llm_calls`` in its payload: the user's active projects when the tick
    planned it (at most ``brief_max_projects``), each a possible LLM section, plus the summary; a user without
    projects makes none. Quiet projects get no call, so this is an upper bound (the plan errs early, not late).
    A job without the field (queued by hand, or before this step existed) counts as the median of the others
    (one project and a summary when there are none). Tokens are calls times the mean tokens per request of the
    last hour's finished briefs (``settings.llm_tokens_per_call`` until 20 requests were measured).

What the LLM delivers (:func:`capacity_of`)
    ``BRIEFS_LLM_RPM`` and ``BRIEFS_LLM_TPM`` (the deployment's limits, 0 = none), the requests in flight
    (``min(llm_concurrency, worker_concurrency * llm_brief_concurrency)`` per process, times
    ``BRIEFS_WORKERS_EXPECTED``) over the mean time of one request (the ``request_seconds`` of the last hour's
    LLM sections; ``settings.llm_call_seconds`` until 20 were measured), planned at ``capacity_margin`` of it.

Overloads
    When the capacity cannot finish every brief of a ``notify_at`` in time, the tick says so before it happens:
    a warning per ``notify_at`` in the log (the first :data:`WARN_OVERLOADS` of a tick, then one line for the
    rest), each one in the tick report (``capacity.overloads``, shown by ``briefs status``), with the times in
    the zone most of those users are in, and the gauge ``briefs_scheduler_briefs_expected_late``.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from psycopg.rows import dict_row

from briefs import metrics
from briefs.contract import BRIEF_JOB, InvalidTimezone, load_timezone
from briefs.db import named_rows
from briefs.settings import Settings
from scheduler.capacity import Capacity, Demand, Overload, plan_starts
from scheduler.report import TickReport

log = logging.getLogger(__name__)

CALLS_KEY = "llm_calls"  # the payload field with a scheduler job's expected LLM calls
MIN_SAMPLES = 20  # requests measured before the measurement replaces the settings' expectation
RECENT_BRIEFS = 500  # the last hour's briefs measured, at most (the most recent)
WARN_OVERLOADS = 5  # overloaded brief times logged one by one per tick (all of them are in the report)
_YEAR = timedelta(days=365)
_MOVE_AT_LEAST = timedelta(seconds=1)  # a start moves only when the plan is this much earlier (no churn)


class _JobRow(NamedTuple):
    """A row of _JOBS: a pending brief job due in the window, and the last hour's measurements."""

    id: int
    notify_at: datetime | None  # NULL: outside the instants Python can hold
    run_at: datetime | None
    calls: int | None  # the payload's llm_calls, NULL when missing or not a number
    by_scheduler: bool
    timezone: str | None  # the user's zone (NULL when over 64 bytes or the user is gone)
    tokens_per_call: float | None
    token_requests: int
    request_seconds: float | None
    timed_requests: int


# The measurements ride on every row (two scalar subqueries, evaluated once): no statement of their own.
# Hostile values: llm_calls that is not a number comes back NULL, one out of 0..brief_max_projects + 1 clamped; instants
# Python cannot hold come back NULL (those jobs are not planned); a request time outside (0, 1 h] is ignored.
_JOBS = """
WITH recent AS MATERIALIZED (
    SELECT b.id, b.prompt_tokens, b.completion_tokens,
           CASE WHEN jsonb_typeof(b.metadata->'llm_requests') = 'number'
                THEN least(greatest((b.metadata->>'llm_requests')::numeric, 0), 1000000)::bigint END AS requests
    FROM daily_briefs b
    WHERE b.completed_at > %(since)s AND b.completed_at <= %(now)s
    ORDER BY b.completed_at DESC
    LIMIT %(recent)s
), tokens AS (
    SELECT sum(greatest(prompt_tokens, 0)::float8 + greatest(completion_tokens, 0)) / nullif(sum(requests), 0)
             AS per_call,
           coalesce(sum(requests), 0)::bigint AS requests
    FROM recent WHERE requests > 0
), timed AS (
    SELECT avg(s) AS mean, count(*) AS requests FROM (
        SELECT (s.metadata->>'request_seconds')::numeric::float8 AS s
        FROM project_daily_briefs s
        WHERE s.daily_brief_id IN (SELECT id FROM recent)
          AND jsonb_typeof(s.metadata->'request_seconds') = 'number'
          AND (s.metadata->>'request_seconds')::numeric > 0 AND (s.metadata->>'request_seconds')::numeric <= 3600
    ) t
)
SELECT j.id,
       CASE WHEN j.notify_at < '9999-12-29' THEN j.notify_at END AS notify_at,
       CASE WHEN j.run_at > '0001-01-03' AND j.run_at < '9999-12-29' THEN j.run_at END AS run_at,
       CASE WHEN jsonb_typeof(j.payload->%(calls_key)s) = 'number'
            THEN least(greatest(round((j.payload->>%(calls_key)s)::numeric), 0), %(max_calls)s)::bigint END AS calls,
       coalesce(j.payload->>'source' = %(source)s, false) AS by_scheduler,
       CASE WHEN octet_length(u.timezone) <= 64 THEN u.timezone END AS timezone,
       (SELECT per_call FROM tokens) AS tokens_per_call,
       (SELECT requests FROM tokens) AS token_requests,
       (SELECT mean FROM timed) AS request_seconds,
       (SELECT requests FROM timed) AS timed_requests
FROM queue_jobs j
LEFT JOIN users u ON u.id = j.user_id
WHERE j.status = 'pending' AND j.job_type = %(job_type)s AND j.notify_at > %(now)s AND j.notify_at < %(until)s
"""

_MOVE = """
UPDATE queue_jobs j SET run_at = m.run_at, updated_at = now()
FROM unnest(%s::bigint[], %s::timestamptz[]) AS m(id, run_at)
WHERE j.id = m.id AND j.status = 'pending' AND j.run_at > m.run_at
RETURNING j.id
"""


def expected_calls(active_projects: int | None, settings: Settings) -> int | None:
    """A brief's LLM calls: a section per active project (at most ``brief_max_projects``) and the summary."""
    if active_projects is None or active_projects < 0:
        return None
    projects = min(active_projects, settings.brief_max_projects)
    return projects + 1 if projects else 0


def capacity_of(settings: Settings, request_seconds: float | None = None) -> Capacity:
    """What the LLM delivers for the whole deployment, by the settings and the measured request time."""
    per_process = min(settings.llm_concurrency, settings.worker_concurrency * settings.llm_brief_concurrency)
    latency = request_seconds if request_seconds is not None else settings.llm_call_seconds
    return Capacity(
        calls_per_minute=float(settings.llm_rpm),
        tokens_per_minute=float(settings.llm_tpm),
        concurrency=min(per_process * settings.workers_expected, 10**9),
        call_latency_s=min(max(latency, 0.0), 86400.0),
        margin=settings.capacity_margin,
        brief_concurrency=settings.llm_brief_concurrency,
    )


def enabled(settings: Settings) -> bool:
    """Capacity-aware starts apply: switched on, and briefs call an LLM at all."""
    return settings.capacity_planning and settings.llm_enabled


async def plan_starts_of_tick(
    conn: Any, settings: Settings, now: datetime, report: TickReport
) -> None:
    """Plan the starts of every pending brief job in the window and move the scheduler's ones that must start
    sooner; overloads go to the report, the log and the gauge. ``conn``: the tick's counted connection."""
    window = now + timedelta(seconds=settings.lookahead)
    rows = await conn.fetch(_JOBS, _params(now, window, settings), named_rows(_JobRow))
    plannable = [row for row in rows if row.notify_at is not None]
    measured = _measured(rows, settings)
    capacity = capacity_of(settings, measured["request_seconds"])
    demands = _demands(plannable, measured["tokens_per_call"], now)
    max_lead = timedelta(seconds=max(settings.max_lead, settings.generation_buffer))
    plan = plan_starts(demands, capacity, now=now, max_lead=max_lead,
                       min_lead=timedelta(seconds=settings.generation_buffer))
    moves = _moves(plannable, plan.run_at)
    moved = 0
    if moves and not report.dry_run:
        done = await conn.fetch(_MOVE, ([m[0] for m in moves], [m[1] for m in moves]), dict_row)
        moved = len(done)
    late = sum(1 for d in demands if plan.finish[d.key] > d.notify_at)
    report.capacity = _summary(capacity, measured, len(demands), moved if not report.dry_run else len(moves), late)
    zones = _zones_by_notify_at(plannable) if plan.overloads else {}
    report.capacity["overloads"] = [_overload(o, zones.get(o.notify_at, Counter())) for o in plan.overloads]
    _warn(report.capacity["overloads"])
    if not report.dry_run:
        metrics.TICK_EXPECTED_LATE.set(late)


def _params(now: datetime, window: datetime, settings: Settings) -> dict[str, Any]:
    # A payload's llm_calls is held to what a brief can make: a section per included project and the summary.
    most = expected_calls(settings.brief_max_projects, settings)
    return {
        "since": now - timedelta(hours=1), "now": now, "until": window, "recent": RECENT_BRIEFS,
        "calls_key": CALLS_KEY, "max_calls": most, "source": "scheduler", "job_type": BRIEF_JOB,
    }


def _measured(rows: Sequence[_JobRow], settings: Settings) -> dict[str, Any]:
    """The last hour's tokens per request and seconds per request, where enough requests were measured."""
    first = rows[0] if rows else None
    tokens = first.tokens_per_call if first and first.token_requests >= MIN_SAMPLES else None
    seconds = first.request_seconds if first and first.timed_requests >= MIN_SAMPLES else None
    return {
        "tokens_per_call": tokens if tokens is not None else float(settings.llm_tokens_per_call),
        "tokens_measured": tokens is not None,
        "request_seconds": seconds,
        "seconds_measured": seconds is not None,
    }


def _demands(rows: Sequence[_JobRow], tokens_per_call: float, now: datetime) -> list[Demand]:
    """The planner's demands; a run_at more than a year from now (hostile, or hand-made) is not a plan to keep."""
    known = [row.calls for row in rows if row.calls is not None]
    default = int(statistics.median(known)) if known else 2
    demands = []
    for row in rows:
        calls = row.calls if row.calls is not None else default
        tokens = min(int(calls * tokens_per_call), 10**15)
        planned = row.run_at if row.run_at is not None and abs(row.run_at - now) < _YEAR else None
        demands.append(Demand(row.id, row.notify_at, calls, tokens, planned))  # type: ignore[arg-type]
    return demands


def _moves(rows: Sequence[_JobRow], planned: dict[Any, datetime]) -> list[tuple[int, datetime]]:
    """The scheduler's jobs whose planned start is earlier than their run_at (by a second at least)."""
    moves = []
    for row in rows:
        start = planned.get(row.id)
        if row.by_scheduler and start is not None and row.run_at is not None and start <= row.run_at - _MOVE_AT_LEAST:
            moves.append((row.id, start))
    return moves


def _summary(capacity: Capacity, measured: dict[str, Any], briefs: int, moved: int, late: int) -> dict[str, Any]:
    return {
        "briefs": briefs,
        "started_earlier": moved,
        "expected_late": late,
        "calls_per_minute": capacity.calls_per_minute or None,
        "tokens_per_minute": capacity.tokens_per_minute or None,
        "concurrency": capacity.concurrency,
        "request_seconds": round(capacity.call_latency_s, 3),
        "request_seconds_measured": measured["seconds_measured"],
        "tokens_per_call": round(measured["tokens_per_call"], 1),
        "tokens_per_call_measured": measured["tokens_measured"],
        "margin": capacity.margin,
    }


def _warn(overloads: Sequence[dict[str, Any]]) -> None:
    """A warning per overload, the first :data:`WARN_OVERLOADS` of a tick, then one line for the rest."""
    for item in overloads[:WARN_OVERLOADS]:
        log.warning("LLM capacity: %s", item["message"])
    if len(overloads) > WARN_OVERLOADS:
        late = sum(item["briefs"] for item in overloads[WARN_OVERLOADS:])
        log.warning("LLM capacity: %d more brief times are overloaded (%d briefs), the last at %s; see briefs status",
                    len(overloads) - WARN_OVERLOADS, late, overloads[-1]["notify_at"].isoformat())


def _zones_by_notify_at(rows: Sequence[_JobRow]) -> dict[datetime, Counter[str]]:
    zones: dict[datetime, Counter[str]] = {}
    for row in rows:
        if row.timezone and row.notify_at is not None:
            zones.setdefault(row.notify_at, Counter())[row.timezone] += 1
    return zones


def _overload(overload: Overload, zones: Counter[str]) -> dict[str, Any]:
    """An overload as the report keeps it, its message in the zone most of its users are in (``zones``: the
    users' zones at its notify_at, counted)."""
    zone, label = None, ""
    for name, _ in zones.most_common(3):
        try:
            zone, label = load_timezone(name), name
            break
        except (InvalidTimezone, ValueError):  # a zone the scheduler skips: try the next
            continue
    return {
        "notify_at": overload.notify_at,
        "briefs": overload.briefs,
        "calls": overload.calls,
        "tokens": overload.tokens,
        "start": overload.start,
        "late_by_s": round(overload.late_by.total_seconds(), 1),
        "message": overload.describe(zone, label),
    }
