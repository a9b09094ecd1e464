"""The pruner alone: which rows it deletes, in what batches, and when it is due."""

from __future__ import annotations

from typing import Any

import pytest

from briefs.db import Database
from worker import queue
from worker.connection import DedicatedConnection
from worker.prune import Pruner


async def insert(db: Database, count: int, status: str, finished_days_ago: float | None) -> set[int]:
    """``count`` rows created 30 days ago, in ``status``, finished that many days ago (None: not finished)."""
    async with db.raw() as conn:
        cur = await conn.execute(
            """INSERT INTO queue_jobs (job_type, status, created_at, run_at, finished_at, processing_token,
                                       lease_expires_at)
               SELECT 'noop', %(status)s, now() - interval '30 days', now() - interval '30 days',
                      now() - make_interval(days => %(days)s::int),
                      CASE WHEN %(status)s = 'processing' THEN gen_random_uuid() END,
                      CASE WHEN %(status)s = 'processing' THEN now() + interval '1 hour' END
               FROM generate_series(1, %(count)s)
               RETURNING id""",
            {"status": status, "days": finished_days_ago, "count": count},
        )
        return {job_id for (job_id,) in await cur.fetchall()}


async def ids(db: Database) -> set[int]:
    async with db.raw() as conn:
        cur = await conn.execute("SELECT id FROM queue_jobs")
        return {job_id for (job_id,) in await cur.fetchall()}


async def test_prune_deletes_only_finished_rows_older_than_the_retention_in_batches(
    db: Database, lease_conn: DedicatedConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = set()
    for status in ("completed", "failed", "cancelled"):
        old |= await insert(db, 7, status, finished_days_ago=10)
    recent = await insert(db, 3, "completed", finished_days_ago=1)
    unfinished = await insert(db, 2, "pending", None) | await insert(db, 2, "processing", None)
    batches: list[int] = []
    real = queue.prune

    async def counted(*args: Any, **kwargs: Any) -> int:
        deleted = await real(*args, **kwargs)
        batches.append(deleted)
        return deleted

    monkeypatch.setattr(queue, "prune", counted)
    assert await Pruner(lease_conn, retention_days=7, batch=5).prune() == len(old) == 21
    assert batches == [5, 5, 5, 5, 1, 0]
    assert await ids(db) == recent | unfinished
    assert await Pruner(lease_conn, retention_days=0.5, batch=5).prune() == 3  # a shorter retention
    assert await ids(db) == unfinished


async def test_prune_if_due_prunes_once_per_period(db: Database, lease_conn: DedicatedConnection) -> None:
    pruner = Pruner(lease_conn, retention_days=7, every=3600, first_in=0)
    await insert(db, 4, "completed", finished_days_ago=10)
    assert await pruner.prune_if_due() == 4
    await insert(db, 2, "completed", finished_days_ago=10)
    assert await pruner.prune_if_due() == 0  # not due again for an hour
    assert len(await ids(db)) == 2
    later = Pruner(lease_conn, retention_days=7, first_in=3600)
    assert await later.prune_if_due() == 0 and len(await ids(db)) == 2
