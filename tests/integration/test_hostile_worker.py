"""Hostile rows, payloads, results and errors: the worker never stops, stalls or mis-blames.

Bad rows are inserted straight into ``queue_jobs`` (as a bug, an operator or an
older release could leave them) next to innocent jobs, and a real worker drains
the queue in burst mode. For every bad row: it fails alone, at once (one attempt),
permanently, with a reason in ``last_error`` that names the real cause; everything
else completes; the worker returns normally (it does not crash); no lease expires.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from briefs.db import Database
from briefs.errors import PermanentError, RetryLater, is_permanent
from briefs.health import HealthServer
from tests import handlers_for_tests as th
from tests.conftest import make_settings, rescue_continuously
from worker import queue
from worker.handlers import builtin_handlers
from worker.queue import NewJob
from worker.runner import Handler, JobContext, Worker, WorkerStats

# --------------------------------------------------------------------------- handlers that misbehave


async def overflow(ctx: JobContext) -> None:
    date.max + timedelta(days=1)  # a date out of range: OverflowError, the same on every retry


async def recursion(ctx: JobContext) -> None:
    raise RecursionError("maximum recursion depth exceeded")


async def data_error(ctx: JobContext) -> None:
    async with ctx.db.raw() as conn:
        await conn.execute("SELECT 'not a date'::date")  # SQLSTATE 22007: a data exception


async def nul_result(ctx: JobContext) -> dict[str, Any]:
    return {"text": "a\x00b"}


async def nan_result(ctx: JobContext) -> dict[str, Any]:
    return {"score": float("nan")}


async def deep_result(ctx: JobContext) -> Any:
    value: Any = []
    for _ in range(5000):
        value = [value]
    return value


async def huge_result(ctx: JobContext) -> dict[str, Any]:
    return {"blob": "r" * 2_000_000}  # over 16 x BRIEFS_MAX_PAYLOAD_BYTES


async def nasty_message(ctx: JobContext) -> None:
    raise PermanentError("bad \x00 byte and a lone \ud800 surrogate " + "x" * 100_000)


async def far_retry(ctx: JobContext) -> None:
    raise RetryLater("come back much later", delay=1e300)  # make_interval would wrap into the past


async def nan_retry(ctx: JobContext) -> str:
    if ctx.job.attempts == 1:
        raise RetryLater("nan delay", delay=float("nan"))
    return "done"


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


async def unprintable(ctx: JobContext) -> None:
    raise _Unprintable()


EXTRA = {
    "overflow": Handler(overflow),
    "recursion": Handler(recursion),
    "data_error": Handler(data_error),
    "nul_result": Handler(nul_result),
    "nan_result": Handler(nan_result),
    "deep_result": Handler(deep_result),
    "huge_result": Handler(huge_result),
    "nasty_message": Handler(nasty_message),
    "far_retry": Handler(far_retry),
    "nan_retry": Handler(nan_retry),
    "unprintable": Handler(unprintable),
}


def hostile_worker(db: Database, *, concurrency: int = 4, burst: bool = True, **settings: Any) -> Worker:
    handlers = {**builtin_handlers(), **th.HANDLERS, **EXTRA}
    return Worker(db, make_settings(db.url, **settings), handlers, concurrency=concurrency, burst=burst)


async def drain(db: Database, **kw: Any) -> WorkerStats:
    async with asyncio.timeout(60):
        return await hostile_worker(db, **kw).run()  # returns: the worker did not crash


def insert(url: str, sql_values: str, params: tuple[Any, ...] = ()) -> int:
    """One queue row from raw SQL: ``sql_values`` lists (column = expression) pairs after job_type."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"INSERT INTO queue_jobs {sql_values} RETURNING id", params).fetchone()
    assert row is not None
    return int(row[0])


async def rows(db: Database, sql: str, *params: Any) -> list[dict[str, Any]]:
    async with db.raw() as conn:
        cur = await conn.execute(sql, params)
        cols = [c.name for c in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in await cur.fetchall()]


