"""Every statement that touches ``queue_jobs``.

Functions take a psycopg connection and run inside the caller's transaction, so
the scheduler can enqueue in the same transaction as its advisory lock. The
database's own ``now()`` is used for claim, lease and retry times: many processes
must agree on them.

Fencing: a claim gives the job a fresh ``processing_token``; heartbeat, progress,
complete, fail and release all require ``status = 'processing'`` and that token,
so a worker whose lease expired (and whose job was rescued and maybe claimed by
another worker) can no longer write to it.

The hot path (claim, and completions riding along with it) is written for
generic plans on dedicated autocommit connections (:data:`HOT_PATH_OPTIONS`): one
round trip and one commit per statement, no planning per call.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb, set_json_loads

NOTIFY_CHANNEL = "briefs_queue"
DEFAULT_PRIORITY = 100
FINISHED = ("completed", "failed", "cancelled")

Conn = psycopg.AsyncConnection[Any]
# The hot statements also run on a cursor kept for the purpose (a connection's execute()
# makes a new cursor every time): anything with an awaitable execute() returning the cursor.
Executor = psycopg.AsyncConnection[Any] | psycopg.AsyncCursor[Any]


@dataclass(frozen=True, slots=True)
class NewJob:
    job_type: str
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int = DEFAULT_PRIORITY
    run_at: datetime | None = None  # None: now (the database's clock)
    max_attempts: int | None = None  # None: the queue's default
    dedup_key: str | None = None
    user_id: int | None = None
    notify_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    job_type: str
    payload: dict[str, Any]
    priority: int
    attempts: int  # including this run
    max_attempts: int
    dedup_key: str | None
    user_id: int | None
    notify_at: datetime | None
    run_at: datetime
    token: UUID


@dataclass(frozen=True, slots=True)
class FailOutcome:
    status: str  # 'pending' (will retry) or 'failed'
    run_at: datetime
    attempts: int


class QueueError(RuntimeError):
    """An operator action that cannot be done (message is for humans)."""


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries spread out."""
    delay = min(cap, base * (2 ** max(attempts - 1, 0)))
    return delay / 2 + random.random() * delay / 2


# --------------------------------------------------------------------------- enqueue

_ENQUEUE = """
INSERT INTO queue_jobs (job_type, payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at)
SELECT t.job_type, t.payload, t.priority, coalesce(t.run_at, now()), t.max_attempts,
       t.dedup_key, t.user_id, t.notify_at
FROM unnest(%s::text[], %s::jsonb[], %s::smallint[], %s::timestamptz[], %s::int[],
            %s::text[], %s::bigint[], %s::timestamptz[])
     AS t(job_type, payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at)
ON CONFLICT DO NOTHING
RETURNING id, dedup_key
"""


async def enqueue_many(
    conn: Conn, jobs: Sequence[NewJob], *, default_max_attempts: int = 5, notify: bool = True
) -> list[int | None]:
    """Insert jobs with one statement; returns, per input, the new id or None when deduplicated.

    A job whose ``dedup_key`` matches a live (pending or running) job, or an
    earlier job of the same batch, is not inserted. One NOTIFY wakes idle
    workers when the transaction commits.
    """
    if not jobs:
        return []
    cur = await conn.execute(
        _ENQUEUE,
        (
            [j.job_type for j in jobs],
            [Jsonb(j.payload) for j in jobs],
            [j.priority for j in jobs],
            [j.run_at for j in jobs],
            [j.max_attempts or default_max_attempts for j in jobs],
            [j.dedup_key for j in jobs],
            [j.user_id for j in jobs],
            [j.notify_at for j in jobs],
        ),
    )
    rows = await cur.fetchall()
    by_key = {key: id_ for id_, key in rows if key is not None}
    keyless = iter(id_ for id_, key in rows if key is None)
    result: list[int | None] = []
    for job in jobs:
        if job.dedup_key is None:
            result.append(next(keyless))
        else:
            result.append(by_key.pop(job.dedup_key, None))  # pop: a batch duplicate gets None
    if notify and rows:
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return result


