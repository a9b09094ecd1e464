"""The queue and the worker in one process, against a real PostgreSQL.

Workers run in burst mode wherever that makes a test deterministic (drain, then
return). Job types come from :mod:`tests.handlers_for_tests`; ``test_runs``
records every real run of ``record`` and ``sleep`` jobs.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from briefs.db import Database
from briefs.errors import Defer
from tests import handlers_for_tests as th
from tests.conftest import make_settings
from tests.polling import wait_for_async as until
from worker import queue
from worker.handlers import builtin_handlers
from worker.queue import NewJob
from worker.runner import Handler, JobContext, Worker, WorkerStats


def handlers(**extra: Handler) -> dict[str, Handler]:
    return {**builtin_handlers(), **th.HANDLERS, **extra}


def worker(db: Database, *, concurrency: int = 4, burst: bool = True, extra: dict[str, Handler] | None = None,
           **settings: Any) -> Worker:
    return Worker(db, make_settings(db.url, **settings), handlers(**(extra or {})), concurrency=concurrency,
                  burst=burst)


async def drain(db: Database, timeout: float = 20.0, **kw: Any) -> WorkerStats:
    async with asyncio.timeout(timeout):
        return await worker(db, **kw).run()


async def enqueue(db: Database, *jobs: NewJob) -> list[int]:
    async with db.raw() as conn:
        ids = await queue.enqueue_many(conn, list(jobs))
    return [i for i in ids if i is not None]


async def rows(db: Database, sql: str, *params: Any) -> list[dict[str, Any]]:
    async with db.raw() as conn:
        cur = await conn.execute(sql, params)
        cols = [c.name for c in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in await cur.fetchall()]


async def job(db: Database, job_id: int) -> dict[str, Any]:
    [row] = await rows(db, "SELECT * FROM queue_jobs WHERE id = %s", job_id)
    return row


async def runs(db: Database, job_id: int | None = None) -> list[dict[str, Any]]:
    return await rows(
        db, "SELECT * FROM test_runs WHERE %s::bigint IS NULL OR job_id = %s ORDER BY seq", job_id, job_id
    )




async def started(db: Database, job_id: int) -> bool:
    return bool(await runs(db, job_id))


def events(kind: str, job_id: int) -> list[int]:
    return [attempt for event, jid, attempt in th.EVENTS if event == kind and jid == job_id]


# --------------------------------------------------------------------------- enqueue


async def test_dedup_key_makes_one_live_job(db: Database) -> None:
    async with db.raw() as conn:
        ids = await queue.enqueue_many(
            conn, [NewJob("noop", dedup_key="k1"), NewJob("noop", dedup_key="k1"), NewJob("noop"), NewJob("noop")]
        )
        again = await queue.enqueue(conn, NewJob("noop", dedup_key="k1"))
    assert ids[0] is not None and ids[1] is None and None not in ids[2:]
    assert again is None
    await drain(db)
    # A finished job does not block the key any more.
    [new] = await enqueue(db, NewJob("noop", dedup_key="k1"))
    assert new > ids[0]


async def test_concurrent_enqueues_with_one_dedup_key_make_one_row(db: Database) -> None:
    first = await psycopg.AsyncConnection.connect(db.url)
    second = await psycopg.AsyncConnection.connect(db.url)
    try:
        assert await queue.enqueue(first, NewJob("noop", dedup_key="same")) is not None  # not committed yet
        other = asyncio.create_task(queue.enqueue(second, NewJob("noop", dedup_key="same")))
        pid = second.info.backend_pid

        async def blocked() -> bool:
            [row] = await rows(db, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", pid)
            return row["wait_event_type"] == "Lock"

        await until(blocked, what="the second insert to wait on the first")
        await first.commit()
        assert await other is None
        await second.commit()
    finally:
        await first.close()
        await second.close()
    [row] = await rows(db, "SELECT count(*) AS n FROM queue_jobs WHERE dedup_key = 'same'")
    assert row["n"] == 1


# --------------------------------------------------------------------------- claiming order


async def test_lower_priority_first_then_run_at_then_id_and_future_jobs_wait(db: Database, test_runs: str) -> None:
    now = datetime.now(UTC)
    ids = await enqueue(
        db,
        NewJob("record", priority=5),
        NewJob("record", priority=1),
        NewJob("record", priority=3, run_at=now - timedelta(seconds=5)),
        NewJob("record", priority=3, run_at=now - timedelta(seconds=10)),
        NewJob("record", priority=1),
        NewJob("record", priority=0, run_at=now + timedelta(hours=1)),
    )
    await drain(db, concurrency=1)
    order = [r["job_id"] for r in await runs(db)]
    assert order == [ids[1], ids[4], ids[3], ids[2], ids[0]]
    assert (await job(db, ids[5]))["status"] == "pending"  # a future job neither runs nor holds the burst up


# --------------------------------------------------------------------------- failures


async def test_failing_job_ends_failed_after_max_attempts_and_others_are_unaffected(
    db: Database, test_runs: str
) -> None:
    [bad, *good] = await enqueue(db, NewJob("fail", max_attempts=3), *[NewJob("record") for _ in range(5)])
    stats = await drain(db)
    row = await job(db, bad)
    assert (row["status"], row["attempts"]) == ("failed", 3)
    assert row["last_error"] == "RuntimeError: fail: attempt 3 failed on purpose"
    assert row["finished_at"] is not None
    assert events("failed", bad) == [1, 2, 3]
    assert (stats.failed, stats.retried, stats.completed) == (1, 2, 5)
    for job_id in good:
        assert (await job(db, job_id))["status"] == "completed"


async def test_unknown_job_type_fails_permanently_at_once(db: Database) -> None:
    [job_id] = await enqueue(db, NewJob("no_such_type", max_attempts=5))
    await drain(db)
    row = await job(db, job_id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"].startswith("unknown job type 'no_such_type' (this worker knows: ")


async def test_bad_noop_payload_and_permanent_errors_fail_at_once(db: Database) -> None:
    ids = await enqueue(
        db,
        NewJob("noop", {"sleep_ms": "soon"}),
        NewJob("noop", {"fail": "yes"}),
        NewJob("permanent"),
        NewJob("noop", {"sleep_ms": 1}),
    )
    await drain(db)
    got = [await job(db, i) for i in ids]
    assert [(r["status"], r["attempts"]) for r in got] == [("failed", 1)] * 3 + [("completed", 1)]
    assert "sleep_ms must be a non-negative integer" in got[0]["last_error"]
    assert "fail must be true or false" in got[1]["last_error"]
    assert got[2]["last_error"] == "PermanentError: permanent: this job can never succeed"


async def test_noop_fail_is_retried_then_fails(db: Database) -> None:
    [job_id] = await enqueue(db, NewJob("noop", {"fail": True}, max_attempts=2))
    await drain(db)
    row = await job(db, job_id)
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "failed", 2, "RuntimeError: noop was asked to fail")


async def test_burst_drains_retries_with_a_short_backoff(db: Database, test_runs: str) -> None:
    flaky, later = await enqueue(db, NewJob("record", {"fail_times": 2}), NewJob("retry_later", {"delay": 0.3}))
    started_at = time.monotonic()
    stats = await drain(db, retry_base=0.05)
    assert (await job(db, flaky))["status"] == "completed"
    assert [r["run"] for r in await runs(db, flaky)] == [1, 2, 3]
    row = await job(db, later)
    assert (row["status"], row["attempts"], row["result"]) == ("completed", 2, "done")
    assert time.monotonic() - started_at >= 0.3  # it waited for the RetryLater delay
    assert (stats.completed, stats.retried) == (2, 3)


async def test_timeout_really_cancels_the_handler(db: Database) -> None:
    job_id, _ = await enqueue(db, NewJob("hang", max_attempts=1), NewJob("noop"))
    await drain(db)  # returns: the hanging handler was cancelled (it never returns by itself)
    row = await job(db, job_id)
    assert (row["status"], row["last_error"]) == ("failed", "TimeoutError: job timed out after 0.3s (cancelled)")
    assert events("started", job_id) == [1]
    assert events("cancelled", job_id) == [1]
    assert events("finished", job_id) == []


async def test_a_result_the_database_refuses_fails_that_job_only(db: Database, test_runs: str) -> None:
    ids = await enqueue(db, NewJob("record"), NewJob("bad_result"), NewJob("record"), NewJob("noop"))
    stats = await drain(db, concurrency=4)
    got = [await job(db, i) for i in ids]
    assert [r["status"] for r in got] == ["completed", "failed", "completed", "completed"]
    assert got[1]["last_error"].startswith("could not store the job's result")
    assert (stats.completed, stats.failed, stats.lost) == (3, 1, 0)


# --------------------------------------------------------------------------- progress, cancel, retry, prune


async def test_progress_is_written_and_readable_while_the_job_runs(db: Database) -> None:
    [job_id] = await enqueue(db, NewJob("progress", {"steps": 3, "pause": 0.25}))
    run = asyncio.create_task(drain(db))

    async def step_two() -> bool:
        return (await job(db, job_id))["progress"] == {"step": 2, "of": 3}

    await until(step_two, what="progress step 2")
    assert (await job(db, job_id))["status"] == "processing"
    await run
    row = await job(db, job_id)
    assert (row["status"], row["progress"], row["result"]) == ("completed", {"step": 3, "of": 3}, {"steps": 3})


async def test_cancel_and_retry(db: Database) -> None:
    pending, failed, other_failed = await enqueue(
        db, NewJob("noop"), NewJob("fail", max_attempts=1), NewJob("permanent"))
    async with db.raw() as conn:
        assert await queue.cancel(conn, pending) == "cancelled"
    with pytest.raises(queue.QueueError, match="is cancelled; only pending or processing"):
        async with db.raw() as conn:
            await queue.cancel(conn, pending)
    await drain(db)
    assert (await job(db, pending))["status"] == "cancelled"  # never ran
    assert (await job(db, failed))["status"] == "failed"

    async with db.raw() as conn:
        assert await queue.retry(conn, pending) == [pending]
    row = await job(db, pending)
    assert (row["status"], row["attempts"], row["finished_at"]) == ("pending", 0, None)
    await drain(db)
    assert (await job(db, pending))["status"] == "completed"
    with pytest.raises(queue.QueueError, match="is completed; only failed or cancelled"):
        async with db.raw() as conn:
            await queue.retry(conn, pending)
    async with db.raw() as conn:
        assert await queue.retry(conn) == sorted([failed, other_failed])  # --failed
    assert {(await job(db, i))["status"] for i in (failed, other_failed)} == {"pending"}
    for action in (queue.cancel, queue.retry):
        with pytest.raises(queue.QueueError, match="job 999999 is not found"):
            async with db.raw() as conn:
                await action(conn, 999999)


async def test_retry_refuses_when_the_dedup_key_is_live_again(db: Database) -> None:
    [old] = await enqueue(db, NewJob("permanent", dedup_key="brief:1:2026-01-01"))
    await drain(db)
    await enqueue(db, NewJob("noop", dedup_key="brief:1:2026-01-01"))
    with pytest.raises(queue.QueueError, match="same dedup key"):
        async with db.raw() as conn:
            await queue.retry(conn, old)


async def test_cancelling_a_running_job_stops_it_at_the_next_heartbeat(db: Database, test_runs: str) -> None:
    [job_id] = await enqueue(db, NewJob("sleep", {"seconds": 30}))
    w = worker(db, burst=False, lease_seconds=0.6)  # heartbeat every 0.2 s
    run = asyncio.create_task(w.run())
    try:
        await until(lambda: started(db, job_id), what="the job to start")
        async with db.raw() as conn:
            await queue.cancel(conn, job_id)
        # The 30 s job is stopped by a heartbeat (every 0.2 s), not by running out.
        await until(lambda: asyncio.sleep(0, events("cancelled", job_id)), timeout=10, what="the handler to stop")
        assert w.in_flight == 0 and w.stats.lost == 1
    finally:
        w.stop()
        stats = await run
    row = await job(db, job_id)
    assert (row["status"], row["last_error"]) == ("cancelled", "cancelled by operator")
    assert stats.released == 0 and events("finished", job_id) == []


async def test_prune_deletes_only_old_finished_rows_in_batches(db: Database) -> None:
    ids = await enqueue(db, *[NewJob("noop") for _ in range(40)])
    async with db.raw() as conn:
        # 30 old finished rows (all three statuses), 4 recent finished ones, 6 old but still pending.
        await conn.execute(
            """UPDATE queue_jobs SET status = (ARRAY['completed', 'failed', 'cancelled'])[1 + id %% 3],
                      finished_at = now() - interval '10 days', created_at = now() - interval '11 days'
               WHERE id = ANY(%s)""",
            (ids[:30],),
        )
        await conn.execute("UPDATE queue_jobs SET status = 'completed', finished_at = now() WHERE id = ANY(%s)",
                           (ids[30:34],))
        await conn.execute("UPDATE queue_jobs SET created_at = now() - interval '11 days', run_at = now() + "
                           "interval '1 day' WHERE id = ANY(%s)", (ids[34:],))
    batches = []
    while True:
        async with db.raw() as conn:
            deleted = await queue.prune(conn, retention_seconds=7 * 86400, batch=8)
        batches.append(deleted)
        if not deleted:
            break
    assert batches == [8, 8, 8, 6, 0]
    left = {r["id"] for r in await rows(db, "SELECT id FROM queue_jobs")}
    assert left == set(ids[30:])
    # The worker's prune loops over batches too, with the configured retention.
    async with db.raw() as conn:
        await conn.execute("UPDATE queue_jobs SET finished_at = now() - interval '3 days' WHERE id = ANY(%s)",
                           (ids[30:34],))
    assert await worker(db, retention_days=2).prune() == 4
    assert await worker(db, retention_days=2).prune() == 0


# --------------------------------------------------------------------------- leases and fencing


async def test_an_old_token_can_no_longer_write_after_a_rescue(db: Database) -> None:
    [job_id] = await enqueue(db, NewJob("noop", max_attempts=3))
    async with db.raw() as conn:
        [old] = await queue.claim(conn, 5, "worker-a", lease_seconds=60)
        assert old.attempts == 1
        assert await queue.heartbeat(conn, [(old.id, old.token)], 60) == {old.token}
        assert await queue.rescue_expired(conn, retry_base=0.001, retry_max=0.001) == []  # lease still valid
        await conn.execute("UPDATE queue_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                           (job_id,))
        [(rid, _, status, attempts, _)] = await queue.rescue_expired(conn, retry_base=0.001, retry_max=0.001)
        assert (rid, status, attempts) == (job_id, "pending", 1)  # the lost run consumed its attempt
    row = await job(db, job_id)
    assert "lease expired: worker worker-a stopped heartbeating (attempt 1 of 3)" == row["last_error"]
    # Before it is claimed again, and after: the old token is fenced out of every write.
    await asyncio.sleep(0.01)
    for reclaim in (False, True):
        async with db.raw() as conn:
            if reclaim:
                [new] = await queue.claim(conn, 5, "worker-b", lease_seconds=60)
                assert (new.id, new.attempts) == (job_id, 2) and new.token != old.token
            assert await queue.complete_many(conn, [(old.id, old.token, {"stale": True})]) == set()
            assert await queue.complete_and_claim(conn, [(old.id, old.token, None)], 0, "worker-a", 60) == (
                set(), [])
            assert await queue.fail(conn, old, "stale", permanent=True, retry_delay=0) is None
            assert await queue.heartbeat(conn, [(old.id, old.token)], 60) == set()
            assert await queue.set_progress(conn, old.id, old.token, {"stale": True}) is False
            assert await queue.release(conn, [(old.id, old.token)], "stale") == set()
    async with db.raw() as conn:
        assert await queue.complete_many(conn, [(new.id, new.token, {"ok": 1})]) == {job_id}
    row = await job(db, job_id)
    assert (row["status"], row["attempts"], row["result"], row["progress"]) == ("completed", 2, {"ok": 1}, None)


async def test_a_rescue_after_the_last_attempt_fails_the_job(db: Database) -> None:
    [job_id] = await enqueue(db, NewJob("noop", max_attempts=1))
    async with db.raw() as conn:
        await queue.claim(conn, 1, "gone", lease_seconds=0.01)
    await asyncio.sleep(0.05)
    async with db.raw() as conn:
        [(_, _, status, attempts, _)] = await queue.rescue_expired(conn, retry_base=1, retry_max=1)
    assert (status, attempts) == ("failed", 1)
    row = await job(db, job_id)
    assert row["finished_at"] is not None and "stopped heartbeating" in row["last_error"]


async def test_a_worker_rescues_jobs_of_a_dead_worker(db: Database, test_runs: str) -> None:
    [job_id] = await enqueue(db, NewJob("record"))
    async with db.raw() as conn:
        [dead] = await queue.claim(conn, 1, "dead-worker", lease_seconds=0.2)
    w = worker(db, burst=False, lease_seconds=0.4, poll_interval=0.1, retry_base=0.01)
    run = asyncio.create_task(w.run())
    try:
        async def done() -> bool:
            return (await job(db, job_id))["status"] == "completed"

        await until(done, what="the rescued job to complete")
    finally:
        w.stop()
        await run
    assert (await job(db, job_id))["attempts"] == 2
    assert [r["run"] for r in await runs(db, job_id)] == [2]
    async with db.raw() as conn:
        assert await queue.complete_many(conn, [(dead.id, dead.token, None)]) == set()


# --------------------------------------------------------------------------- shutdown


async def test_stop_lets_short_jobs_finish_and_releases_long_ones(db: Database, test_runs: str) -> None:
    short, long_ = await enqueue(db, NewJob("sleep", {"seconds": 0.3}), NewJob("sleep", {"seconds": 3600}))
    w = worker(db, burst=False, shutdown_grace=1.0)
    run = asyncio.create_task(w.run())
    await until(lambda: started(db, long_), what="both jobs to start")
    await until(lambda: started(db, short), what="both jobs to start")
    w.stop()
    stats = await run  # the hour-long job does not hold the stop up past the grace period
    short_row = await job(db, short)
    assert short_row["status"] == "completed"
    row = await job(db, long_)
    assert row["updated_at"] >= short_row["finished_at"]  # released only after the short one finished
    assert (row["status"], row["attempts"], row["locked_by"]) == ("pending", 0, None)
    assert row["last_error"].startswith("released by worker")
    assert events("cancelled", long_) == [1]
    assert (stats.completed, stats.released) == (1, 1)


async def test_abort_releases_at_once(db: Database, test_runs: str) -> None:
    [job_id] = await enqueue(db, NewJob("sleep", {"seconds": 3600}))
    w = worker(db, burst=False, shutdown_grace=3600)
    run = asyncio.create_task(w.run())
    await until(lambda: started(db, job_id), what="the job to start")
    w.stop()
    await asyncio.sleep(0.1)
    w.abort()
    async with asyncio.timeout(60):  # an hour's grace and an hour's job: only the abort ends this
        await run
    row = await job(db, job_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)


# --------------------------------------------------------------------------- claim loop behaviour and races


async def test_claim_loop_marks_its_cycle_while_all_slots_are_busy(db: Database, test_runs: str) -> None:
    ids = await enqueue(db, NewJob("sleep", {"seconds": 3600}), NewJob("sleep", {"seconds": 3600}))
    w = worker(db, concurrency=2, burst=False, poll_interval=0.2)
    run = asyncio.create_task(w.run())
    try:
        for job_id in ids:
            await until(lambda job_id=job_id: started(db, job_id), what="both jobs to start")
        seen = {w.stats.last_cycle}

        async def marked_three_more() -> bool:
            seen.add(w.stats.last_cycle)
            return len(seen) >= 4

        await until(marked_three_more, what="three more claim-loop cycles while every slot is busy")
        assert w.in_flight == 2
    finally:
        w.stop()
        await run


async def test_notify_wakes_an_idle_worker_at_once(db: Database) -> None:
    w = worker(db, burst=False, poll_interval=30)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.3)  # idle, LISTENing
        [job_id] = await enqueue(db, NewJob("noop"))

        async def done() -> bool:
            return (await job(db, job_id))["status"] == "completed"

        # Polling every 30 s would not pick it up within the wait: only the NOTIFY can.
        await until(done, timeout=10, what="the job to complete")
    finally:
        w.stop()
        await run


async def test_draining_waits_without_spinning(db: Database, test_runs: str) -> None:
    """Bug: the grace wait also woke on the stop event (always set while draining) and spun at 100 % CPU."""
    [job_id] = await enqueue(db, NewJob("sleep", {"seconds": 1.0}))
    w = worker(db, burst=False, shutdown_grace=10)
    run = asyncio.create_task(w.run())
    await until(lambda: started(db, job_id), what="the job to start")
    waits = 0
    wait_kick = w._wait_kick

    async def counted(timeout: float) -> bool:
        nonlocal waits
        waits += 1
        return await wait_kick(timeout)

    w._wait_kick = counted  # type: ignore[method-assign]
    w.stop()
    await run
    assert (await job(db, job_id))["status"] == "completed"
    assert waits <= 3, waits  # one wait per wake-up (the job finishing), not a loop spinning for a second


async def test_finished_jobs_keep_their_lease_until_their_completion_is_written(
    db: Database, test_runs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: a job waiting in the completion buffer was not heartbeated, so a slow write let its lease
    expire and the job ran a second time."""
    outage_until = time.monotonic() + 2.2

    def outage(real: Any) -> Any:
        async def write(*args: Any, **kwargs: Any) -> Any:
            if time.monotonic() < outage_until:
                raise psycopg.OperationalError("simulated: connection lost")
            return await real(*args, **kwargs)

        return write

    monkeypatch.setattr(queue, "complete_many", outage(queue.complete_many))
    monkeypatch.setattr(queue, "complete_and_claim", outage(queue.complete_and_claim))
    [job_id] = await enqueue(db, NewJob("record"))
    w = worker(db, burst=False, lease_seconds=0.75, poll_interval=0.1, retry_base=0.01)
    run = asyncio.create_task(w.run())
    try:
        async def done() -> bool:
            return (await job(db, job_id))["status"] == "completed"

        await until(done, timeout=10, what="the completion to be written")
    finally:
        w.stop()
        await run
    assert [r["run"] for r in await runs(db, job_id)] == [1]
    assert (await job(db, job_id))["attempts"] == 1
    assert (w.stats.completed, w.stats.lost) == (1, 0)


