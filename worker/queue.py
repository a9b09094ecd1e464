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
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg.pq import Format
from psycopg.rows import class_row, dict_row
from psycopg.types.json import set_json_loads

from briefs.backoff import job_retry
from briefs.settings import Settings

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "briefs_queue"
DEFAULT_PRIORITY = 100
FINISHED = ("completed", "failed", "cancelled")

# What one job may hold. The payload limit is BRIEFS_MAX_PAYLOAD_BYTES (callers pass
# settings.max_payload_bytes; this default is the setting's). The others keep a row
# insertable (index entries, column types) and readable back by every worker.
DEFAULT_MAX_PAYLOAD_BYTES: int = Settings.model_fields["max_payload_bytes"].default
MAX_PAYLOAD_DEPTH = 64  # nesting of objects and arrays in a payload
MAX_JOB_TYPE_CHARS = 200
MAX_DEDUP_KEY_BYTES = 1000  # the unique index refuses entries over ~2.7 kB
MAX_ERROR_CHARS = 8000  # of last_error
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1

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
    # Set when the claimed row could not be read (a value Python cannot represent, JSON it
    # cannot parse): the reason. The unreadable fields hold placeholders; the worker fails the
    # job at once, permanently, without running it.
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class FailOutcome:
    status: str  # 'pending' (will retry) or 'failed'
    run_at: datetime | None  # when it will be retried (None when failed for good)
    attempts: int


class Rescued(NamedTuple):
    """A job whose expired lease :func:`rescue_expired` took back."""

    id: int
    job_type: str
    status: str  # 'pending' (will retry) or 'failed' (attempts used up)
    attempts: int
    run_at: datetime | None  # when it will be retried (None when failed)


class QueueError(RuntimeError):
    """An operator action that cannot be done (message is for humans)."""


class JobRejected(QueueError):
    """A job that cannot be enqueued as given (payload too big, not JSON, a field out of range)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A job of a bulk enqueue that was refused (and not inserted); the others went in."""

    index: int  # position in the list given to enqueue_many
    job_type: str  # shortened for messages
    reason: str


class EnqueueResult(list[int | None]):
    """Per input job: the new id, or None (deduplicated, or refused: see ``rejected``)."""

    rejected: list[Rejected]

    def __init__(self, ids: Iterable[int | None] = (), rejected: list[Rejected] | None = None) -> None:
        super().__init__(ids)
        self.rejected = rejected or []


class JsonText(str):
    """JSON text already checked by :func:`dump_json`: PostgreSQL will accept it as jsonb."""

    __slots__ = ()


def dump_json(value: Any, *, limit: int | None = None, max_depth: int | None = None) -> JsonText:
    """Encode ``value`` as JSON that PostgreSQL's jsonb accepts, or raise ValueError saying why not.

    Refused: what is not JSON (NaN and infinities, non-JSON types, cycles, integers
    past Python's digit limit), NUL characters (jsonb cannot hold ``\\u0000``), unpaired
    surrogates (not UTF-8), nesting deeper than ``max_depth``, more than ``limit`` bytes.
    """
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise ValueError("is nested too deeply to encode as JSON") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"is not JSON ({_clip(str(exc), 200)})") from None
    if "\\u0000" in text and _has_nul_escape(text):
        raise ValueError("contains a NUL character (\\u0000), which PostgreSQL cannot store")
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode())
        except UnicodeEncodeError:
            raise ValueError("contains an unpaired surrogate (not valid UTF-8)") from None
    if limit is not None and size > limit:
        raise ValueError(f"is {size:,} bytes of JSON, over the limit of {limit:,} bytes")
    if max_depth is not None and text.count("[") + text.count("{") > max_depth and _depth(value, max_depth) > max_depth:
        raise ValueError(f"is nested more than {max_depth} levels deep")
    return JsonText(text)


def _has_nul_escape(text: str) -> bool:
    """A real ``\\u0000`` escape (an even number of backslashes before it), not the text ``\\\\u0000``."""
    start = 0
    while (at := text.find("\\u0000", start)) >= 0:
        slashes = 0
        while at - slashes - 1 >= 0 and text[at - slashes - 1] == "\\":
            slashes += 1
        if slashes % 2 == 0:
            return True
        start = at + 1
    return False


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of containers in ``value``, counted no further than ``limit + 1`` (iterative)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
    return deepest


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for messages, cut to about ``limit`` characters."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    return _clip(repr(value), limit)


def safe_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Text PostgreSQL can store in a text column: cut to ``limit``, no NUL, valid UTF-8."""
    text = _clip(text, limit)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


MAX_RETRY_DELAY = 30 * 86400.0  # the longest a retry may be put off (a handler's RetryLater included)


def clamp_delay(seconds: Any) -> float:
    """A retry delay PostgreSQL can add to now(): finite, from 0 to :data:`MAX_RETRY_DELAY` seconds.

    ``make_interval`` silently wraps around on huge values (a retry in the distant past).
    """
    try:
        value = float(seconds)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if math.isnan(value):
        return 0.0
    return min(max(value, 0.0), MAX_RETRY_DELAY)


# --------------------------------------------------------------------------- enqueue

_ENQUEUE = """
INSERT INTO queue_jobs (job_type, payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at)
SELECT t.job_type, t.payload::jsonb, t.priority, coalesce(t.run_at, now()), t.max_attempts,
       t.dedup_key, t.user_id, t.notify_at