async def enqueue(conn: Conn, job: NewJob, *, default_max_attempts: int = 5) -> int | None:
    return (await enqueue_many(conn, [job], default_max_attempts=default_max_attempts))[0]


# --------------------------------------------------------------------------- claim and lease

# Session settings for the connections that run the hot statements below (claim,
# complete) thousands of times a second. Each is planned once per connection (a
# generic plan: re-planning these CTEs cost more than running them), and every one
# is a handful of index lookups by design, so the planner is kept from ever
# choosing a scan or a sort of the whole table, whatever its statistics say.
HOT_PATH_OPTIONS = (
    "-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_sort=off"
    " -c enable_hashjoin=off -c enable_mergejoin=off"
)


def _load_json(data: bytes | bytearray | memoryview) -> Any:
    """JSON from the database: ``{}`` (most payloads) without parsing, the rest without encoding sniffing."""
    if data == b"{}":
        return {}
    return json.loads(bytes(data).decode())


def prepare_hot_connection(conn: Conn) -> None:
    """Set up a connection opened with :data:`HOT_PATH_OPTIONS` (its JSON loader)."""
    set_json_loads(_load_json, conn)


_JOB_COLUMNS = (
    "j.id, j.job_type, j.payload, j.priority, j.attempts, j.max_attempts, j.dedup_key, "
    "j.user_id, j.notify_at, j.run_at, j.processing_token"
)

# One statement: pick (lock) the runnable rows in claim order, skipping rows other
# workers hold, then update them. MATERIALIZED keeps the LIMIT exact.
_CLAIM_CTES = """
picked AS MATERIALIZED (
    SELECT id FROM queue_jobs
    WHERE status = 'pending' AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE queue_jobs j
    SET status = 'processing',
        attempts = j.attempts + 1,
        locked_by = %(worker)s,
        processing_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => %(lease)s),
        heartbeat_at = now(),
        started_at = now(),
        finished_at = NULL,
        updated_at = now()
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING """ + _JOB_COLUMNS + """
)"""

_CLAIM = f"WITH {_CLAIM_CTES}\nSELECT * FROM claimed"

# Completions, fenced by the token. The status is a parameter on purpose: a generic
# plan cannot then match the partial lease index (which would read every running
# job to find these few) and looks each row up by primary key instead.
_COMPLETE = """
    UPDATE queue_jobs j
    SET status = 'completed', result = d.result, finished_at = now(), updated_at = now(),
        lease_expires_at = NULL, last_error = NULL
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(results)s::jsonb[]) AS d(id, token, result)
    WHERE j.id = d.id AND j.processing_token = d.token AND j.status = %(processing)s
    RETURNING j.id"""

_COMPLETE_AND_CLAIM = f"""
WITH done AS ({_COMPLETE}),
{_CLAIM_CTES}
SELECT *, NULL::bigint[] FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, (SELECT array_agg(id) FROM done)
"""


async def claim(conn: Executor, limit: int, worker_id: str, lease_seconds: float) -> list[Job]:
    """Claim up to ``limit`` runnable jobs: lowest priority first, then run_at, then id."""
    if limit <= 0:
        return []
    cur = await conn.execute(_CLAIM, {"limit": limit, "worker": worker_id, "lease": lease_seconds})
    jobs = [Job(*row) for row in await cur.fetchall()]
    jobs.sort(key=_claim_order)
    return jobs