async def test_a_job_rerun_by_the_same_worker_keeps_its_slot_and_lease(db: Database) -> None:
    """Bug: runs were keyed by job id; when a rescued job was claimed again by the same worker, the
    first run's end removed the second run's entry, whose lease then went unrenewed: a third run."""
    second_started = asyncio.Event()
    attempts_seen: list[int] = []

    async def twice(ctx: JobContext) -> str:
        attempts_seen.append(ctx.job.attempts)
        if ctx.job.attempts == 1:
            async with ctx.db.raw() as conn:  # lose our own lease, as if the loop had stalled
                await conn.execute(
                    "UPDATE queue_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                    (ctx.job.id,),
                )
                await queue.rescue_expired(conn, retry_base=0.001, retry_max=0.001)
            await asyncio.wait_for(second_started.wait(), 5)
            return "first"
        second_started.set()
        await asyncio.sleep(2.0)  # several lease periods: only heartbeats keep it
        return "second"

    [job_id] = await enqueue(db, NewJob("twice"))
    w = worker(db, burst=False, concurrency=2, lease_seconds=0.8, poll_interval=0.05, retry_base=0.01,
               extra={"twice": Handler(twice)})
    run = asyncio.create_task(w.run())
    try:
        async def done() -> bool:
            return (await job(db, job_id))["status"] == "completed"

        await until(done, timeout=10, what="the second run to complete")
    finally:
        w.stop()
        await run
    row = await job(db, job_id)
    assert (row["attempts"], row["result"]) == (2, "second")
    assert attempts_seen == [1, 2]


