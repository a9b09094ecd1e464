"""The overview's numbers (``GET /api/v1/stats``): one snapshot, computed at most about once a second.

The overview polls every second per viewer, so :class:`StatsCache` is single-flight: concurrent
requests share one computation, and a snapshot at most :data:`MAX_AGE` seconds old is served as is.

A snapshot is two parts, so that none of its queries reads the table on a request's path:

* **the base** (:class:`Base`), counted in the background at most every :data:`BASE_MAX_AGE` seconds (the
  first one inline): finished jobs by type and status up to a *cut* five minutes back (completed jobs are
  most of the table: this is the one pass over it), the per-minute and per-hour series up to the cut,
  the last hour's wait and run time percentiles, today's tokens;
* **the live part**, counted with every snapshot through indexes: pending and running jobs (their
  partial indexes), the jobs finished since the cut (``queue_jobs_finished``), by type, status and
  minute, the workers seen, the tick log, the LLM's health and its circuit breaker (``llm.circuit``: the
  ``llm_circuit`` row of this configuration, read by its primary key; :mod:`briefs.circuit`).

Counts and series are the base plus what finished since its cut, so a job that completes shows in the
next snapshot. Every transaction that writes a ``finished_at`` before the cut has committed when the
base is counted (they last milliseconds; the cut is five minutes back), so nothing is counted twice or
missed; an old finished job that is retried or pruned leaves the counts at the next base. Instants come
back as ISO 8601 text; one Python cannot hold (``-infinity``) comes back as PostgreSQL's text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from psycopg.rows import dict_row

from briefs import metrics
from briefs.circuit import read_status
from briefs.db import Database
from briefs.service import llm_cost_on, llm_health
from scheduler.report import recent_ticks
from worker import queue

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds a snapshot is served before the next request computes a new one
BASE_MAX_AGE = 15.0  # seconds a base is used before a recount starts (in the background)
CUT_MARGIN = timedelta(minutes=5)  # how far before the base's count its cut lies
WORKER_WINDOW = timedelta(minutes=5)
MAX_WORKERS = 200
TYPE_CHARS = 200
FINISHED = "status IN ('completed', 'failed', 'cancelled')"  # the predicate of queue_jobs_finished
KINDS = ("completed", "failed", "cancelled")
_MINUTE, _HOUR = timedelta(minutes=1), timedelta(hours=1)

# Pending and running jobs: a BitmapOr of their partial indexes (OR, not IN: one arm per index).
_UNFINISHED = """
SELECT left(job_type, %(clip)s) AS job_type, status, count(*) AS jobs,
       extract(epoch FROM now()) - min(extract(epoch FROM run_at))
           FILTER (WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age
FROM queue_jobs
WHERE status = 'pending' OR status = 'processing'
GROUP BY 1, 2
"""

# The base's finished jobs: every one not finished after the cut (a NULL finished_at included).
_FINISHED_BEFORE = f"""
SELECT left(job_type, %(clip)s) AS job_type, status, count(*) AS jobs
FROM queue_jobs
WHERE {FINISHED} AND (finished_at > %(cut)s) IS NOT TRUE
GROUP BY 1, 2
"""

# The live part's finished jobs: since the cut, through queue_jobs_finished; a finished_at after now
# (hostile: 'infinity') is counted but in no minute.
_FINISHED_SINCE = f"""
SELECT left(job_type, %(clip)s) AS job_type, status,
       CASE WHEN finished_at <= %(now)s THEN date_trunc('minute', finished_at, 'UTC') END AS minute,
       count(*) AS jobs
FROM queue_jobs
WHERE {FINISHED} AND finished_at > %(cut)s
GROUP BY 1, 2, 3
"""

_SERIES = f"""
SELECT date_trunc(%(unit)s, finished_at, 'UTC') AS bucket,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled
FROM queue_jobs
WHERE {FINISHED} AND finished_at >= %(since)s AND finished_at <= %(cut)s
GROUP BY 1
"""

_DURATIONS = f"""
SELECT percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY date_part('epoch', started_at - run_at))
           FILTER (WHERE isfinite(run_at) AND started_at >= run_at) AS wait,
       percentile_cont(ARRAY[0.5, 0.95]) WITHIN GROUP (ORDER BY date_part('epoch', finished_at - started_at))
           FILTER (WHERE finished_at >= started_at) AS run,
       count(*) AS jobs
FROM queue_jobs
WHERE {FINISHED} AND finished_at >= %(since)s AND finished_at <= %(now)s
  AND status IN ('completed', 'failed') AND isfinite(started_at)
