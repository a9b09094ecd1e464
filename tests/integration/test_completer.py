"""The completer alone (no worker loop), against a real PostgreSQL.

Jobs are claimed with :func:`worker.queue.claim` as a worker would, then handed to a
:class:`worker.completer.Completer` as finished runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from briefs.db import Database
from worker import queue
from worker.accounting import WorkerStats
from worker.completer import Completer
from worker.connection import DedicatedConnection
from worker.queue import Job, NewJob

APP = "briefs-test-completer"


class BadResults:
    """The completer's ``on_bad_result``: records each call and fails the job as the worker does."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls: list[tuple[int, str]] = []

    async def __call__(self, job: Job, reason: str) -> None:
        self.calls.append((job.id, reason))
        async with self.db.raw() as conn:
            await queue.fail(conn, job, reason, permanent=True, retry_delay=0)


@pytest.fixture
async def parts(db: Database) -> AsyncIterator[tuple[Completer, WorkerStats, BadResults]]:
    stats = WorkerStats()
    bad = BadResults(db)
    completer = Completer(DedicatedConnection(db, APP), stats, bad)
    try:
        yield completer, stats, bad
    finally:
        await completer.close()


async def claimed(db: Database, count: int, worker_id: str = "worker-a") -> list[Job]:
    async with db.raw() as conn:
        await queue.enqueue_many(conn, [NewJob("noop") for _ in range(count)])
        return list(await queue.claim(conn, count, worker_id, lease_seconds=60))


async def rows(db: Database) -> dict[int, dict[str, Any]]:
    async with db.raw() as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute("SELECT id, status, result, last_error, processing_token FROM queue_jobs")
        return {row["id"]: row for row in await cur.fetchall()}


async def test_a_batch_is_written_once_in_one_statement(
    db: Database, parts: tuple[Completer, WorkerStats, BadResults], monkeypatch: pytest.MonkeyPatch
) -> None:
    completer, stats, bad = parts
    writes: list[int] = []
    real = queue.complete_many

    async def counted(conn: Any, done: Any) -> set[int]:
        writes.append(len(done))
        return await real(conn, done)

    monkeypatch.setattr(queue, "complete_many", counted)
    jobs = await claimed(db, 5)
    for n, job in enumerate(jobs):
        completer.add(job, {"n": n})
    assert sorted(completer.owned()) == sorted((job.id, job.token) for job in jobs)
    await completer.flush()
    await completer.flush()
    assert writes == [5]
    got = await rows(db)
    assert [(got[job.id]["status"], got[job.id]["result"]) for job in jobs] == [
        ("completed", {"n": n}) for n in range(5)
    ]
    assert (stats.completed, stats.lost, bad.calls) == (5, 0, [])
    assert completer.idle and completer.owned() == []


async def test_a_result_the_database_refuses_fails_only_its_job(
    db: Database, parts: tuple[Completer, WorkerStats, BadResults]
) -> None:
    completer, stats, bad = parts
    first, broken, last = await claimed(db, 3)
    completer.add(first, {"ok": 1})
    completer.add(broken, queue.JsonText('{"not": json'))  # passed as checked; PostgreSQL refuses it
    completer.add(last, None)
    await completer.flush()
    got = await rows(db)
    assert [got[job.id]["status"] for job in (first, broken, last)] == ["completed", "failed", "completed"]
    assert got[first.id]["result"] == {"ok": 1} and got[last.id]["result"] is None
    [(bad_id, reason)] = bad.calls
    assert bad_id == broken.id and reason.startswith("could not store the job's result: ")
    assert got[broken.id]["last_error"] == reason
    assert (stats.completed, stats.lost) == (2, 0)
    assert completer.idle


async def test_a_stale_completion_does_not_overwrite_a_rescued_job(
    db: Database, parts: tuple[Completer, WorkerStats, BadResults]
) -> None:
    completer, stats, _ = parts
    [old] = await claimed(db, 1)
    async with db.raw() as conn:
        await conn.execute("UPDATE queue_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
                           (old.id,))
        [(rescued_id, *_)] = await queue.rescue_expired(conn, retry_base=0.001, retry_max=0.001)
        await conn.execute("UPDATE queue_jobs SET run_at = now() WHERE id = %s", (old.id,))
        [new] = await queue.claim(conn, 1, "worker-b", lease_seconds=60)
    assert rescued_id == new.id == old.id and new.token != old.token
    completer.add(old, {"stale": True})
    await completer.flush()
    row = (await rows(db))[old.id]
    assert (row["status"], row["result"], row["processing_token"]) == ("processing", None, new.token)
    assert (stats.completed, stats.lost) == (0, 1) and completer.idle
    completer.add(new, {"fresh": True})  # the current run is written as usual
    await completer.flush()
    row = (await rows(db))[old.id]
    assert (row["status"], row["result"]) == ("completed", {"fresh": True})
    assert (stats.completed, stats.lost) == (1, 1)


async def test_nothing_is_lost_when_a_write_fails_and_is_retried(
    db: Database, parts: tuple[Completer, WorkerStats, BadResults], caplog: pytest.LogCaptureFixture
) -> None:
    completer, stats, _ = parts
    jobs = await claimed(db, 4)
    completer.add(jobs[0], {"n": 0})
    await completer.flush()  # the completer's connection is open now
    async with db.raw() as conn:
        cur = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s", (APP,)
        )
        assert await cur.fetchone() == (1,)
    for n, job in enumerate(jobs[1:], start=1):
        completer.add(job, {"n": n})
    with caplog.at_level(logging.WARNING, logger="worker.completer"):
        await completer.flush()  # the first write meets the dead connection; the retry reconnects
    failed_writes = [r for r in caplog.records if r.getMessage().startswith("completing 3 job(s) failed")]
    assert len(failed_writes) == 1
    got = await rows(db)
    assert [(got[job.id]["status"], got[job.id]["result"]) for job in jobs] == [
        ("completed", {"n": n}) for n in range(4)
    ]
    assert (stats.completed, stats.lost) == (4, 0) and completer.idle


async def test_a_batch_taken_by_a_claim_that_failed_is_written_later(
    db: Database, parts: tuple[Completer, WorkerStats, BadResults]
) -> None:
    completer, stats, _ = parts
    jobs = await claimed(db, 2)
    for job in jobs:
        completer.add(job, None)
    batch = completer.take()
    assert [job for job, _ in batch] == jobs
    assert completer.owned() == [] and not completer.idle  # on the wire: the heartbeat leaves them out
    completer.put_back(batch)
    assert sorted(completer.owned()) == sorted((job.id, job.token) for job in jobs)
    await completer.flush()
    got = await rows(db)
    assert [got[job.id]["status"] for job in jobs] == ["completed", "completed"]
    assert stats.completed == 2 and completer.idle


async def test_after_abort_a_failed_write_drops_the_completions(
    db: Database, parts: tuple[Completer, WorkerStats, BadResults]
) -> None:
    completer, stats, _ = parts
    jobs = await claimed(db, 2)
    completer.add(jobs[0], None)
    await completer.flush()
    async with db.raw() as conn:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                           (APP,))
    completer.add(jobs[1], None)
    completer.abort()
    await completer.flush()
    assert completer.idle and completer.owned() == []
    got = await rows(db)
    assert [got[job.id]["status"] for job in jobs] == ["completed", "processing"]  # its lease will expire
    assert (stats.completed, stats.lost) == (1, 0)
