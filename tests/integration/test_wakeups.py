"""An idle worker wakes when the next job scheduled ahead comes due, not at its next poll.

The poll interval is 30 s in these tests: a job that starts within a few seconds of its
``run_at`` was woken by the timer (or a NOTIFY), never by the poll. Times are the database's
(``run_at`` and ``started_at`` are both written by PostgreSQL).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from briefs.db import Database
from tests.conftest import make_settings
from tests.polling import wait_for_async as until
from worker import queue
from worker.handlers import builtin_handlers
from worker.queue import NewJob
from worker.runner import Worker

POLL = 30.0  # never reached in these tests
TIMER_BOUND = timedelta(seconds=5)  # well under the poll interval: only the timer can explain a start this soon


def idle_worker(db: Database, **settings: Any) -> Worker:
    return Worker(db, make_settings(db.url, **{"poll_interval": POLL, **settings}), builtin_handlers(),
                  concurrency=2)


async def db_now(db: Database) -> datetime:
    async with db.raw() as conn:
        cur = await conn.execute("SELECT clock_timestamp()")
        row = await cur.fetchone()
    assert row is not None
    value: datetime = row[0]
    return value


async def enqueue_at(db: Database, seconds_ahead: float, **kw: Any) -> tuple[int, datetime]:
    run_at = await db_now(db) + timedelta(seconds=seconds_ahead)
    async with db.raw() as conn:
        [job_id] = await queue.enqueue_many(conn, [NewJob("noop", run_at=run_at)], **kw)
    assert job_id is not None
    return job_id, run_at


async def job_row(db: Database, job_id: int) -> dict[str, Any]:
    async with db.raw() as conn:
        cur = await conn.execute("SELECT status, run_at, started_at FROM queue_jobs WHERE id = %s", (job_id,))
        row = await cur.fetchone()
    assert row is not None
    status, run_at, started_at = row
    return {"status": status, "run_at": run_at, "started_at": started_at}


async def completed(db: Database, job_id: int) -> dict[str, Any]:
    return await until(lambda: job_row(db, job_id), timeout=20, what=f"job {job_id} to complete",
                       accept=lambda r: r["status"] == "completed")


async def test_a_job_scheduled_ahead_starts_at_its_run_at_not_at_the_next_poll(db: Database) -> None:
    w = idle_worker(db)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.3)  # idle, LISTENing
        job_id, run_at = await enqueue_at(db, 1.5)
        row = await completed(db, job_id)
    finally:
        w.stop()
        await run
    assert row["run_at"] == run_at
    assert run_at <= row["started_at"] < run_at + TIMER_BOUND


async def test_a_job_enqueued_later_with_an_earlier_run_at_re_arms_the_timer(db: Database) -> None:
    w = idle_worker(db)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.3)
        later_id, later_run_at = await enqueue_at(db, 20)  # the timer is set for this one
        await asyncio.sleep(0.3)
        sooner_id, sooner_run_at = await enqueue_at(db, 1.0)  # its NOTIFY re-arms the timer
        sooner = await completed(db, sooner_id)
        later = await job_row(db, later_id)
    finally:
        w.stop()
        await run
    assert sooner_run_at <= sooner["started_at"] < sooner_run_at + TIMER_BOUND
    assert sooner["started_at"] < later_run_at  # not woken by the first job's timer
    assert later["status"] == "pending"


async def test_the_timer_is_set_again_after_each_claim(db: Database) -> None:
    """Jobs due one after another: each claim arms the timer for the next one."""
    w = idle_worker(db)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.3)
        base = await db_now(db)
        async with db.raw() as conn:
            ids = await queue.enqueue_many(
                conn, [NewJob("noop", run_at=base + timedelta(seconds=s)) for s in (1.0, 1.8, 2.6)])
        rows = [await completed(db, job_id) for job_id in ids if job_id is not None]
    finally:
        w.stop()
        await run
    assert len(rows) == 3
    for row in rows:
        assert row["run_at"] <= row["started_at"] < row["run_at"] + TIMER_BOUND


async def test_a_job_enqueued_without_notify_is_still_found_by_the_poll(db: Database) -> None:
    """The poll fallback: nothing tells the worker about this job; the poll finds it."""
    w = idle_worker(db, poll_interval=0.3)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.5)
        job_id, _ = await enqueue_at(db, 0.0, notify=False)
        row = await completed(db, job_id)
    finally:
        w.stop()
        await run
    assert row["status"] == "completed"


async def test_next_due_in_is_the_earliest_future_run_at_over_every_priority(db: Database) -> None:
    base = await db_now(db)
    async with db.raw() as conn:
        assert await queue.next_due_in(conn) is None  # no pending job
        await queue.enqueue_many(conn, [
            NewJob("noop", priority=1, run_at=base - timedelta(seconds=5)),  # runnable now: not "ahead"
            NewJob("noop", priority=1, run_at=base + timedelta(hours=2)),
            NewJob("noop", priority=500, run_at=base + timedelta(hours=1)),
            NewJob("noop", priority=-7, run_at=base + timedelta(hours=3)),
        ])
        await conn.execute("UPDATE queue_jobs SET status = 'cancelled', finished_at = now() WHERE priority = -7")
        due_in = await queue.next_due_in(conn)
        assert due_in is not None
        assert 3000 < due_in <= 3600  # the priority-500 job, an hour ahead (whatever else leads the index)
        assert await queue.next_due_in(conn, since=60) == 0  # came due within the last minute: due now
        await conn.execute("UPDATE queue_jobs SET run_at = 'infinity' WHERE priority = 500")
        later = await queue.next_due_in(conn)
        assert later is not None
        assert 3600 < later <= 7200


async def test_jobs_due_close_together_all_start_on_time(db: Database) -> None:
    """A job that comes due between a claim and the question "what is due next" is due now, not forgotten
    (it would otherwise wait for the next job's timer, or for the poll when it is the last one)."""
    w = idle_worker(db)
    run = asyncio.create_task(w.run())
    try:
        await asyncio.sleep(0.3)
        base = await db_now(db)
        async with db.raw() as conn:
            ids = await queue.enqueue_many(
                conn, [NewJob("noop", run_at=base + timedelta(seconds=1 + i * 0.007)) for i in range(40)])
        rows = [await completed(db, job_id) for job_id in ids if job_id is not None]
    finally:
        w.stop()
        await run
    assert len(rows) == 40
    for row in rows:
        assert row["run_at"] <= row["started_at"] < row["run_at"] + TIMER_BOUND
