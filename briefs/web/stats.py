"""The overview's numbers (``GET /api/v1/stats``): one snapshot, computed at most about once a second.

With a million rows in ``queue_jobs`` the counts are not free, and the overview polls every second per
viewer. :class:`StatsCache` is single-flight: concurrent requests share one computation, and a snapshot
at most :data:`MAX_AGE` seconds old is served as is, so the database's work does not grow with viewers.

Every query on a request's path is index-driven: pending, running, failed and cancelled jobs through
their partial indexes (``queue_jobs_claim``, ``queue_jobs_lease``, ``queue_jobs_failed``), recently
finished ones by ``finished_at`` (``queue_jobs_finished``), today's briefs by ``completed_at``
(``daily_briefs_completed``). The one count that must read the table, completed jobs by type (they are
most of it), is split (:class:`CompletedCounts`): the jobs completed more than five minutes before a cut
are counted in one pass at most every :data:`COMPLETED_BASE_MAX_AGE` seconds, in the background after the
first time; those completed since the cut are counted through the index with every snapshot. A new
completion therefore shows within a second; an old completed job that is retried or pruned leaves the
count within 30 s. Instants come back as ISO 8601 text; one Python cannot hold (``-infinity``) comes back
as PostgreSQL's text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from psycopg.rows import dict_row

from briefs.db import Database
from briefs.service import llm_health
from scheduler.report import recent_ticks
from worker import queue

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds a snapshot is served before the next request computes a new one
COMPLETED_BASE_MAX_AGE = 30.0  # seconds the completed jobs counted before the cut are served before a recount
COMPLETED_CUT_MARGIN = timedelta(minutes=5)  # the cut lies this far before the recount: every completing
# transaction with a finished_at before the cut has committed by then (they last milliseconds)
TYPE_CHARS = 200
CLOSED_HOURS_MAX_AGE = 60.0  # seconds the day chart's finished hours are served before they are counted again
WORKER_WINDOW = timedelta(minutes=5)
MAX_WORKERS = 200
FINISHED = "status IN ('completed', 'failed', 'cancelled')"  # the predicate of queue_jobs_finished

# Live, failed and cancelled jobs: a BitmapOr of the partial indexes (OR, not IN: one arm per index).
_UNFINISHED = """
SELECT left(job_type, %(clip)s) AS job_type, status, count(*) AS jobs,
       extract(epoch FROM now()) - min(extract(epoch FROM run_at))
           FILTER (WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age
FROM queue_jobs
WHERE status = 'pending' OR status = 'processing' OR status = 'failed' OR status = 'cancelled'
GROUP BY 1, 2
"""

# Completed jobs before the cut (a pass over the table, see CompletedCounts), and since (the index).
_COMPLETED_BEFORE = """
SELECT left(job_type, %(clip)s) AS job_type, count(*) AS jobs
FROM queue_jobs
WHERE status = 'completed' AND (finished_at > %(cut)s) IS NOT TRUE
GROUP BY 1
"""
_COMPLETED_SINCE = f"""
SELECT left(job_type, %(clip)s) AS job_type, count(*) AS jobs
FROM queue_jobs
WHERE {FINISHED} AND status = 'completed' AND finished_at > %(cut)s
GROUP BY 1
"""

_SERIES = f"""
SELECT date_trunc(%(unit)s, finished_at, 'UTC') AS bucket,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled
FROM queue_jobs
WHERE {FINISHED} AND finished_at >= %(since)s AND finished_at <= %(now)s
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

_TOKENS = """
SELECT count(*) AS briefs, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens
FROM daily_briefs
WHERE completed_at >= %(since)s AND completed_at <= %(now)s
"""


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


def _counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Jobs by status, by type (each with its statuses) and the oldest runnable pending job's age, from
    :func:`worker.queue.stats` (a job due since ``-infinity`` is overdue without a finite age)."""
    by_status = dict.fromkeys(("pending", "processing", *queue.FINISHED), 0)
    by_type: dict[str, dict[str, int]] = {}
    oldest: timedelta | None = None
    for row in rows:
        status, jobs = str(row["status"]), int(row["jobs"])
        by_status[status] = by_status.get(status, 0) + jobs
        by_type.setdefault(str(row["job_type"]), {})[status] = jobs
        age = row["oldest_pending_age"]
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


def _buckets(rows: list[dict[str, Any]], start: datetime, step: timedelta, n: int) -> list[dict[str, Any]]:
    """``n`` buckets of ``step`` from ``start``, zeros where nothing finished."""
    found = {row["bucket"]: row for row in rows if isinstance(row["bucket"], datetime)}
    series = []
    for i in range(n):
        at = start + i * step
        row = found.get(at, {})
        series.append({"at": at.isoformat(), **{k: int(row.get(k, 0)) for k in ("completed", "failed", "cancelled")}})
    return series


@dataclass
class ClosedHours:
    """The day chart's finished hours (``[hour - 23 h, hour)``): a full day of rows to count, so counted at
    most every :data:`CLOSED_HOURS_MAX_AGE` seconds; the current hour comes from the per-minute counts."""

    hour: datetime
    buckets: list[dict[str, Any]]
    at: float


async def _closed_hours(conn: Any, hour: datetime, known: ClosedHours | None) -> ClosedHours:
    if known is not None and known.hour == hour and time.monotonic() - known.at <= CLOSED_HOURS_MAX_AGE:
        return known
    since = hour - timedelta(hours=23)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SERIES, {"unit": "hour", "since": since, "now": hour - timedelta(microseconds=1)})
        buckets = _buckets(await cur.fetchall(), since, timedelta(hours=1), 23)
    return ClosedHours(hour, buckets, time.monotonic())


def _current_hour(minutes: list[dict[str, Any]], hour: datetime) -> dict[str, Any]:
    """The current hour's bucket, summed from the per-minute buckets (the last 60 minutes cover it)."""
    mine = [m for m in minutes if datetime.fromisoformat(m["at"]) >= hour]
    return {"at": hour.isoformat(), **{k: sum(m[k] for m in mine) for k in ("completed", "failed", "cancelled")}}


async def _throughput(conn: Any, now: datetime, hours: ClosedHours) -> dict[str, Any]:
    minute = now.replace(second=0, microsecond=0)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_SERIES, {"unit": "minute", "since": minute - timedelta(minutes=59), "now": now})
        minutes = _buckets(await cur.fetchall(), minute - timedelta(minutes=59), timedelta(minutes=1), 60)
    completed = sum(m["completed"] for m in minutes)
    failed = sum(m["failed"] for m in minutes)
    return {
        "completed_per_minute": round(completed / 60, 3),
        "failed_per_minute": round(failed / 60, 3),
        "completed_last_hour": completed,
        "failed_last_hour": failed,
        "success_rate_last_hour": round(completed / (completed + failed), 4) if completed + failed else None,
        "per_minute": minutes,
        "per_hour": [*hours.buckets, _current_hour(minutes, hours.hour)],
    }