async def complete_and_claim(
    conn: Executor, done: Sequence[tuple[int, UUID, Any]], limit: int, worker_id: str, lease_seconds: float
) -> tuple[set[int], list[Job]]:
    """:func:`complete_many` and :func:`claim` in one statement: one round trip, one commit.

    A worker whose slot just freed has both to do; doing them together halves the
    statements and commits on the hot path. Returns (ids completed, jobs claimed);
    ``limit`` may be 0 (complete only). As in :func:`complete_many`, only a run whose
    token still holds is written (one id twice, two runs of a job: one at most).
    """
    if not done:
        return set(), await claim(conn, limit, worker_id, lease_seconds)
    ids, tokens, results = _split_done(done)
    cur = await conn.execute(
        _COMPLETE_AND_CLAIM,
        {"ids": ids, "tokens": tokens, "results": results, "processing": "processing", "limit": max(limit, 0),
         "worker": worker_id, "lease": lease_seconds},
    )
    rows = await cur.fetchall()
    written = set(rows[-1][11] or ())  # the last row carries the completed ids
    jobs = [Job(*row[:11]) for row in rows[:-1]]
    jobs.sort(key=_claim_order)
    return written, jobs


def _claim_order(job: Job) -> tuple[int, datetime, int]:
    return (job.priority, job.run_at, job.id)


async def heartbeat(conn: Conn, jobs: Iterable[tuple[int, UUID]], lease_seconds: float) -> set[UUID]:
    """Extend the leases of running jobs; returns the tokens that still hold (the runs this worker still owns).

    Tokens rather than ids: after a rescue the same worker may hold a newer run
    of the same job, and only the token tells the two runs apart.
    """
    ids, tokens = _split(jobs)
    if not ids:
        return set()
    cur = await conn.execute(
        """
        UPDATE queue_jobs j
        SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => %s), updated_at = now()
        FROM unnest(%s::bigint[], %s::uuid[]) AS d(id, token)
        WHERE j.id = d.id AND j.processing_token = d.token AND j.status = 'processing'
        RETURNING j.processing_token
        """,
        (lease_seconds, ids, tokens),
    )
    return {row[0] for row in await cur.fetchall()}


async def set_progress(conn: Conn, job_id: int, token: UUID, progress: dict[str, Any]) -> bool:
    cur = await conn.execute(
        """UPDATE queue_jobs SET progress = %s, updated_at = now()
           WHERE id = %s AND processing_token = %s AND status = 'processing'""",
        (Jsonb(progress), job_id, token),
    )
    return cur.rowcount == 1