async def job_row(db: Database, job_id: int) -> dict[str, Any]:
    [row] = await rows(
        db,
        "SELECT id, job_type, status, attempts, left(last_error, 300) AS last_error, length(last_error) AS error_len,"
        " run_at::text AS run_at_text, result FROM queue_jobs WHERE id = %s",
        job_id,
    )
    return row


# --------------------------------------------------------------------------- the table of bad rows

DEEP_JSON = '{"a":' * 5000 + "1" + "}" * 5000
LONG_NUMBER = '{"n": ' + "9" * 5000 + "}"

# (name, columns and values of the INSERT, expected status, words expected in last_error (lower case))
BAD_ROWS: list[tuple[str, str, str, list[str]]] = [
    ("notify_at infinity", "(job_type, notify_at) VALUES ('noop', 'infinity')", "failed",
     ["cannot be read", "notify_at", "infinity"]),
    ("notify_at year 10000", "(job_type, notify_at) VALUES ('noop', '10000-01-01 00:00+00')", "failed",
     ["cannot be read", "notify_at", "10000"]),
    ("notify_at before year 1", "(job_type, notify_at) VALUES ('noop', '0044-03-15 BC')", "failed",
     ["cannot be read", "notify_at", "before year 1"]),
    ("run_at -infinity", "(job_type, run_at) VALUES ('noop', '-infinity')", "failed",
     ["cannot be read", "run_at", "infinity"]),
    ("payload nested 5,000 deep", f"(job_type, payload) VALUES ('noop', '{DEEP_JSON}')", "failed",
     ["cannot be read", "payload", "recursion"]),
    ("number with 5,000 digits", f"(job_type, payload) VALUES ('noop', '{LONG_NUMBER}')", "failed",
     ["cannot be read", "payload", "digits"]),
    ("payload of 6 MB", "(job_type, payload) SELECT 'noop', jsonb_build_object('blob', string_agg(md5(g::text), ''))"
     " FROM generate_series(1, 200000) g", "failed", ["payload is", "bytes, over the", "failed without running"]),
    # Stored compressed in about 0.25 MB, under the limit if measured as stored: measured as the worker would read it.
    ("payload of 20 MB that compresses well", "(job_type, payload) SELECT 'noop', jsonb_build_object('blob',"
     " repeat('a', 20000000))", "failed", ["payload is 2000001", "bytes, over the", "failed without running"]),
    ("payload is an array", "(job_type, payload) VALUES ('noop', '[1, 2]')", "failed",
     ["payload must be a json object", "array"]),
    ("payload is a string", "(job_type, payload) VALUES ('noop', '\"go\"')", "failed",
     ["payload must be a json object", "string"]),
    ("payload is a number", "(job_type, payload) VALUES ('record', '42')", "failed",
     ["payload must be a json object", "number"]),
    ("payload is JSON null", "(job_type, payload) VALUES ('noop', 'null')", "failed",
     ["payload must be a json object", "null"]),
    ("attempts above max_attempts", "(job_type, attempts, max_attempts) VALUES ('record', 7, 3)", "failed",
     ["attempts used up", "8 of 3"]),
    ("attempts at the integer limit", "(job_type, attempts, max_attempts) VALUES ('noop', 2147483647, 5)",
     "failed", ["attempts used up"]),
    ("job type of 100 KB", f"(job_type) VALUES ('{'t' * 100_000}')", "failed",
     ["unknown job type", "100,000 characters"]),
    ("noop sleep beyond the timeout", "(job_type, payload) VALUES ('noop', '{\"sleep_ms\": 1e400}')", "failed",
     ["sleep_ms", "job timeout"]),
    ("noop sleep_ms of the wrong type", "(job_type, payload) VALUES ('noop', '{\"sleep_ms\": [1]}')", "failed",
     ["sleep_ms must be a non-negative integer"]),
    ("date out of range in the handler", "(job_type) VALUES ('overflow')", "failed",
     ["overflowerror", "date value out of range"]),
    ("recursion in the handler", "(job_type) VALUES ('recursion')", "failed", ["recursionerror"]),
    ("data exception from PostgreSQL", "(job_type) VALUES ('data_error')", "failed",
     ["invalid input syntax for type date"]),
    ("result with a NUL character", "(job_type) VALUES ('nul_result')", "failed",
     ["could not store the job's result", "nul character"]),
    ("result with NaN", "(job_type) VALUES ('nan_result')", "failed",
     ["could not store the job's result", "not json"]),
    ("result nested 5,000 deep", "(job_type) VALUES ('deep_result')", "failed",
     ["could not store the job's result", "nested too deeply"]),
    ("result of 2 MB", "(job_type) VALUES ('huge_result')", "failed",
     ["could not store the job's result", "2,000,011 bytes of json, over the limit of 1,048,576 bytes"]),
    ("error text with NUL, a lone surrogate, 100 KB", "(job_type) VALUES ('nasty_message')", "failed",
     ["bad \\x00 byte", "\\ud800"]),
    ("error whose text cannot be read", "(job_type, max_attempts) VALUES ('unprintable', 1)", "failed",
     ["_unprintable", "could not be read"]),
    # Odd but valid: these run and complete.
    ("lowest priority", "(job_type, priority) VALUES ('noop', -32768)", "completed", []),
    ("highest priority", "(job_type, priority) VALUES ('noop', 32767)", "completed", []),
    ("1 MB last_error from an earlier run", f"(job_type, last_error) VALUES ('noop', '{'e' * 1_000_000}')",
     "completed", []),
    ("max_attempts at the integer limit", "(job_type, attempts, max_attempts) VALUES ('noop', 1000000, 2147483647)",
     "completed", []),
    ("dedup_key of 100 KB", f"(job_type, dedup_key) VALUES ('noop', '{'k' * 100_000}')", "completed", []),
    ("notify_at year 9999", "(job_type, notify_at) VALUES ('noop', '9999-12-31 00:00+00')", "completed", []),
    ("unicode everywhere", "(job_type, payload, dedup_key) VALUES ('noop', '{\"\u00e9\U0001f600\": \"\u2028\"}', "
     "'\U0001f600')", "completed", []),
    ("retry delay of NaN seconds", "(job_type) VALUES ('nan_retry')", "completed", []),
]