"""

_WORKERS = f"""
SELECT left(locked_by, 200) AS id, count(*) FILTER (WHERE status = 'processing') AS running,
       max(date_part('epoch', greatest(heartbeat_at, started_at, finished_at))) AS last_seen
FROM queue_jobs
WHERE locked_by IS NOT NULL
  AND (status = 'processing' OR ({FINISHED} AND finished_at >= %(since)s))
GROUP BY 1
ORDER BY 3 DESC NULLS LAST
LIMIT {MAX_WORKERS}
"""

Buckets = dict[datetime, dict[str, int]]  # bucket start -> {"completed": n, "failed": n, "cancelled": n}


def iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return None if value is None else str(value)[:60]


def epoch_iso(epoch: Any) -> str | None:
    """An epoch (float, possibly infinite or out of Python's range) as ISO text, or None."""
    if epoch is None or not math.isfinite(float(epoch)):
        return None
    try:
        return datetime.fromtimestamp(float(epoch), UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return round(number, 3) if math.isfinite(number) else None


def _floor(at: datetime, step: timedelta) -> datetime:
    return at.replace(second=0, microsecond=0) if step == _MINUTE else at.replace(minute=0, second=0, microsecond=0)


async def _rows(conn: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return [dict(row) for row in await cur.fetchall()]


async def _db_now(conn: Any) -> datetime:
    """The database's clock (the one the queue's instants are written with)."""
    [row] = await _rows(conn, "SELECT now() AS now", {})
    now: datetime = row["now"]
    return now.astimezone(UTC)


# --------------------------------------------------------------------------- the base


@dataclass(frozen=True)
class Base:
    """What is counted at most every :data:`BASE_MAX_AGE` seconds (see the module docstring)."""

    cut: datetime  # a minute boundary, CUT_MARGIN before the count
    finished: dict[tuple[str, str], int]  # (job type, status) -> jobs finished up to the cut
    minutes: Buckets  # per minute, the hour before the cut
    hours: Buckets  # per hour, the day before the cut
    durations: dict[str, Any]  # the last hour's, at the count
    tokens: dict[str, Any]  # today's, at the count
    cost: dict[str, Any]  # today's and this month's LLM tokens and cost (briefs.service.llm_cost), at the count
    at: float  # time.monotonic() of the count


def _buckets_of(rows: Iterable[dict[str, Any]]) -> Buckets:
    return {row["bucket"]: {k: int(row[k]) for k in KINDS} for row in rows if isinstance(row["bucket"], datetime)}


async def count_base(db: Database) -> Base:
    """Count a base: one pass over the finished jobs, the series up to the cut, durations and tokens."""
    async with db.raw() as conn:
        # One core: in parallel the pass took both, and every request waited for the CPU meanwhile.
        await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        now = await _db_now(conn)
        cut = _floor(now - CUT_MARGIN, _MINUTE)
        finished = {(row["job_type"], row["status"]): int(row["jobs"])
                    for row in await _rows(conn, _FINISHED_BEFORE, {"clip": TYPE_CHARS, "cut": cut})}
        minutes = await _rows(conn, _SERIES, {"unit": "minute", "since": cut - 61 * _MINUTE, "cut": cut})
        hours = await _rows(conn, _SERIES, {"unit": "hour", "since": _floor(now, _HOUR) - 24 * _HOUR, "cut": cut})
        durations = await _durations(conn, now)
        cost = await llm_cost_on(conn, db.settings, now)
    metrics.LLM_SPEND_TODAY.set(cost["today"]["priced_cost"])
    return Base(cut, finished, _buckets_of(minutes), _buckets_of(hours), durations, _tokens(cost, now), cost,
                time.monotonic())


def _percentiles(values: Any) -> dict[str, float | None]:
    p50, p95 = (values or [None, None])[:2] if isinstance(values, list) else (None, None)
    return {"p50_s": _finite(p50), "p95_s": _finite(p95)}


async def _durations(conn: Any, now: datetime) -> dict[str, Any]:
    [row] = await _rows(conn, _DURATIONS, {"since": now - _HOUR, "now": now})
    return {"jobs": int(row["jobs"]), "wait": _percentiles(row["wait"]), "run": _percentiles(row["run"])}


def _tokens(cost: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Today's (UTC) tokens, from the cost query's day (:func:`briefs.service.llm_cost_on`: one pass)."""
    today = cost["today"]
    prompt, completion = today["prompt_tokens"], today["completion_tokens"]
    return {"since": now.replace(hour=0, minute=0, second=0, microsecond=0).isoformat(), "briefs": today["briefs"],
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class BaseCounts:
    """The current base: counted inline the first time, then recounted in the background when older than
    ``max_age`` (the stale one is used meanwhile: a request never waits for the pass over the table)."""

    def __init__(self, db: Database, max_age: float = BASE_MAX_AGE) -> None:
        self.db = db
        self.max_age = max_age
        self.recounts = 0
        self._base: Base | None = None
        self._recount: asyncio.Task[None] | None = None

    async def get(self) -> Base:
        if self._base is None:
            await asyncio.shield(self.warm())  # the first: every request waits for the same count
        elif time.monotonic() - self._base.at > self.max_age:
            self.warm()
        assert self._base is not None
        return self._base

    def warm(self) -> asyncio.Task[None]:
        """Start a count unless one is running (the web service starts one as it starts); return it."""
        if self._recount is None or self._recount.done():
            self._recount = asyncio.ensure_future(self._count())
            self._recount.add_done_callback(_retrieve)
        return self._recount

    async def _count(self) -> None:
        self._base = await count_base(self.db)
        self.recounts += 1


# --------------------------------------------------------------------------- the live part


def _counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Jobs by status, by type (each with its statuses) and the oldest runnable pending job's age
    (a job due since ``-infinity`` is overdue without a finite age)."""
    by_status = dict.fromkeys(("pending", "processing", *KINDS), 0)
    by_type: dict[str, dict[str, int]] = {}
    oldest: timedelta | None = None
    for row in rows:
        status, jobs = str(row["status"]), int(row["jobs"])
        by_status[status] = by_status.get(status, 0) + jobs
        by_type.setdefault(str(row["job_type"]), {})[status] = jobs
        age = row.get("oldest_pending_age")
        if isinstance(age, timedelta) and (oldest is None or age > oldest):
            oldest = age
    infinite = oldest == timedelta.max
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_type": by_type,
        "oldest_pending_age_s": None if oldest is None or infinite else round(oldest.total_seconds(), 3),
        "oldest_pending_overdue_forever": infinite,  # a pending job due since '-infinity'
    }


async def _unfinished(conn: Any) -> list[dict[str, Any]]:
    rows = await _rows(conn, _UNFINISHED, {"clip": TYPE_CHARS})
    for row in rows:
        row["oldest_pending_age"] = queue.age_of(row["oldest_pending_age"])
    return rows


def _merge_finished(base: Base, since: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Buckets, Buckets]:
    """The base's finished counts and series plus those since its cut: (count rows, minutes, hours)."""
    totals = dict(base.finished)
    minutes: Buckets = {at: dict(kinds) for at, kinds in base.minutes.items()}
    hours: Buckets = {at: dict(kinds) for at, kinds in base.hours.items()}
    for row in since:
        key, jobs, status = (row["job_type"], row["status"]), int(row["jobs"]), row["status"]
        totals[key] = totals.get(key, 0) + jobs
        minute = row["minute"]
        if isinstance(minute, datetime) and status in KINDS:
            for series, at in ((minutes, minute), (hours, _floor(minute, _HOUR))):
                series.setdefault(at, dict.fromkeys(KINDS, 0))[status] += jobs
    rows = [{"job_type": t, "status": s, "jobs": n} for (t, s), n in sorted(totals.items())]
    return rows, minutes, hours


def _series(found: Buckets, end: datetime, step: timedelta, n: int) -> list[dict[str, Any]]:
    """``n`` buckets of ``step`` ending with the one holding ``end``, zeros where nothing finished."""
    start = _floor(end, step) - (n - 1) * step
    zero = dict.fromkeys(KINDS, 0)
    return [{"at": (start + i * step).isoformat(), **found.get(start + i * step, zero)} for i in range(n)]


def _throughput(minutes: Buckets, hours: Buckets, now: datetime) -> dict[str, Any]:
    per_minute = _series(minutes, now, _MINUTE, 60)
    completed = sum(m["completed"] for m in per_minute)
    failed = sum(m["failed"] for m in per_minute)
    return {
        "completed_per_minute": round(completed / 60, 3),
        "failed_per_minute": round(failed / 60, 3),
        "completed_last_hour": completed,
        "failed_last_hour": failed,
        "success_rate_last_hour": round(completed / (completed + failed), 4) if completed + failed else None,
        "per_minute": per_minute,
        "per_hour": _series(hours, now, _HOUR, 24),
    }


async def _workers(conn: Any, now: datetime) -> list[dict[str, Any]]:
    rows = await _rows(conn, _WORKERS, {"since": now - WORKER_WINDOW})
    return [{"id": row["id"], "running": int(row["running"]), "last_seen": epoch_iso(row["last_seen"])}
            for row in rows]


async def _circuit(db: Database) -> dict[str, Any]:
    """The LLM circuit as the overview shows it; ``unknown`` when its row cannot be read."""
    try:
        async with db.raw() as conn:
            return await read_status(conn, db.settings)
    except Exception as exc:
        log.warning("LLM circuit unreadable for the overview: %s", type(exc).__name__)
        return {"state": "unknown", "reason": None, "since": None, "next_probe_at": None, "detail": "unknown"}


def _cost_view(cost: dict[str, Any]) -> dict[str, Any]:
    """The LLM cost with a ``display`` text per period and the budget's (the overview shows them as they are):
    an unknown cost (a model without a price) says so, never 0."""
    currency = cost["currency"]

    def shown(part: dict[str, Any]) -> str:
        if part["cost"] is None:
            return f"unknown ({part['unpriced_briefs']} unpriced brief(s); {part['priced_cost']:.4f} {currency} priced)"
        return f"{part['cost']:.4f} {currency}"

    budget = cost["daily_budget"]
    today = cost["today"]
    if budget is None:
        budget_text = "none"
    elif today["budget_reached"]:
        budget_text = f"{budget:g} {currency}: reached, briefs are written without AI until the next UTC day"
    else:
        budget_text = f"{budget:g} {currency}: {today['remaining']:.4f} {currency} left today"
    return {**cost, "today": {**today, "display": shown(today)}, "month": {**cost["month"], "display":
            shown(cost["month"])}, "budget_display": budget_text}


def _scheduler(ticks: list[dict[str, Any]]) -> dict[str, Any]:
    """The scheduler's last tick (of every user) and the last one-user tick, from the tick log."""
    every = next((t for t in ticks if t["user_id"] is None), None)
    one = next((t for t in ticks if t["user_id"] is not None), None)
    return {"last_tick": every, "last_user_tick": one}


async def compute(db: Database, base: Base | None = None) -> dict[str, Any]:
    """One snapshot of everything the overview shows (see the module docstring); ``base`` defaults to
    one counted now."""
    started = time.perf_counter()
    base = base or await count_base(db)
    async with db.raw() as conn:
        now = await _db_now(conn)
        unfinished = await _unfinished(conn)
        since = await _rows(conn, _FINISHED_SINCE, {"clip": TYPE_CHARS, "cut": base.cut, "now": now})
        workers = await _workers(conn, now)
        ticks = await recent_ticks(conn, 50)
    finished, minutes, hours = _merge_finished(base, since)
    llm = await llm_health(db, now)
    llm["tokens_today"] = base.tokens
    llm["cost"] = _cost_view(base.cost)
    llm["circuit"] = await _circuit(db)
    return {
        "generated_at": now.isoformat(),
        "jobs": _counts(unfinished + finished),
        "throughput": _throughput(minutes, hours, now),
        "durations_last_hour": base.durations,
        "workers": workers,
        "scheduler": _scheduler(ticks),
        "llm": _jsonable(llm),
        "base_counted_at_cut": base.cut.isoformat(),
        "compute_s": round(time.perf_counter() - started, 4),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class StatsCache:
    """Single-flight snapshots: one computation at a time, shared by every request that waits for it;
    a snapshot at most ``max_age`` seconds old is served without one."""

    def __init__(self, db: Database, max_age: float = MAX_AGE) -> None:
        self.db = db
        self.max_age = max_age
        self.computations = 0  # how many snapshots were computed (tests and the curious)
        self.base = BaseCounts(db)
        self._snapshot: dict[str, Any] | None = None
        self._at = -math.inf
        self._flight: asyncio.Future[dict[str, Any]] | None = None

    async def get(self) -> dict[str, Any]:
        if self._snapshot is not None and time.monotonic() - self._at <= self.max_age:
            return self._snapshot
        if self._flight is None:
            self._flight = asyncio.ensure_future(self._compute())
            self._flight.add_done_callback(_retrieve)
        # shield: a request that goes away does not cancel the computation the others wait for
        return await asyncio.shield(self._flight)

    async def _compute(self) -> dict[str, Any]:
        try:
            snapshot = await compute(self.db, await self.base.get())
            self.computations += 1
            self._snapshot, self._at = snapshot, time.monotonic()
            return snapshot
        finally:
            self._flight = None


def _retrieve(flight: asyncio.Future[Any]) -> None:
    """Every waiter may have gone: collect the outcome so a failure is logged once, not as never retrieved."""
    if not flight.cancelled() and flight.exception() is not None:
        log.warning("computing the stats snapshot failed: %s", flight.exception())


def for_app(app: FastAPI, db: Database) -> StatsCache:
    """The application's one cache (made at first use)."""
    cache = getattr(app.state, "stats_cache", None)
    if not isinstance(cache, StatsCache):
        cache = StatsCache(db)
        app.state.stats_cache = cache
    return cache