async def test_jobs_claimed_while_stopping_are_released_not_run(
    db: Database, test_runs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: a claim in flight when stop() came started its jobs anyway."""
    ids = await enqueue(db, *[NewJob("record") for _ in range(3)])
    w = worker(db, burst=False)
    real_claim = queue.claim

    async def claim_then_stop(*args: Any, **kwargs: Any) -> Any:
        w.stop()  # SIGTERM arrives while the claim is on the wire
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim", claim_then_stop)
    stats = await asyncio.wait_for(w.run(), 10)
    assert stats.released == 3 and stats.claimed == 0
    assert await runs(db) == []
    assert {(r["status"], r["attempts"]) for r in [await job(db, i) for i in ids]} == {("pending", 0)}


async def test_a_crashing_claim_loop_still_hands_running_jobs_back(
    db: Database, test_runs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: an unexpected error in the claim loop skipped the drain: running jobs were orphaned
    (still running, rows left processing until their lease expired)."""
    [job_id] = await enqueue(db, NewJob("sleep", {"seconds": 30}))
    real_claim = queue.claim
    calls = 0

    async def claim_then_crash(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("unexpected")
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim", claim_then_crash)
    w = worker(db, burst=False, poll_interval=0.1, shutdown_grace=0.2)
    with pytest.raises(RuntimeError, match="unexpected"):
        await asyncio.wait_for(w.run(), 10)
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("job-") and not t.done()] == []
    row = await job(db, job_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert events("cancelled", job_id) == [1]


async def test_a_deferred_run_spends_no_attempt_even_on_the_last_one(db: Database) -> None:
    """A handler's "not now" (an error with ``refund = True``, like briefs.errors.Defer) puts the job back
    without spending its attempt: on its only attempt it is pending again, not failed, and it is counted
    as deferred, not as a failure."""
    deferrals: list[int] = []

    async def later(ctx: JobContext) -> str:
        deferrals.append(ctx.job.attempts)
        if len(deferrals) < 3:
            raise Defer("not now", delay=0.05)
        return "done"

    [job_id] = await enqueue(db, NewJob("later", max_attempts=1))
    stats = await drain(db, extra={"later": Handler(later)})
    row = await job(db, job_id)
    assert (row["status"], row["attempts"], row["result"]) == ("completed", 1, "done")
    assert deferrals == [1, 1, 1]  # every run was its first attempt
    assert (stats.deferred, stats.retried, stats.failed, stats.completed) == (2, 0, 0, 1)