async def test_bad_rows_fail_alone_at_once_and_everything_else_completes(db: Database, test_runs: str) -> None:
    url = db.url
    innocent: list[int] = []
    bad: dict[str, tuple[int, str, list[str]]] = {}
    for name, values, status, words in BAD_ROWS:
        # Innocent jobs before and after each bad row, at the same priority: they share its claim batches.
        innocent.append(insert(url, "(job_type) VALUES ('record')"))
        bad[name] = (insert(url, values), status, words)
        innocent.append(insert(url, "(job_type, payload) VALUES ('noop', '{\"sleep_ms\": 1}')"))
    stats = await drain(db, concurrency=4, lease_seconds=5.0)

    for name, (job_id, status, words) in bad.items():
        row = await job_row(db, job_id)
        assert row["status"] == status, (name, row)
        if status == "failed":
            assert row["attempts"] == 1 or name.startswith("attempts"), (name, row)  # at once, not five times
            error = (row["last_error"] or "").lower()
            for word in words:
                assert word in error, (name, word, row["last_error"])
            assert "lease expired" not in error, name
    for job_id in innocent:
        row = await job_row(db, job_id)
        assert (row["status"], row["attempts"]) == ("completed", 1), row
    assert await rows(db, "SELECT id FROM queue_jobs WHERE status NOT IN ('completed', 'failed')") == []
    # The error text was cut to size and made storable.
    nasty = await job_row(db, bad["error text with NUL, a lone surrogate, 100 KB"][0])
    assert nasty["error_len"] <= queue.MAX_ERROR_CHARS + 100
    assert stats.lost == 0
    assert stats.failed == sum(1 for _, _, status, _ in BAD_ROWS if status == "failed")
    assert [r["n"] for r in await rows(db, "SELECT count(*) AS n FROM test_runs")] == [len(innocent) // 2]


async def test_a_retry_delay_out_of_range_is_clamped(db: Database) -> None:
    [far] = await _enqueue(db, NewJob("far_retry"))
    [nan] = await _enqueue(db, NewJob("nan_retry"))
    await drain(db)
    far_row = (await rows(db, "SELECT status, attempts, run_at, last_error FROM queue_jobs WHERE id = %s", far))[0]
    # Not failed, not retried in the distant past: pending, within the 30-day ceiling.
    assert (far_row["status"], far_row["attempts"]) == ("pending", 1)
    now = datetime.now(UTC)
    assert now + timedelta(days=29) < far_row["run_at"] <= now + timedelta(seconds=queue.MAX_RETRY_DELAY + 60)
    assert (await job_row(db, nan))["status"] == "completed"


async def test_a_poison_row_in_the_claim_batch_of_complete_and_claim(db: Database, test_runs: str) -> None:
    """The combined statement (completions riding along with a claim) reads poison rows row by row too."""
    await _enqueue(db, NewJob("noop"))
    async with db.raw() as conn:
        [first] = await queue.claim(conn, 1, "w", 60)
    poison = insert(db.url, "(job_type, notify_at) VALUES ('noop', 'infinity')")
    good = insert(db.url, "(job_type) VALUES ('noop')")
    async with db.raw() as conn:
        written, jobs = await queue.complete_and_claim(conn, [(first.id, first.token, {"ok": True})], 5, "w", 60)
    assert written == {first.id}
    by_id = {j.id: j for j in jobs}
    assert set(by_id) == {poison, good}
    assert by_id[good].problem is None
    assert by_id[poison].problem is not None and "notify_at" in by_id[poison].problem
    assert by_id[poison].notify_at is None and by_id[poison].payload == {}


async def test_rescue_and_inspection_survive_hostile_rows(db: Database) -> None:
    """Rescue with attempts near the integer limit (2^attempts overflowed), and the CLI's listings."""
    url = db.url
    expired = insert(
        url,
        "(job_type, status, attempts, max_attempts, processing_token, lease_expires_at, locked_by)"
        " VALUES ('noop', 'processing', 2000000000, 2147483647, gen_random_uuid(), now() - interval '1 s', %s)",
        ("w" * 10_000,),
    )
    done_forever = insert(
        url,
        "(job_type, status, attempts, max_attempts, processing_token, lease_expires_at, run_at)"
        " VALUES ('noop', 'processing', 3, 3, gen_random_uuid(), now() - interval '1 s', '-infinity')",
    )
    endless = insert(
        url,
        "(job_type, status, processing_token, lease_expires_at) VALUES ('noop', 'processing', gen_random_uuid(),"
        " 'infinity')",
    )
    running = insert(  # a real lease, still valid: left alone
        url,
        "(job_type, status, processing_token, lease_expires_at) VALUES ('noop', 'processing', gen_random_uuid(),"
        " now() + interval '1 minute')",
    )
    insert(url, "(job_type, run_at) VALUES ('noop', 'infinity')")
    insert(url, "(job_type, run_at) VALUES ('noop', '-infinity')")
    insert(url, "(job_type, run_at, last_error) VALUES ('noop', '10000-01-01', %s)", ("x" * 1_000_000,))
    async with db.raw() as conn:
        rescued = {r[0]: r for r in await queue.rescue_expired(conn, retry_base=1, retry_max=60)}
    assert rescued[expired][2] == "pending" and rescued[expired][4] is not None
    assert rescued[done_forever][2] == "failed" and rescued[done_forever][4] is None
    assert rescued[endless][2] == "pending" and running not in rescued
    assert "is not one a worker takes" in (await job_row(db, endless))["last_error"]
    async with db.raw() as conn:
        listed = await queue.list_jobs(conn)
        stats = await queue.stats(conn)
        assert await queue.next_runnable_in(conn) is not None
    assert len(listed) == 7
    assert max(len(r["last_error"] or "") for r in listed) <= 2000
    unreadable = sorted(r["run_at"] for r in listed if isinstance(r["run_at"], str))
    assert len(unreadable) == 4 and unreadable[:2] == ["-infinity"] * 2 and unreadable[3] == "infinity"
    assert unreadable[2].startswith("10000-01-01")
    [pending] = [r for r in stats if r["status"] == "pending"]
    assert pending["jobs"] == 5
    assert pending["oldest_pending_age"] == timedelta.max  # due since -infinity


def test_null_job_type_cannot_be_inserted(clean_db: str) -> None:
    """A row without a job type cannot exist: the table refuses it (so the worker never sees one)."""
    with pytest.raises(psycopg.errors.NotNullViolation):
        insert(clean_db, "(job_type) VALUES (NULL)")


# --------------------------------------------------------------------------- enqueue: the payload cap


async def _enqueue(db: Database, *jobs: NewJob, **kw: Any) -> list[int]:
    async with db.raw() as conn:
        ids = await queue.enqueue_many(conn, list(jobs), **kw)
    return [i for i in ids if i is not None]


async def test_an_oversized_payload_is_refused_alone_and_never_truncated(db: Database) -> None:
    big = {"blob": "x" * 70_000}
    deep: Any = 1
    for _ in range(70):
        deep = [deep]
    jobs = [
        NewJob("noop"),
        NewJob("send_brief_email", big),
        NewJob("noop", {"sleep_ms": 1}),
        NewJob("noop", {"bad": float("nan")}),
        NewJob("noop", {"text": "nul \x00 here"}),
        NewJob("noop", {"deep": deep}),
        NewJob("noop", ["not", "an", "object"]),  # type: ignore[arg-type]
        NewJob("noop", priority=40_000),
        NewJob("noop", dedup_key="k" * 5000),
        NewJob("noop", max_attempts=0),
        NewJob("noop", {"text": "literal backslash-u0000: \\u0000 is fine"}),
    ]
    async with db.raw() as conn:
        result = await queue.enqueue_many(conn, jobs, max_payload_bytes=65_536)
    assert [i is not None for i in result] == [True, False, True] + [False] * 7 + [True]
    reasons = {r.index: r.reason for r in result.rejected}
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7, 8, 9]
    assert "'send_brief_email' job: payload is 70,011 bytes of JSON, over the limit of 65,536 bytes" in reasons[1]
    assert "BRIEFS_MAX_PAYLOAD_BYTES" in reasons[1]
    assert "not JSON" in reasons[3]
    assert "NUL character" in reasons[4]
    assert "nested more than 64 levels" in reasons[5]
    assert "must be a JSON object" in reasons[6]
    assert "priority" in reasons[7]
    assert "dedup_key is 5,000 bytes" in reasons[8]
    assert "max_attempts" in reasons[9]
    stored = await rows(db, "SELECT payload FROM queue_jobs ORDER BY id")
    assert [r["payload"] for r in stored] == [{}, {"sleep_ms": 1}, {"text": "literal backslash-u0000: \\u0000 is fine"}]
    # One job alone: a clear error, nothing inserted.
    with pytest.raises(queue.JobRejected, match=r"'noop' job: payload is 70,011 bytes of JSON, over the limit"):
        async with db.raw() as conn:
            await queue.enqueue(conn, NewJob("noop", big))
    assert len(await rows(db, "SELECT id FROM queue_jobs")) == 3