async def next_runnable_in(conn: Executor, horizon: datetime | None = None) -> float | None:
    """Seconds until the next pending job becomes runnable (<= 0: runnable now), or None.

    Only jobs due by ``horizon`` (or now, when it is earlier or None) count: a
    burst worker waits for the retries it scheduled itself, not for jobs planned
    for tomorrow.
    """
    cur = await conn.execute(
        """SELECT extract(epoch FROM min(run_at) - now())::float8 FROM queue_jobs
           WHERE status = 'pending' AND run_at <= greatest(now(), %s::timestamptz)""",
        (horizon,),
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else float(row[0])


# --------------------------------------------------------------------------- finish

async def complete_many(conn: Executor, done: Sequence[tuple[int, UUID, Any]]) -> set[int]:
    """Mark jobs completed (with their results) if their tokens still hold; returns the ids written."""
    if not done:
        return set()
    ids, tokens, results = _split_done(done)
    cur = await conn.execute(_COMPLETE, {"ids": ids, "tokens": tokens, "results": results, "processing": "processing"})
    return {row[0] for row in await cur.fetchall()}


def _split_done(done: Sequence[tuple[int, UUID, Any]]) -> tuple[list[int], list[UUID], list[Jsonb | None]]:
    return (
        [d[0] for d in done],
        [d[1] for d in done],
        [None if d[2] is None else Jsonb(d[2]) for d in done],
    )


async def fail(
    conn: Conn, job: Job, error: str, *, permanent: bool, retry_delay: float
) -> FailOutcome | None:
    """Record a failed run: back to pending after ``retry_delay`` seconds, or failed for good.

    Failed for good when the error is permanent or the attempts are used up.
    Returns None when the token no longer holds (the job was rescued or cancelled).
    """
    cur = await conn.execute(
        """
        UPDATE queue_jobs
        SET status = CASE WHEN %(permanent)s OR attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
            run_at = CASE WHEN %(permanent)s OR attempts >= max_attempts THEN run_at
                          ELSE now() + make_interval(secs => %(delay)s) END,
            finished_at = CASE WHEN %(permanent)s OR attempts >= max_attempts THEN now() END,
            last_error = %(error)s,
            lease_expires_at = NULL,
            locked_by = NULL,
            updated_at = now()
        WHERE id = %(id)s AND processing_token = %(token)s AND status = 'processing'
        RETURNING status, run_at, attempts
        """,
        {"permanent": permanent, "delay": retry_delay, "error": error[:8000], "id": job.id, "token": job.token},
    )
    row = await cur.fetchone()
    return FailOutcome(*row) if row else None


async def release(conn: Conn, jobs: Iterable[tuple[int, UUID]], reason: str) -> set[int]:
    """Hand running jobs back to pending without consuming their attempt (graceful shutdown)."""
    ids, tokens = _split(jobs)
    if not ids:
        return set()
    cur = await conn.execute(
        """
        UPDATE queue_jobs j
        SET status = 'pending', attempts = greatest(j.attempts - 1, 0), run_at = now(),
            locked_by = NULL, lease_expires_at = NULL, last_error = %s, updated_at = now()
        FROM unnest(%s::bigint[], %s::uuid[]) AS d(id, token)
        WHERE j.id = d.id AND j.processing_token = d.token AND j.status = 'processing'
        RETURNING j.id
        """,
        (reason, ids, tokens),
    )
    rows = await cur.fetchall()
    if rows:
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return {row[0] for row in rows}


# --------------------------------------------------------------------------- maintenance

async def rescue_expired(
    conn: Conn, *, retry_base: float, retry_max: float, limit: int = 500
) -> list[tuple[int, str, str, int, datetime]]:
    """Rescue jobs whose lease expired (their worker died or hung).

    The lost run consumed its attempt: the job goes back to pending after a
    backoff with jitter, or to failed when its attempts are used up. Returns
    (id, job_type, new status, attempts, run_at) per rescued job.
    """
    cur = await conn.execute(
        """
        WITH expired AS MATERIALIZED (
            SELECT id FROM queue_jobs
            WHERE status = 'processing' AND lease_expires_at < now()
            ORDER BY lease_expires_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE queue_jobs j
        SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END,
            run_at = CASE WHEN j.attempts >= j.max_attempts THEN j.run_at
                          ELSE now() + make_interval(secs => least(%(cap)s, %(base)s * 2 ^ greatest(j.attempts - 1, 0))
                                                             * (0.5 + random() / 2)) END,
            finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
            last_error = format('lease expired: worker %%s stopped heartbeating (attempt %%s of %%s)',
                                coalesce(j.locked_by, '?'), j.attempts, j.max_attempts),
            locked_by = NULL,
            lease_expires_at = NULL,
            updated_at = now()
        FROM expired
        WHERE j.id = expired.id
        RETURNING j.id, j.job_type, j.status, j.attempts, j.run_at
        """,
        {"limit": limit, "cap": retry_max, "base": retry_base},
    )
    return [tuple(row) for row in await cur.fetchall()]  # type: ignore[misc]


async def prune(conn: Conn, retention_seconds: float, batch: int = 1000) -> int:
    """Delete one batch (at most ``batch`` rows) of finished jobs older than the retention period.

    Returns the rows deleted; call again until it returns 0. The batch is picked in
    a materialized CTE so the LIMIT holds (a ``WHERE id IN (… LIMIT … SKIP LOCKED)``
    subquery may be re-evaluated and delete more).
    """
    cur = await conn.execute(
        """
        WITH old AS MATERIALIZED (
            SELECT id FROM queue_jobs
            WHERE status IN ('completed', 'failed', 'cancelled')
              AND finished_at < now() - make_interval(secs => %s)
            ORDER BY finished_at
            LIMIT %s
            FOR UPDATE SKIP LOCKED)
        DELETE FROM queue_jobs j USING old WHERE j.id = old.id
        """,
        (retention_seconds, batch),
    )
    return cur.rowcount


async def cancel(conn: Conn, job_id: int) -> str:
    """Cancel a pending or running job. A running job's worker notices at its next heartbeat."""
    cur = await conn.execute(
        """UPDATE queue_jobs SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                  updated_at = now(), last_error = coalesce(last_error, 'cancelled by operator')
           WHERE id = %s AND status IN ('pending', 'processing')
           RETURNING status""",
        (job_id,),
    )
    if await cur.fetchone():
        return "cancelled"
    status = await _status_of(conn, job_id)
    raise QueueError(f"job {job_id} is {status}; only pending or processing jobs can be cancelled")


async def retry(conn: Conn, job_id: int | None = None) -> list[int]:
    """Put a failed or cancelled job (or, with no id, every failed job) back to pending with fresh attempts."""
    where = "id = %s AND status IN ('failed', 'cancelled')" if job_id is not None else "status = 'failed'"
    params: tuple[Any, ...] = (job_id,) if job_id is not None else ()
    try:
        async with conn.transaction():
            cur = await conn.execute(
                f"""UPDATE queue_jobs SET status = 'pending', attempts = 0, run_at = now(), finished_at = NULL,
                           locked_by = NULL, lease_expires_at = NULL, updated_at = now()
                    WHERE {where}
                      AND NOT EXISTS (SELECT 1 FROM queue_jobs live
                                      WHERE live.dedup_key = queue_jobs.dedup_key
                                        AND live.status IN ('pending', 'processing'))
                    RETURNING id""",
                params,
            )
            ids = [row[0] for row in await cur.fetchall()]
    except psycopg.errors.UniqueViolation as exc:
        raise QueueError("two of these jobs share a dedup key; retry them one at a time") from exc
    if ids:
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    elif job_id is not None:
        status = await _status_of(conn, job_id)
        if status in ("failed", "cancelled"):
            raise QueueError(f"job {job_id} has the same dedup key as a job that is already pending or running")
        raise QueueError(f"job {job_id} is {status}; only failed or cancelled jobs can be retried")
    return sorted(ids)


async def _status_of(conn: Conn, job_id: int) -> str:
    cur = await conn.execute("SELECT status FROM queue_jobs WHERE id = %s", (job_id,))
    row = await cur.fetchone()
    return row[0] if row else "not found"


# --------------------------------------------------------------------------- inspection

async def stats(conn: Conn) -> list[dict[str, Any]]:
    cur = await conn.execute(
        "SELECT job_type, status, jobs, oldest_pending_age, next_run_at FROM queue_stats ORDER BY job_type, status"
    )
    cols = [c.name for c in cur.description or ()]
    return [dict(zip(cols, row, strict=True)) for row in await cur.fetchall()]


async def recent_failures(conn: Conn, since_seconds: float = 3600) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM queue_failures WHERE finished_at > now() - make_interval(secs => %s)",
        (since_seconds,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def list_jobs(
    conn: Conn, *, status: str | None = None, job_type: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    cur = await conn.execute(
        """SELECT id, job_type, status, priority, attempts, max_attempts, run_at, user_id, dedup_key,
                  locked_by, last_error, updated_at
           FROM queue_jobs
           WHERE (%(status)s::text IS NULL OR status = %(status)s)
             AND (%(type)s::text IS NULL OR job_type = %(type)s)
           ORDER BY id DESC LIMIT %(limit)s""",
        {"status": status, "type": job_type, "limit": limit},
    )
    cols = [c.name for c in cur.description or ()]
    return [dict(zip(cols, row, strict=True)) for row in await cur.fetchall()]


def _split(jobs: Iterable[tuple[int, UUID]]) -> tuple[list[int], list[UUID]]:
    ids: list[int] = []
    tokens: list[UUID] = []
    for job_id, token in jobs:
        ids.append(job_id)
        tokens.append(token)
    return ids, tokens