def _percentiles(values: Any) -> dict[str, float | None]:
    p50, p95 = (values or [None, None])[:2] if isinstance(values, list) else (None, None)
    return {"p50_s": _finite(p50), "p95_s": _finite(p95)}


async def _durations(conn: Any, now: datetime) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_DURATIONS, {"since": now - timedelta(hours=1), "now": now})
        row = await cur.fetchone()
    assert row is not None
    return {"jobs": int(row["jobs"]), "wait": _percentiles(row["wait"]), "run": _percentiles(row["run"])}


async def _workers(conn: Any, now: datetime) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_WORKERS, {"since": now - WORKER_WINDOW})
        rows = await cur.fetchall()
    return [{"id": row["id"], "running": int(row["running"]), "last_seen": epoch_iso(row["last_seen"])}
            for row in rows]


async def _tokens(conn: Any, now: datetime) -> dict[str, Any]:
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_TOKENS, {"since": midnight, "now": now})
        row = await cur.fetchone()
    assert row is not None
    prompt, completion = int(row["prompt_tokens"]), int(row["completion_tokens"])
    return {"since": midnight.isoformat(), "briefs": int(row["briefs"]), "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": prompt + completion}


def _scheduler(ticks: list[dict[str, Any]]) -> dict[str, Any]:
    """The scheduler's last tick (of every user) and the last one-user tick, from the tick log."""
    every = next((t for t in ticks if t["user_id"] is None), None)
    one = next((t for t in ticks if t["user_id"] is not None), None)
    return {"last_tick": every, "last_user_tick": one}