FROM unnest(%s::text[], %s::text[], %s::smallint[], %s::timestamptz[], %s::int[],
            %s::text[], %s::bigint[], %s::timestamptz[])
     AS t(job_type, payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at)
ON CONFLICT DO NOTHING
RETURNING id, dedup_key
"""

# The insert and its NOTIFY in one statement: one round trip, one commit. ``woke`` calls pg_notify
# once, and only when a row went in (a deduplicated job wakes nobody); the cross join with its one
# row of count makes the statement run it (a CTE nobody reads is never run).
_ENQUEUE_AND_NOTIFY = f"""
WITH ins AS ({_ENQUEUE}),
woke AS MATERIALIZED (SELECT pg_notify(%s, '') FROM (SELECT FROM ins WHERE %s LIMIT 1) one)
SELECT ins.id, ins.dedup_key FROM ins CROSS JOIN (SELECT count(*) FROM woke) w
"""


# One job: plain parameters rather than arrays (cheaper to send and to plan); its NOTIFY in the same
# statement, once per row inserted: none when the job was deduplicated.
_ENQUEUE_ONE = """
WITH ins AS (
    INSERT INTO queue_jobs (job_type, payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at)
    VALUES (%(job_type)s::text, %(payload)s::jsonb, %(priority)s::smallint,
            coalesce(%(run_at)s::timestamptz, now()), %(max_attempts)s::int, %(dedup_key)s::text,
            %(user_id)s::bigint, %(notify_at)s::timestamptz)
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') FROM ins
"""


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _storable_text(value: str) -> bool:
    return "\x00" not in value and (value.isascii() or _utf8(value))


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_job(job: NewJob, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> JsonText:
    """The job's payload as JSON text, or :class:`JobRejected` saying what is wrong with the job.

    Every field is checked against what the table and the workers accept, so one bad job
    cannot fail a bulk insert for the others, and a job that goes in can be read back.
    """
    kind = job.job_type
    if not isinstance(kind, str) or not kind or len(kind) > MAX_JOB_TYPE_CHARS or not _storable_text(kind):
        raise JobRejected(f"job type {short_repr(kind)} must be a non-empty string of at most "
                          f"{MAX_JOB_TYPE_CHARS} characters")
    name = short_repr(kind, 60)
    if not isinstance(job.payload, dict):
        raise JobRejected(f"{name} job: payload must be a JSON object, not {type(job.payload).__name__}")
    try:
        payload = dump_json(job.payload, limit=max_payload_bytes, max_depth=MAX_PAYLOAD_DEPTH)
    except ValueError as exc:
        hint = " (BRIEFS_MAX_PAYLOAD_BYTES)" if "over the limit" in str(exc) else ""
        raise JobRejected(f"{name} job: payload {exc}{hint}") from None
    if not _int_in(job.priority, -(2**15), 2**15 - 1):
        raise JobRejected(f"{name} job: priority must be an integer from -32768 to 32767, "
                          f"got {short_repr(job.priority)}")
    if job.max_attempts is not None and not _int_in(job.max_attempts, 1, INT4_MAX):
        raise JobRejected(f"{name} job: max_attempts must be a positive integer (at most {INT4_MAX}), "
                          f"got {short_repr(job.max_attempts)}")
    if job.user_id is not None and not _int_in(job.user_id, -INT8_MAX - 1, INT8_MAX):
        raise JobRejected(f"{name} job: user_id must be a 64-bit integer, got {short_repr(job.user_id)}")
    for field_name in ("run_at", "notify_at"):
        value = getattr(job, field_name)
        if value is not None and not isinstance(value, datetime):
            raise JobRejected(f"{name} job: {field_name} must be a datetime, got {short_repr(value)}")
    key = job.dedup_key
    if key is not None:
        if not isinstance(key, str) or not _storable_text(key):
            raise JobRejected(f"{name} job: dedup_key must be text without NUL characters, got {short_repr(key)}")
        size = len(key) if key.isascii() else len(key.encode())
        if size > MAX_DEDUP_KEY_BYTES:
            raise JobRejected(f"{name} job: dedup_key is {size:,} bytes, over the limit of {MAX_DEDUP_KEY_BYTES:,}")
    return payload


async def enqueue_many(
    conn: Conn,
    jobs: Sequence[NewJob],
    *,
    default_max_attempts: int = 5,
    notify: bool = True,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> EnqueueResult:
    """Insert jobs with one statement; returns, per input, the new id or None.

    None means deduplicated (a job whose ``dedup_key`` matches a live (pending or
    running) job, or an earlier job of the same batch, is not inserted) or refused:
    a job that fails :func:`check_job` (a payload over ``max_payload_bytes``, pass
    ``settings.max_payload_bytes``; not a JSON object; a field out of range) is not
    inserted, never truncated; it is logged and listed in the result's ``rejected``,
    and the other jobs go in. One NOTIFY, sent by the same statement when a job went in,
    wakes idle workers when the transaction commits.
    """
    result = EnqueueResult()
    if not jobs:
        return result
    accepted, positions = _accept(jobs, max_payload_bytes, result.rejected)
    ids: list[int | None] = [None] * len(jobs)
    if not accepted:
        result.extend(ids)
        return result
    cur = await conn.execute(
        _ENQUEUE_AND_NOTIFY,
        (
            [j.job_type for j, _ in accepted],
            [p for _, p in accepted],
            [j.priority for j, _ in accepted],
            [j.run_at for j, _ in accepted],
            [j.max_attempts or default_max_attempts for j, _ in accepted],
            [j.dedup_key for j, _ in accepted],
            [j.user_id for j, _ in accepted],
            [j.notify_at for j, _ in accepted],
            NOTIFY_CHANNEL, notify,
        ),
    )
    rows = await cur.fetchall()
    by_key = {key: id_ for id_, key in rows if key is not None}
    keyless = iter(id_ for id_, key in rows if key is None)
    for (job, _), index in zip(accepted, positions, strict=True):
        if job.dedup_key is None:
            ids[index] = next(keyless)
        else:
            ids[index] = by_key.pop(job.dedup_key, None)  # pop: a batch duplicate gets None
    result.extend(ids)
    return result


def _accept(
    jobs: Sequence[NewJob], max_payload_bytes: int, rejected: list[Rejected]
) -> tuple[list[tuple[NewJob, JsonText]], list[int]]:
    """The jobs :func:`check_job` accepts, with their payloads, and their positions in ``jobs``;
    the others are logged and added to ``rejected``."""
    accepted: list[tuple[NewJob, JsonText]] = []
    positions: list[int] = []
    for index, job in enumerate(jobs):
        try:
            payload = check_job(job, max_payload_bytes=max_payload_bytes)
        except JobRejected as exc:
            kind = job.job_type if isinstance(job.job_type, str) else "?"
            rejected.append(Rejected(index, _clip(kind, 60), str(exc)))
            log.warning("refused to enqueue job %d of %d: %s", index + 1, len(jobs), exc)
            continue
        accepted.append((job, payload))
        positions.append(index)
    return accepted, positions


async def enqueue(
    conn: Conn, job: NewJob, *, default_max_attempts: int = 5, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> int | None:
    """Insert one job; the new id, or None when deduplicated. Raises :class:`JobRejected` for a bad job.

    One statement (the insert and its NOTIFY): on an autocommit connection, one round trip and one commit.
    """
    try:
        payload = check_job(job, max_payload_bytes=max_payload_bytes)
    except JobRejected as exc:
        log.warning("refused to enqueue job 1 of 1: %s", exc)
        raise
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        _ENQUEUE_ONE,
        {"job_type": job.job_type, "payload": payload, "priority": job.priority, "run_at": job.run_at,
         "max_attempts": job.max_attempts or default_max_attempts, "dedup_key": job.dedup_key,
         "user_id": job.user_id, "notify_at": job.notify_at, "channel": NOTIFY_CHANNEL},
    )
    row = await cur.fetchone()
    return None if row is None else int(row["id"])


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


def _load_json(data: str | bytes) -> Any:
    """JSON from the database: ``{}`` (most payloads) without parsing, the rest without encoding sniffing.

    psycopg passes the raw value (bytes or a memoryview of them, despite its annotation).
    """
    if data == b"{}":
        return {}
    return json.loads(data if isinstance(data, str) else bytes(data).decode())


def prepare_hot_connection(conn: Conn) -> None:
    """Set up a connection opened with :data:`HOT_PATH_OPTIONS` (its JSON loader)."""
    set_json_loads(_load_json, conn)


_JOB_COLUMNS = (
    "j.id, j.job_type, j.payload, j.priority, j.attempts, j.max_attempts, j.dedup_key, "
    "j.user_id, j.notify_at, j.run_at, j.processing_token"
)

# A row whose payload is over this many times BRIEFS_MAX_PAYLOAD_BYTES is never sent to a worker: the claim
# fails it on the spot (reading and parsing it would stall the worker for every other job).
# A multiple of the enqueue cap, since jsonb's text of a payload can be larger than the JSON enqueued.
PAYLOAD_READ_FACTOR = 16

# What the claim returns per row; a row failed by the claim itself comes back without its
# payload and token (a token of None marks it).
_CLAIMED_COLUMNS = (
    "id, job_type, CASE WHEN claim_status = 'processing' THEN payload END AS payload, priority, attempts,"
    " max_attempts, dedup_key, user_id, notify_at, run_at,"
    " CASE WHEN claim_status = 'processing' THEN processing_token END AS processing_token"
)

# A picked row the claim fails instead of handing out (its id is in the CTE ``oversized``).
_OVERSIZED = "j.id = ANY(ARRAY(SELECT id FROM oversized))"

# One statement: pick (lock) the runnable rows in claim order, skipping rows other
# workers hold, then update them. Claim order is deadline first: priority, then the
# deadline (notify_at; a job without one has its run_at), then id. A brief started early
# (the scheduler does so when LLM capacity is short) is due before briefs that must be
# delivered sooner and does not overtake them. The ORDER BY is the expression of the index
# queue_jobs_claim_deadline (sql/0011_claim_deadline.sql), so the pick is an index scan that
# stops after LIMIT rows; run_at is in that index too, so a future job it steps over costs no
# heap visit. MATERIALIZED keeps the LIMIT exact. A row whose
# payload is too big to read is failed here instead, and not returned. Its size is what
# the worker would receive: pg_column_size() of a compressed value is its compressed size
# (50 MB of repeated text is stored in about 0.6 MB), so a compressed payload is measured
# as text (once per claimed row, in ``oversized``); an uncompressed one as stored.
_CLAIM_CTES = """
picked AS MATERIALIZED (
    SELECT id FROM queue_jobs
    WHERE status = 'pending' AND run_at <= now()
    ORDER BY priority, coalesce(notify_at, run_at), id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
oversized AS MATERIALIZED (
    SELECT id, size FROM (
        SELECT q.id, CASE WHEN pg_column_compression(q.payload) IS NULL THEN pg_column_size(q.payload)
                          ELSE octet_length(q.payload::text) END AS size
        FROM queue_jobs q WHERE q.id = ANY(ARRAY(SELECT id FROM picked))
    ) s
    WHERE size > %(max_read)s
),
claimed AS (
    UPDATE queue_jobs j
    SET status = CASE WHEN """ + _OVERSIZED + """ THEN 'failed' ELSE 'processing' END,
        attempts = least(j.attempts, 2147483646) + 1,
        locked_by = %(worker)s,
        processing_token = gen_random_uuid(),
        lease_expires_at = CASE WHEN """ + _OVERSIZED + """ THEN NULL
                                ELSE now() + make_interval(secs => %(lease)s) END,
        heartbeat_at = now(),
        started_at = now(),
        finished_at = CASE WHEN """ + _OVERSIZED + """ THEN now() END,
        last_error = CASE WHEN """ + _OVERSIZED + """
                          THEN format('payload is %%s bytes, over the %%s bytes a worker reads '
                                      '(%%s x BRIEFS_MAX_PAYLOAD_BYTES): failed without running',
                                      (SELECT size FROM oversized o WHERE o.id = j.id), %(max_read)s, %(factor)s)
                          ELSE j.last_error END,
        updated_at = now()
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING j.status AS claim_status, """ + _JOB_COLUMNS + """
)"""

_CLAIM = f"WITH {_CLAIM_CTES}\nSELECT {_CLAIMED_COLUMNS} FROM claimed"

# Completions, fenced by the token. The status is a parameter on purpose: a generic
# plan cannot then match the partial lease index (which would read every running
# job to find these few) and looks each row up by primary key instead.
_COMPLETE = """
    UPDATE queue_jobs j
    SET status = 'completed', result = d.result::jsonb, finished_at = now(), updated_at = now(),
        lease_expires_at = NULL, last_error = NULL
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(results)s::text[]) AS d(id, token, result)
    WHERE j.id = d.id AND j.processing_token = d.token AND j.status = %(processing)s
    RETURNING j.id"""

_COMPLETE_AND_CLAIM = f"""
WITH done AS ({_COMPLETE}),
{_CLAIM_CTES}
SELECT {_CLAIMED_COLUMNS}, NULL::bigint[] FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, (SELECT array_agg(id) FROM done)
"""


async def claim(
    conn: Executor, limit: int, worker_id: str, lease_seconds: float, *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Claimed:
    """Claim up to ``limit`` runnable (due) jobs: lowest priority first, then earliest deadline, then id.

    The deadline is ``notify_at`` (a brief's delivery), or ``run_at`` for a job without one: among
    due jobs of a priority, a brief to deliver sooner runs first even if another became due earlier.
    A job not yet due is never claimed, however early its deadline.

    A picked row whose payload is over ``PAYLOAD_READ_FACTOR * max_payload_bytes``
    is failed by the same statement (the reason in ``last_error``) and not returned, so
    fewer than ``limit`` jobs may come back while more are runnable.
    """
    if limit <= 0:
        return Claimed()
    cur = await conn.execute(_CLAIM, {"limit": limit, "worker": worker_id, "lease": lease_seconds,
                                      **_read_limit(max_payload_bytes)})
    try:
        jobs = [_job(row) for row in await cur.fetchall()]
    except Exception:  # one value that cannot be decoded fails the whole fetch: read row by row
        rows, problems = _fetch_tolerant(cur)
        jobs = [_job(row, problems.get(i)) for i, row in enumerate(rows)]
    return _claimed(jobs)


class Claimed(list[Job]):
    """Claimed jobs in claim order; ``refused``: (id, job_type) of rows the claim failed (payload too big)."""

    refused: list[tuple[int, str]]

    def __init__(self, jobs: Iterable[Job] = (), refused: list[tuple[int, str]] | None = None) -> None:
        super().__init__(jobs)
        self.refused = refused or []


def _claimed(jobs: list[Job]) -> Claimed:
    return Claimed(sorted((job for job in jobs if job.token is not None), key=_claim_order),
                   [(job.id, job.job_type) for job in jobs if job.token is None])


async def complete_and_claim(
    conn: Executor, done: Sequence[tuple[int, UUID, Any]], limit: int, worker_id: str, lease_seconds: float, *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[set[int], Claimed]:
    """:func:`complete_many` and :func:`claim` in one statement: one round trip, one commit.

    A worker whose slot just freed has both to do; doing them together halves the
    statements and commits on the hot path. Returns (ids completed, jobs claimed);
    ``limit`` may be 0 (complete only). As in :func:`complete_many`, only a run whose
    token still holds is written (one id twice, two runs of a job: one at most).
    """
    if not done:
        return set(), await claim(conn, limit, worker_id, lease_seconds, max_payload_bytes=max_payload_bytes)
    ids, tokens, results = _split_done(done)
    cur = await conn.execute(
        _COMPLETE_AND_CLAIM,
        {"ids": ids, "tokens": tokens, "results": results, "processing": "processing", "limit": max(limit, 0),
         "worker": worker_id, "lease": lease_seconds, **_read_limit(max_payload_bytes)},
    )
    problems: dict[int, str] = {}
    try:
        rows: list[tuple[Any, ...]] = await cur.fetchall()
    except Exception:  # as in claim(): the rows that can be read run, the others fail alone
        rows, problems = _fetch_tolerant(cur)
    # The last row carries the ids completed (in the column after the job's); the others are jobs.
    *claimed_rows, (*_, completed_ids) = rows
    jobs = [_job(row, problems.get(i)) for i, row in enumerate(claimed_rows)]
    return set(completed_ids or ()), _claimed(jobs)


def _read_limit(max_payload_bytes: int) -> dict[str, int]:
    return {"max_read": PAYLOAD_READ_FACTOR * max_payload_bytes, "factor": PAYLOAD_READ_FACTOR}


_SOME_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def _job(row: Sequence[Any], problem: str | None = None) -> Job:
    """A claimed job from a row that starts with :data:`_CLAIMED_COLUMNS` (those of ``complete_and_claim``
    have one more column). A row read by :func:`_fetch_tolerant` with a ``problem`` holds placeholders
    where its values could not be read: the job is failed without running."""
    (id_, job_type, payload, priority, attempts, max_attempts, dedup_key, user_id, notify_at, run_at, token,
     *_) = row
    if problem is not None:
        payload = payload if isinstance(payload, dict) else {}
        notify_at = notify_at if isinstance(notify_at, datetime) else None
        run_at = run_at if isinstance(run_at, datetime) else _SOME_TIME
        problem = f"the job's row cannot be read: {problem}"
    return Job(id=id_, job_type=job_type, payload=payload, priority=priority, attempts=attempts,
               max_attempts=max_attempts, dedup_key=dedup_key, user_id=user_id, notify_at=notify_at,
               run_at=run_at, token=token, problem=problem)


def _fetch_tolerant(cur: psycopg.AsyncCursor[Any]) -> tuple[list[tuple[Any, ...]], dict[int, str]]:
    """Every row of the cursor's result, value by value: the slow path after a failed fetch.

    psycopg decodes a result set as a whole, so one value it cannot decode (a timestamp
    past year 9999 or ``infinity``, JSON nested deeper than Python parses, a number with
    thousands of digits) fails the fetch of every row. Here each value is decoded on its
    own; one that fails is replaced with its text (decoded leniently), and the row's index
    maps to a description of what failed (column and reason). NULLs stay None.
    """
    res = cur.pgresult
    if res is None:
        raise psycopg.InterfaceError("no result to fetch")
    adapters = cur.adapters
    loaders = []
    for col in range(res.nfields):
        oid, fmt = res.ftype(col), Format(res.fformat(col))
        loader_cls = adapters.get_loader(oid, fmt) or adapters.get_loader(0, fmt)
        loaders.append(loader_cls(oid, cur) if loader_cls is not None else None)
    names = [(res.fname(col) or b"?").decode(errors="replace") for col in range(res.nfields)]
    rows: list[tuple[Any, ...]] = []
    problems: dict[int, str] = {}
    for row in range(res.ntuples):
        values: list[Any] = []
        bad: list[str] = []
        for col, loader in enumerate(loaders):
            raw = res.get_value(row, col)
            if raw is None:
                values.append(None)
                continue
            try:
                if loader is None:
                    raise psycopg.DataError("no loader for this type")
                values.append(loader.load(raw))
            except Exception as exc:  # RecursionError, ValueError, DataError, …: the value is the problem
                values.append(bytes(raw).decode("utf-8", "replace"))
                bad.append(f"{names[col]}: {_clip(_describe(exc), 300)}")
        rows.append(tuple(values))
        if bad:
            problems[row] = "; ".join(bad)
    return rows, problems


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _claim_order(job: Job) -> tuple[int, datetime, int]:
    """The claim's ORDER BY (priority, coalesce(notify_at, run_at), id): the UPDATE returns rows in no order."""
    return (job.priority, job.notify_at or job.run_at, job.id)


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
    return {token for (token,) in await cur.fetchall()}


async def set_progress(conn: Conn, job_id: int, token: UUID, progress: dict[str, Any]) -> bool:
    """Publish a running job's progress; False when the run is no longer ours or the value cannot be stored.

    Progress is advisory: a value PostgreSQL would refuse (NaN, a NUL character, …) is
    logged and skipped before any statement runs, so the caller's transaction stays usable.
    """
    try:
        text = dump_json(progress)
    except ValueError as exc:
        log.warning("progress of job %s not written: it %s", job_id, exc)
        return False
    cur = await conn.execute(
        """UPDATE queue_jobs SET progress = %s::jsonb, updated_at = now()
           WHERE id = %s AND processing_token = %s AND status = 'processing'""",
        (text, job_id, token),
    )
    return cur.rowcount == 1


async def next_runnable_in(conn: Executor, horizon: datetime | None = None) -> float | None:
    """Seconds until the next pending job becomes runnable (<= 0: runnable now), or None.

    Only jobs due by ``horizon`` (or now, when it is earlier or None) count: a
    burst worker waits for the retries it scheduled itself, not for jobs planned
    for tomorrow.
    """
    cur = await conn.execute(
        """SELECT (extract(epoch FROM min(run_at)) - extract(epoch FROM now()))::float8 FROM queue_jobs
           WHERE status = 'pending' AND run_at <= greatest(now(), %s::timestamptz)""",
        (horizon,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    (seconds,) = row
    return None if seconds is None else float(seconds)


# The earliest pending job due after a moment (the worker's last claim): the index queue_jobs_claim
# (priority, run_at, id), kept for this query now that the claim reads queue_jobs_claim_deadline, leads
# with priority, so a plain min(run_at) would read every pending row. A loose index scan instead: each
# priority in use (one index probe per priority, skipping from one to the next), then the first future
# run_at within it (one probe each). Times are the database's: the delay is computed against its now().
_NEXT_DUE = """
WITH RECURSIVE p AS (
    (SELECT priority FROM queue_jobs WHERE status = 'pending' ORDER BY priority LIMIT 1)
    UNION ALL
    SELECT (SELECT q.priority FROM queue_jobs q WHERE q.status = 'pending' AND q.priority > p.priority
            ORDER BY q.priority LIMIT 1)
    FROM p WHERE p.priority IS NOT NULL
)
SELECT (extract(epoch FROM min(n.run_at)) - extract(epoch FROM now()))::float8 AS seconds
FROM p CROSS JOIN LATERAL (
    SELECT q.run_at FROM queue_jobs q
    WHERE q.status = 'pending' AND q.priority = p.priority AND q.run_at > now() - make_interval(secs => %s)
    ORDER BY q.run_at LIMIT 1) n
"""


async def next_due_in(conn: Executor, since: float = 0.0) -> float | None:
    """Seconds (0: due already; maybe ``inf``) until the earliest pending job due later than ``since``
    seconds ago, or None.

    What an idle worker sets its timer by, so a job scheduled for T starts at T rather than at
    the next poll. ``since`` covers the time since its last claim: a job that came due between
    that claim and this call was not claimable then and is due now (0), not forgotten. Jobs due
    before that are the claim's to take (or locked by another worker): not counted, or a job
    locked elsewhere would wake the worker again and again. Index probes only (a few per
    priority in use), whatever the number of pending jobs.
    """
    cur = await conn.execute(_NEXT_DUE, (clamp_delay(since),))
    row = await cur.fetchone()
    if row is None:
        return None
    (seconds,) = row
    if seconds is None or math.isnan(seconds):
        return None
    return max(float(seconds), 0.0)


# --------------------------------------------------------------------------- finish

async def complete_many(conn: Executor, done: Sequence[tuple[int, UUID, Any]]) -> set[int]:
    """Mark jobs completed (with their results) if their tokens still hold; returns the ids written.

    A result is any JSON value (None: no result) or :class:`JsonText` from :func:`dump_json`
    (sent as it is). A result :func:`dump_json` refuses raises ValueError before any statement.
    """
    if not done:
        return set()
    ids, tokens, results = _split_done(done)
    cur = await conn.execute(_COMPLETE, {"ids": ids, "tokens": tokens, "results": results, "processing": "processing"})
    return {job_id for (job_id,) in await cur.fetchall()}


def _split_done(done: Sequence[tuple[int, UUID, Any]]) -> tuple[list[int], list[UUID], list[str | None]]:
    ids: list[int] = []
    tokens: list[UUID] = []
    results: list[str | None] = []
    for job_id, token, result in done:
        ids.append(job_id)
        tokens.append(token)
        results.append(result if result is None or isinstance(result, JsonText) else dump_json(result))
    return ids, tokens, results


async def fail(
    conn: Conn, job: Job, error: str, *, permanent: bool, retry_delay: float, refund: bool = False
) -> FailOutcome | None:
    """Record a failed run: back to pending after ``retry_delay`` seconds, or failed for good.

    Failed for good when the error is permanent or the attempts are used up. ``refund``: the run was
    deferred, not failed (the handler said "not now"): the attempt is given back, so the job is pending
    again whatever its attempts (a deferral is never the last straw).
    Returns None when the token no longer holds (the job was rescued or cancelled).
    """
    cur = conn.cursor(row_factory=class_row(FailOutcome))
    # Every expression reads the row as it was: the attempts compared are those before any refund.
    await cur.execute(
        """
        UPDATE queue_jobs
        SET status = CASE WHEN %(permanent)s OR (NOT %(refund)s AND attempts >= max_attempts)
                          THEN 'failed' ELSE 'pending' END,
            run_at = CASE WHEN %(permanent)s OR (NOT %(refund)s AND attempts >= max_attempts)
                          THEN run_at ELSE now() + make_interval(secs => %(delay)s) END,  -- see retry_delay()
            attempts = CASE WHEN %(refund)s AND NOT %(permanent)s THEN greatest(attempts - 1, 0) ELSE attempts END,
            finished_at = CASE WHEN %(permanent)s OR (NOT %(refund)s AND attempts >= max_attempts)
                               THEN now() END,
            last_error = %(error)s,
            lease_expires_at = NULL,
            locked_by = NULL,
            updated_at = now()
        WHERE id = %(id)s AND processing_token = %(token)s AND status = 'processing'
        RETURNING status, CASE WHEN status = 'pending' THEN run_at END AS run_at, attempts
        """,
        {"permanent": permanent, "refund": refund, "delay": clamp_delay(retry_delay), "error": safe_text(error),
         "id": job.id, "token": job.token},
    )
    return await cur.fetchone()


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
        (safe_text(reason), ids, tokens),
    )
    released = {job_id for (job_id,) in await cur.fetchall()}
    if released:
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return released


# --------------------------------------------------------------------------- maintenance

# The rescue: expired leases (and leases no worker takes) back to pending after the job
# retry backoff (``{backoff}``: :meth:`briefs.backoff.Backoff.sql`), or failed when used up.
_RESCUE = """
WITH expired AS MATERIALIZED (
    SELECT id FROM queue_jobs
    WHERE status = 'processing'
      AND (lease_expires_at < now() OR lease_expires_at > now() + make_interval(secs => %(max_lease)s))
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE queue_jobs j
SET status = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END,
    run_at = CASE WHEN j.attempts >= j.max_attempts THEN j.run_at
                  ELSE now() + make_interval(secs => {backoff}) END,
    finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
    last_error = CASE WHEN j.lease_expires_at < now()
                      THEN format('lease expired: worker %%s stopped heartbeating (attempt %%s of %%s)',
                                  coalesce(left(j.locked_by, 200), '?'), j.attempts, j.max_attempts)
                      ELSE format('lease until %%s is not one a worker takes: rescued (attempt %%s of %%s)',
                                  j.lease_expires_at, j.attempts, j.max_attempts) END,
    locked_by = NULL,
    lease_expires_at = NULL,
    updated_at = now()
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.job_type, j.status, j.attempts, CASE WHEN j.status = 'pending' THEN j.run_at END AS run_at
"""


async def rescue_expired(
    conn: Conn, *, retry_base: float, retry_max: float, limit: int = 500, max_lease: float = 86400.0
) -> list[Rescued]:
    """Rescue jobs whose lease expired (their worker died or hung).

    The lost run consumed its attempt: the job goes back to pending after the job
    retry backoff (:func:`briefs.backoff.job_retry` of ``retry_base`` and ``retry_max``),
    or to failed when its attempts are used up. A lease that
    ends more than ``max_lease`` seconds from now (``infinity``, a bad manual edit)
    is no lease any worker took: it is rescued too, or the job would stay running
    forever. Returns the rescued jobs: their new status, attempts, and retry time.
    """
    policy = job_retry(retry_base, clamp_delay(retry_max))
    cur = conn.cursor(row_factory=class_row(Rescued))
    await cur.execute(
        _RESCUE.format(backoff=policy.sql("j.attempts")),
        {"limit": limit, "max_lease": clamp_delay(max_lease), **policy.sql_params()},
    )
    return await cur.fetchall()


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


async def retry(conn: Conn, job_id: int | None = None, *, job_type: str | None = None) -> list[int]:
    """Put a failed or cancelled job (or, with no id, every failed job, of ``job_type`` only when given)
    back to pending with fresh attempts."""
    if job_id is not None:
        where = "id = %s AND status IN ('failed', 'cancelled')"
        params: tuple[Any, ...] = (job_id,)
    else:
        where = "status = 'failed' AND (%s::text IS NULL OR job_type = %s)"
        params = (job_type, job_type)
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
            ids = [job_id for (job_id,) in await cur.fetchall()]
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
    if row is None:
        return "not found"
    (status,) = row
    return str(status)


async def outcome(conn: Conn, job_id: int) -> tuple[str, str | None] | None:
    """(status, the first 500 characters of last_error) of a job, or None when it does not exist."""
    cur = await conn.execute("SELECT status, left(last_error, 500) FROM queue_jobs WHERE id = %s", (job_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    status, error = row
    return (status, error)


# --------------------------------------------------------------------------- inspection

async def stats(conn: Conn) -> list[dict[str, Any]]:
    """Jobs per type and status (what the ``queue_stats`` view shows), safe with any row in the table.

    Computed here rather than read from the view, which leaves a job due since ``-infinity``
    out of its age: here ``oldest_pending_age`` is a timedelta, ``timedelta.max`` for such a
    job (it is overdue, not absent). A ``next_run_at`` Python cannot represent comes back as its text.
    """
    cur = await conn.execute(
        """SELECT left(job_type, %(clip)s) AS job_type, status, count(*) AS jobs,
                  extract(epoch FROM now()) - min(extract(epoch FROM run_at))
                      FILTER (WHERE status = 'pending' AND run_at <= now()) AS oldest_pending_age,
                  min(run_at) FILTER (WHERE status = 'pending') AS next_run_at
           FROM queue_jobs GROUP BY queue_jobs.job_type, status ORDER BY queue_jobs.job_type, status""",
        {"clip": MAX_JOB_TYPE_CHARS},
    )
    rows = await _dict_rows(cur)
    for row in rows:
        row["oldest_pending_age"] = age_of(row["oldest_pending_age"])
    return rows


def age_of(seconds: Any) -> timedelta | None:
    """An age in seconds as SQL computes it from epochs: None for NULL or NaN, ``timedelta.max`` for an
    infinite one (a job due since ``-infinity``), never negative."""
    if seconds is None:
        return None
    value = float(seconds)
    if math.isnan(value):
        return None
    if value >= timedelta.max.total_seconds():
        return timedelta.max
    return timedelta(seconds=max(value, 0.0))


async def _dict_rows(cur: psycopg.AsyncCursor[Any]) -> list[dict[str, Any]]:
    """Rows as dicts; a value Python cannot represent (a timestamp past year 9999, …) comes back as its text."""
    cols = [c.name for c in cur.description or ()]
    try:
        rows = await cur.fetchall()
    except Exception:  # one bad value fails the whole fetch: read value by value
        rows = _fetch_tolerant(cur)[0]
    return [dict(zip(cols, row, strict=True)) for row in rows]


async def recent_failures(conn: Conn, since_seconds: float = 3600) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM queue_failures WHERE finished_at > now() - make_interval(secs => %s)",
        (since_seconds,),
    )
    row = await cur.fetchone()
    if row is None:
        return 0
    (failures,) = row
    return int(failures)


async def list_jobs(
    conn: Conn, *, status: str | None = None, job_type: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The newest jobs, for humans. Long texts are cut (``last_error`` to 2,000 characters); a
    timestamp Python cannot represent (``infinity``, past year 9999) comes back as its text."""
    cur = await conn.execute(
        """SELECT id, left(job_type, %(clip)s) AS job_type, status, priority, attempts, max_attempts, run_at,
                  user_id, left(dedup_key, %(clip)s) AS dedup_key, left(locked_by, %(clip)s) AS locked_by,
                  left(last_error, 2000) AS last_error, updated_at
           FROM queue_jobs
           WHERE (%(status)s::text IS NULL OR status = %(status)s)
             AND (%(type)s::text IS NULL OR job_type = %(type)s)
           ORDER BY id DESC LIMIT %(limit)s""",
        {"status": status, "type": job_type, "limit": limit, "clip": MAX_JOB_TYPE_CHARS},
    )
    return await _dict_rows(cur)


def _split(jobs: Iterable[tuple[int, UUID]]) -> tuple[list[int], list[UUID]]:
    ids: list[int] = []
    tokens: list[UUID] = []
    for job_id, token in jobs:
        ids.append(job_id)
        tokens.append(token)
    return ids, tokens