async def test_the_default_cap_is_the_setting_default(db: Database) -> None:
    assert queue.DEFAULT_MAX_PAYLOAD_BYTES == make_settings(db.url).max_payload_bytes == 64 * 1024
    assert await _enqueue(db, NewJob("noop", {"blob": "x" * 64_000})) != []
    assert await _enqueue(db, NewJob("noop", {"blob": "x" * 66_000})) == []


# --------------------------------------------------------------------------- permanence


def test_never_succeeding_errors_are_permanent_and_the_rest_transient() -> None:
    assert is_permanent(OverflowError("date value out of range"))
    assert is_permanent(RecursionError())
    assert is_permanent(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert is_permanent(psycopg.errors.NumericValueOutOfRange())
    assert is_permanent(psycopg.errors.InvalidDatetimeFormat())  # SQLSTATE class 22, raised by the driver itself
    assert is_permanent(ExceptionGroup("all bad", [OverflowError(), PermanentError("x")]))
    assert not is_permanent(ExceptionGroup("one transient", [OverflowError(), TimeoutError()]))
    assert not is_permanent(RetryLater("later"))
    assert not is_permanent(TimeoutError())
    assert not is_permanent(psycopg.OperationalError("connection lost"))
    assert not is_permanent(RuntimeError("flaky"))


# --------------------------------------------------------------------------- lease statements and the pool


async def test_handlers_holding_every_pool_connection_do_not_starve_the_leases(db: Database) -> None:
    """Bug: heartbeats took a connection from the pool that handlers use; handlers holding all of it for
    longer than the lease let the leases expire, and the jobs were rescued and run a second time."""
    pool_size = db.max_size
    holding = asyncio.Event()
    held = 0

    async def hog(ctx: JobContext) -> str:
        nonlocal held
        async with ctx.db.raw() as conn:
            await conn.execute("SELECT 1")
            held += 1
            if held == pool_size:
                holding.set()
            await asyncio.sleep(3.5)  # more than three lease periods
        return "done"

    ids = await _enqueue(db, *[NewJob("hog") for _ in range(pool_size)])
    async def fail_while_held(ctx: JobContext) -> None:
        await holding.wait()
        raise RuntimeError("failing while the pool is exhausted")

    handlers = {**builtin_handlers(), "hog": Handler(hog), "fail_fast": Handler(fail_while_held)}
    # A job that fails while the pool is exhausted: its failure must be written too.
    [failing] = await _enqueue(db, NewJob("fail_fast", max_attempts=1, priority=200))
    worker = Worker(db, make_settings(db.url, lease_seconds=1.0, poll_interval=0.1), handlers,
                    concurrency=pool_size + 1, burst=True)
    rescued: list[Any] = []

    watcher = asyncio.create_task(rescue_continuously(db.url, rescued))  # another worker's maintenance
    try:
        async with asyncio.timeout(30):
            stats = await worker.run()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert holding.is_set()  # every pool connection really was held at once
    assert rescued == []
    got = await rows(db, "SELECT id, status, attempts FROM queue_jobs ORDER BY id")
    assert {(r["status"], r["attempts"]) for r in got if r["id"] in ids} == {("completed", 1)}
    assert [(r["status"], r["attempts"]) for r in got if r["id"] == failing] == [("failed", 1)]
    assert stats.lost == 0


# --------------------------------------------------------------------------- metrics


async def test_unknown_job_types_share_one_metric_label_and_metrics_render_off_the_loop(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    def sample(name: str, label: str) -> float:
        return REGISTRY.get_sample_value(name, {"job_type": label}) or 0.0

    failed_before = sample("briefs_jobs_failed_total", "other")
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("INSERT INTO queue_jobs (job_type) SELECT 'junk-' || g FROM generate_series(1, 300) g")
        conn.execute("INSERT INTO queue_jobs (job_type) SELECT 'pending-junk-' || g || repeat('x', 5000)"
                     " FROM generate_series(1, 200) g")
        conn.execute("UPDATE queue_jobs SET run_at = now() + interval '1 day' WHERE job_type LIKE 'pending-junk-%'")
    await drain(db, concurrency=10)
    assert sample("briefs_jobs_failed_total", "other") - failed_before == 300

    import briefs.health

    threads: list[int] = []
    real = briefs.health.generate_latest

    def spy(*args: Any) -> bytes:
        threads.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(briefs.health, "generate_latest", spy)
    health = HealthServer(db, 0, host="127.0.0.1")
    await health.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", health.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
    finally:
        await health.stop()
    assert text.startswith("HTTP/1.1 200 OK")
    assert "junk-" not in text
    assert 'briefs_queue_depth{job_type="other",status="failed"} 300.0' in text
    assert 'briefs_queue_depth{job_type="other",status="pending"} 200.0' in text
    assert len(text) < 200_000
    assert threads and threading.get_ident() not in threads