async def _db_now(conn: Any) -> datetime:
    """The database's clock (the one the queue's instants are written with)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT now() AS now")
        row = await cur.fetchone()
    assert row is not None
    now: datetime = row["now"]
    return now.astimezone(UTC)


async def compute(db: Database, now: datetime | None = None) -> dict[str, Any]:
    """One snapshot of everything the overview shows (see the module docstring)."""
    snapshot, _ = await compute_with_hours(db, now)
    return snapshot


async def compute_with_hours(
    db: Database, now: datetime | None = None, hours: ClosedHours | None = None,
    completed: CompletedCounts | None = None,
) -> tuple[dict[str, Any], ClosedHours]:
    """:func:`compute`, given the day chart's closed hours counted before (``hours``: recounted when the
    hour changed or they are too old) and the completed jobs' base count (``completed``), and the hours
    it used."""
    started = time.perf_counter()
    completed = completed or CompletedCounts(db)
    async with db.raw() as conn:
        now = now or await _db_now(conn)
        counts = _counts(await _unfinished(conn) + await completed.rows(conn))
        hours = await _closed_hours(conn, now.replace(minute=0, second=0, microsecond=0), hours)
        throughput = await _throughput(conn, now, hours)
        durations = await _durations(conn, now)
        workers = await _workers(conn, now)
        tokens = await _tokens(conn, now)
        ticks = await recent_ticks(conn, 50)
    llm = await llm_health(db, now)
    llm["tokens_today"] = tokens
    return {
        "generated_at": now.isoformat(),
        "jobs": counts,
        "throughput": throughput,
        "durations_last_hour": durations,
        "workers": workers,
        "scheduler": _scheduler(ticks),
        "llm": _jsonable(llm),
        "compute_s": round(time.perf_counter() - started, 4),
    }, hours


async def _unfinished(conn: Any) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_UNFINISHED, {"clip": TYPE_CHARS})
        rows = [dict(row) for row in await cur.fetchall()]
    for row in rows:
        row["oldest_pending_age"] = queue.age_of(row["oldest_pending_age"])
    return rows


@dataclass
class _Base:
    cut: datetime
    by_type: dict[str, int]
    at: float


class CompletedCounts:
    """Completed jobs by type: a base counted in one pass (jobs completed up to a cut five minutes before
    the count), recounted in the background when older than :data:`COMPLETED_BASE_MAX_AGE`, plus the jobs
    completed since the cut, counted through ``queue_jobs_finished`` each time."""

    def __init__(self, db: Database, max_age: float = COMPLETED_BASE_MAX_AGE) -> None:
        self.db = db
        self.max_age = max_age
        self.recounts = 0
        self._base: _Base | None = None
        self._recount: asyncio.Task[None] | None = None

    async def rows(self, conn: Any) -> list[dict[str, Any]]:
        """Rows shaped like :func:`worker.queue.stats`'s, status ``completed``."""
        if self._base is None:
            await self._count_base()
        elif time.monotonic() - self._base.at > self.max_age and (self._recount is None or self._recount.done()):
            self._recount = asyncio.ensure_future(self._count_base())
            self._recount.add_done_callback(_retrieve)
        base = self._base
        assert base is not None
        totals = dict(base.by_type)
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_COMPLETED_SINCE, {"clip": TYPE_CHARS, "cut": base.cut})
            for row in await cur.fetchall():
                totals[row["job_type"]] = totals.get(row["job_type"], 0) + int(row["jobs"])
        return [{"job_type": t, "status": "completed", "jobs": n, "oldest_pending_age": None}
                for t, n in sorted(totals.items())]

    async def _count_base(self) -> None:
        async with self.db.raw() as conn, conn.cursor(row_factory=dict_row) as cur:
            cut = await _db_now(conn) - COMPLETED_CUT_MARGIN
            await cur.execute(_COMPLETED_BEFORE, {"clip": TYPE_CHARS, "cut": cut})
            by_type = {row["job_type"]: int(row["jobs"]) for row in await cur.fetchall()}
        self._base = _Base(cut, by_type, time.monotonic())
        self.recounts += 1


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
        self._snapshot: dict[str, Any] | None = None
        self._at = -math.inf
        self._flight: asyncio.Future[dict[str, Any]] | None = None
        self._hours: ClosedHours | None = None
        self.completed = CompletedCounts(db)

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
            snapshot, self._hours = await compute_with_hours(self.db, hours=self._hours, completed=self.completed)
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
