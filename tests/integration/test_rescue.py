"""The rescuer alone: a crashed worker is simulated as data (rows left 'processing' with their
lease expired), then the rescuer runs once."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import pytest

from briefs.db import Database
from tests.conftest import make_settings
from worker.connection import DedicatedConnection
from worker.rescue import Rescuer


async def left_running(db: Database, lease: str, attempts: int = 1, max_attempts: int = 3) -> int:
    """A row as a worker that died mid-run leaves it: 'processing', its lease ending at ``lease``."""
    async with db.raw() as conn:
        cur = await conn.execute(
            """INSERT INTO queue_jobs (job_type, status, attempts, max_attempts, locked_by, processing_token,
                                       lease_expires_at, run_at, started_at)
               VALUES ('noop', 'processing', %s, %s, 'dead-worker', gen_random_uuid(), now() + %s::interval,
                       now() - interval '1 hour', now() - interval '1 hour')
               RETURNING id""",
            (attempts, max_attempts, lease),
        )
        found = await cur.fetchone()
    assert found is not None
    (job_id,) = found
    return int(job_id)


async def row(db: Database, job_id: int) -> dict[str, Any]:
    async with db.raw() as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        await cur.execute(
            """SELECT status, attempts, locked_by, lease_expires_at, finished_at, last_error,
                      extract(epoch FROM run_at - updated_at)::float8 AS retry_in
               FROM queue_jobs WHERE id = %s""",
            (job_id,),
        )
        found = await cur.fetchone()
    assert found is not None
    return found


async def test_one_round_takes_back_the_jobs_of_a_crashed_worker_and_nothing_else(
    db: Database, lease_conn: DedicatedConnection, caplog: pytest.LogCaptureFixture
) -> None:
    retry_id = await left_running(db, "-1 minute", attempts=1, max_attempts=3)
    used_up = await left_running(db, "-1 minute", attempts=3, max_attempts=3)
    endless = await left_running(db, "1000 years")  # no lease a worker takes
    alive = await left_running(db, "1 minute")  # a live worker's run
    rescuer = Rescuer(lease_conn, make_settings(db.url, retry_base=10.0, retry_max=60.0, lease_seconds=5.0))
    with caplog.at_level(logging.WARNING, logger="worker.rescue"):
        rescued = await rescuer.rescue()
    assert sorted((job.id, job.status, job.attempts) for job in rescued) == [
        (retry_id, "pending", 1), (used_up, "failed", 3), (endless, "pending", 1)
    ]
    assert {job.id: job.run_at is None for job in rescued} == {retry_id: False, used_up: True, endless: False}
    assert len([r for r in caplog.records if r.getMessage().startswith("rescued job ")]) == 3
    pending = await row(db, retry_id)
    assert (pending["status"], pending["locked_by"], pending["lease_expires_at"], pending["finished_at"]) == (
        "pending", None, None, None)
    assert pending["last_error"] == "lease expired: worker dead-worker stopped heartbeating (attempt 1 of 3)"
    failed = await row(db, used_up)
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    assert "is not one a worker takes" in (await row(db, endless))["last_error"]
    untouched = await row(db, alive)
    assert (untouched["status"], untouched["locked_by"]) == ("processing", "dead-worker")
    assert await rescuer.rescue() == []  # the next round finds nothing left


async def test_a_rescued_job_waits_the_job_retry_backoff(db: Database, lease_conn: DedicatedConnection) -> None:
    """The same policy as a handler's failure (briefs.backoff.job_retry): base doubling per attempt, at most
    the cap, less up to half of it at random."""
    by_attempt = {attempts: await left_running(db, "-1 second", attempts, 50) for attempts in (1, 2, 3, 40)}
    rescuer = Rescuer(lease_conn, make_settings(db.url, retry_base=10.0, retry_max=30.0))
    assert len(await rescuer.rescue()) == 4
    ceilings = {1: 10.0, 2: 20.0, 3: 30.0, 40: 30.0}
    for attempts, job_id in by_attempt.items():
        retry_in = (await row(db, job_id))["retry_in"]
        assert ceilings[attempts] / 2 <= retry_in <= ceilings[attempts], (attempts, retry_in)
