"""Job types for tests and drills, loaded with ``BRIEFS_HANDLER_MODULES=tests.handlers_for_tests``.

Every run of ``record`` and ``sleep`` leaves a row in ``test_runs`` (created by the
``test_runs`` fixture), keyed ``UNIQUE (job_id, run)`` where ``run`` is the
attempt number: a second run of a job shows up as a second row, and a run that
somehow happened twice under one attempt breaks the constraint. Rows are written
on the job's own connection from the pool, so they are independent of the
queue's bookkeeping (that is the point: they record what really ran).

In-process tests can also look at :data:`EVENTS`, a log of what handlers saw.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from briefs.errors import PermanentError, RetryLater
from worker.runner import Handler, JobContext

TEST_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS test_runs (
    job_id      bigint      NOT NULL,
    run         int         NOT NULL,
    worker      text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    UNIQUE (job_id, run)
)
"""

# (event, job id, attempt): what handlers saw, for in-process tests.
EVENTS: list[tuple[str, int, int]] = []


def _note(event: str, ctx: JobContext) -> None:
    EVENTS.append((event, ctx.job.id, ctx.job.attempts))


async def _insert_run(ctx: JobContext, *, finished: bool) -> None:
    async with ctx.db.raw() as conn:
        await conn.execute(
            "INSERT INTO test_runs (job_id, run, worker, finished_at)"
            " VALUES (%s, %s, %s, CASE WHEN %s THEN clock_timestamp() END)",
            (ctx.job.id, ctx.job.attempts, f"{ctx.worker_id}/{os.getpid()}", finished),
        )


async def record(ctx: JobContext) -> dict[str, Any]:
    """Write one finished row per run; payload ``{"fail_times": n}`` fails the first n attempts."""
    await _insert_run(ctx, finished=True)
    if ctx.job.attempts <= int(ctx.job.payload.get("fail_times", 0)):
        raise RuntimeError(f"record: failing attempt {ctx.job.attempts} on purpose")
    return {"run": ctx.job.attempts}


async def sleep(ctx: JobContext) -> dict[str, Any]:
    """Payload ``{"seconds": s, "retry_seconds": r}``: the first attempt sleeps s, later ones r (default s).

    The run's row is written when it starts and marked finished when it ends, so a
    killed or cancelled run stays visible as started-but-not-finished.
    """
    payload = ctx.job.payload
    seconds = float(payload.get("seconds", 0.1))
    if ctx.job.attempts > 1:
        seconds = float(payload.get("retry_seconds", seconds))
    await _insert_run(ctx, finished=False)
    _note("started", ctx)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _note("cancelled", ctx)
        raise
    async with ctx.db.raw() as conn:
        await conn.execute(
            "UPDATE test_runs SET finished_at = clock_timestamp() WHERE job_id = %s AND run = %s",
            (ctx.job.id, ctx.job.attempts),
        )
    _note("finished", ctx)
    return {"slept": seconds}


async def fail(ctx: JobContext) -> None:
    """Always raises (a transient error: retried until max_attempts)."""
    _note("failed", ctx)
    raise RuntimeError(f"fail: attempt {ctx.job.attempts} failed on purpose")


async def permanent(ctx: JobContext) -> None:
    raise PermanentError("permanent: this job can never succeed")


async def retry_later(ctx: JobContext) -> str:
    """Asks to be retried after ``payload["delay"]`` seconds on its first attempt, then succeeds."""
    if ctx.job.attempts == 1:
        raise RetryLater("retry_later: not yet", delay=float(ctx.job.payload.get("delay", 0.05)))
    return "done"


async def hang(ctx: JobContext) -> None:
    """Sleeps far longer than its 0.3 s timeout; notes whether it was cancelled or (wrongly) finished."""
    _note("started", ctx)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        _note("cancelled", ctx)
        raise
    _note("finished", ctx)


async def progress(ctx: JobContext) -> dict[str, Any]:
    """Publishes progress in steps, pausing ``payload["pause"]`` seconds after each."""
    steps = int(ctx.job.payload.get("steps", 3))
    pause = float(ctx.job.payload.get("pause", 0.0))
    for step in range(1, steps + 1):
        await ctx.progress({"step": step, "of": steps})
        if pause:
            await asyncio.sleep(pause)
    return {"steps": steps}


async def bad_result(ctx: JobContext) -> dict[str, Any]:
    """Returns a result the database cannot store as JSON."""
    return {"not json": float("nan")}


HANDLERS: dict[str, Handler] = {
    "record": Handler(record),
    "sleep": Handler(sleep),
    "fail": Handler(fail),
    "permanent": Handler(permanent),
    "retry_later": Handler(retry_later),
    "hang": Handler(hang, timeout=0.3),
    "progress": Handler(progress),
    "bad_result": Handler(bad_result),
}
