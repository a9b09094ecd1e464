"""Deadline-first claims: among due jobs of a priority, the earliest deadline runs first.

A job's deadline is its ``notify_at`` (a brief's delivery), or its ``run_at`` when it has none.
The scheduler starts a brief early when LLM capacity is short, so a brief can be due long before
another that must be delivered sooner: the claim must still take the sooner one first. Jobs not
yet due are never claimed, whatever their deadline. Times are set well apart (minutes), so the
gap between the test's clock and the database's does not matter.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from briefs.db import Database
from tests.integration.test_queue import drain, enqueue, job, runs
from worker import queue
from worker.queue import NewJob

MINUTE = timedelta(minutes=1)


async def claim_one_by_one(db: Database) -> list[int]:
    """Ids in the order single-row claims take them, until none is runnable."""
    order: list[int] = []
    async with db.raw() as conn:
        while claimed := await queue.claim(conn, 1, "order-test", lease_seconds=60):
            order.extend(j.id for j in claimed)
    return order


async def claim_batch(db: Database, limit: int = 50) -> list[int]:
    async with db.raw() as conn:
        return [j.id for j in await queue.claim(conn, limit, "order-test", lease_seconds=60)]


async def test_an_earlier_deadline_is_claimed_first_even_when_it_came_due_later(db: Database) -> None:
    now = datetime.now(UTC)
    started_early, sooner = await enqueue(
        db,
        NewJob("noop", run_at=now - 30 * MINUTE, notify_at=now + 120 * MINUTE),
        NewJob("noop", run_at=now - MINUTE, notify_at=now + 20 * MINUTE),
    )
    assert await claim_one_by_one(db) == [sooner, started_early]


async def test_jobs_without_a_deadline_keep_run_at_order_and_interleave_by_deadline(db: Database) -> None:
    now = datetime.now(UTC)
    # Deadlines (coalesce(notify_at, run_at)): plain_a -30, late_brief +10, plain_c -5, overdue_brief -25,
    # plain_b -20 minutes. Enqueued out of order, so ids do not give the answer away.
    late_brief, plain_c, overdue_brief, plain_b, plain_a = await enqueue(
        db,
        NewJob("noop", run_at=now - 50 * MINUTE, notify_at=now + 10 * MINUTE),
        NewJob("noop", run_at=now - 5 * MINUTE),
        NewJob("noop", run_at=now - 40 * MINUTE, notify_at=now - 25 * MINUTE),
        NewJob("noop", run_at=now - 20 * MINUTE),
        NewJob("noop", run_at=now - 30 * MINUTE),
    )
    expected = [plain_a, overdue_brief, plain_b, plain_c, late_brief]
    assert await claim_one_by_one(db) == expected


async def test_a_batch_comes_back_in_deadline_order(db: Database) -> None:
    """One claim of many rows: the statement's ORDER BY picks them, the rows are handed out in it too."""
    now = datetime.now(UTC)
    ids = await enqueue(
        db,
        *(NewJob("noop", run_at=now - (40 - i) * MINUTE, notify_at=now + (60 - 5 * i) * MINUTE)
          for i in range(8)),
        NewJob("noop", run_at=now - 10 * MINUTE),
    )
    *briefs, plain = ids
    assert await claim_batch(db) == [plain, *reversed(briefs)]


async def test_priority_still_comes_before_the_deadline(db: Database) -> None:
    now = datetime.now(UTC)
    urgent_low, plain_low, late_high, plain_high = await enqueue(
        db,
        NewJob("noop", priority=100, run_at=now - MINUTE, notify_at=now - 60 * MINUTE),
        NewJob("noop", priority=100, run_at=now - 30 * MINUTE),
        NewJob("noop", priority=10, run_at=now - MINUTE, notify_at=now + 240 * MINUTE),
        NewJob("noop", priority=10, run_at=now - 2 * MINUTE),
    )
    assert await claim_one_by_one(db) == [plain_high, late_high, urgent_low, plain_low]


async def test_a_job_not_yet_due_is_not_claimed_however_early_its_deadline(db: Database) -> None:
    now = datetime.now(UTC)
    due, future_sooner, future_first = await enqueue(
        db,
        NewJob("noop", run_at=now - MINUTE, notify_at=now + 180 * MINUTE),
        NewJob("noop", run_at=now + 60 * MINUTE, notify_at=now + 70 * MINUTE),
        NewJob("noop", priority=0, run_at=now + 60 * MINUTE, notify_at=now - 60 * MINUTE),
    )
    assert await claim_batch(db) == [due]
    assert [(await job(db, i))["status"] for i in (future_sooner, future_first)] == ["pending", "pending"]


async def test_the_worker_runs_due_jobs_in_deadline_order(db: Database, test_runs: str) -> None:
    """End to end: the worker's own claims (generic plans on its dedicated connections, completions
    riding along with the next claim) take the jobs in the same order."""
    now = datetime.now(UTC)
    started_early, plain, sooner, future = await enqueue(
        db,
        NewJob("record", run_at=now - 30 * MINUTE, notify_at=now + 90 * MINUTE),
        NewJob("record", run_at=now - 10 * MINUTE),
        NewJob("record", run_at=now - MINUTE, notify_at=now + 15 * MINUTE),
        NewJob("record", run_at=now + 60 * MINUTE, notify_at=now + 65 * MINUTE),
    )
    await drain(db, concurrency=1)
    assert [r["job_id"] for r in await runs(db)] == [plain, sooner, started_early]
    assert (await job(db, future))["status"] == "pending"
