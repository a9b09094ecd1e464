"""The claim loop: slots, leases, heartbeats, batched completions, graceful shutdown.

One :class:`Worker` runs up to ``concurrency`` jobs at once. Its pieces:

- the claim loop claims only as many jobs as there are free slots and refills a
  slot as soon as one frees (no batch barrier); it sleeps on LISTEN/NOTIFY with a
  polling fallback, and marks ``stats.last_cycle`` at least every poll interval
  (the health check reads it);
- with slots free and nothing runnable, a timer wakes the claim loop when the next
  job scheduled ahead comes due (``run_at``, asked of the database after every claim
  that left slots free, so a NOTIFY of an earlier job re-arms it): a job scheduled
  for T starts at T, not at the next poll;
- each job runs as its own task under a timeout that really cancels it (a watchdog
  scans the running jobs, so a job costs no timer of its own);
- successes are written in batches by the :class:`~worker.completer.Completer`,
  which owns them until they are written: when a slot frees, the claim loop sends
  the completions that are waiting along with its claim (one statement); the
  completer writes whatever no claim is about to carry (queue empty, all slots
  busy); failures are written at once;
- the heartbeat renews leases for every job this worker still owns, running or
  finished-but-not-yet-written, in one statement; a run that is no longer ours
  (rescued, cancelled) is cancelled locally;
- the maintenance task rescues expired leases (:class:`~worker.rescue.Rescuer`) and
  prunes old rows (:class:`~worker.prune.Pruner`).

The claim loop and the completer each own a dedicated autocommit connection
(outside the pool, like the LISTEN connection): every claim and every batch of
completions is a single statement, so one round trip and one commit. The lease
statements (heartbeats, failures, releases, rescues, pruning) share a third
dedicated connection: handlers use the pool, and a handler that holds every pool
connection (a long SMTP exchange) must not starve the heartbeats into letting
leases expire. Nothing of the worker's own bookkeeping waits for the pool.

No row stops the worker: a claimed row that cannot be decoded, a payload too big
to read (failed by the claim statement itself), a payload that is not a JSON
object, a job whose attempts are used up, a result PostgreSQL would refuse — each
fails that one job at once, permanently, with the reason in ``last_error``; the
rest of its claim batch runs normally. Errors that the same
input raises again (:func:`briefs.errors.is_permanent`) fail once, not
``max_attempts`` times.

Runs are keyed by their ``processing_token``, not the job id: after a rescue this
worker may hold a newer run of the same job while the old one winds down.

``stop()`` is a soft stop: no new claims, running jobs get ``shutdown_grace``
seconds, the rest are released to pending with their attempt restored.
``abort()`` is the hard stop. Database outages are logged and retried with
backoff; the worker carries on when the database returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from briefs import metrics
from briefs.backoff import RECONNECT, job_retry
from briefs.db import Database, is_connection_error
from briefs.errors import is_permanent
from briefs.logs import job_context
from briefs.settings import Settings
from worker import queue
from worker.accounting import WorkerStats, metrics_for
from worker.completer import BAD_RESULT, Completer
from worker.connection import DedicatedConnection, first_line, retryable
from worker.prune import Pruner
from worker.queue import Job
from worker.rescue import Rescuer

__all__ = ["Handler", "HandlerFn", "JobContext", "Worker", "WorkerStats"]

log = logging.getLogger(__name__)

HandlerFn = Callable[["JobContext"], Awaitable[Any]]

CLAIM_APPLICATION_NAME = "briefs-claim"
COMPLETE_APPLICATION_NAME = "briefs-complete"
LEASE_APPLICATION_NAME = "briefs-lease"
# Seconds added to the time since the last claim when asking what is due next: the two statements' clocks
# (the database's now() at each) may be further apart than the worker measured between sending them.
DUE_SLACK = 0.1


@dataclass(frozen=True)
class Handler:
    fn: HandlerFn
    timeout: float | None = None  # None: settings.job_timeout


@dataclass
class JobContext:
    """What a handler gets: its job, the database, the settings and shared services."""

    job: Job
    db: Database
    settings: Settings
    services: dict[str, Any]
    worker_id: str

    async def progress(self, data: dict[str, Any]) -> None:
        """Publish progress in ``queue_jobs.progress`` (ignored if the job is no longer ours)."""
        async with self.db.raw() as conn:
            await queue.set_progress(conn, self.job.id, self.job.token, data)


class _Running:
    """One run of one job (a claim: the token identifies it)."""

    __slots__ = ("deadline", "job", "lost", "releasing", "task", "timed_out")

    def __init__(self, job: Job, deadline: float) -> None:
        self.job = job
        self.deadline = deadline  # loop time after which the watchdog cancels it
        self.task: asyncio.Task[Any] | None = None
        self.lost = False  # the lease is no longer ours: never write this run's outcome
        self.timed_out = False  # cancelled by its timeout
        self.releasing = False  # cancelled by shutdown: handed back to pending


class Worker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        handlers: dict[str, Handler],
        *,
        concurrency: int | None = None,
        burst: bool = False,
        services: dict[str, Any] | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.handlers = handlers
        self.concurrency = concurrency or settings.worker_concurrency
        self.burst = burst
        self.services = services if services is not None else {}
        self.worker_id = worker_id or settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.stats = WorkerStats()
        # Runs in progress, by token (one job may be run twice by this worker after a rescue).
        self._running: dict[UUID, _Running] = {}
        self._kick = asyncio.Event()  # the claim loop has something to look at
        self._wake = True  # runnable jobs may be waiting (a NOTIFY, a rescue, the poll)
        self._due_at: float | None = None  # loop time at which the next job scheduled ahead is due
        self._claimed_at = 0.0  # loop time at which the last claim was sent
        self._stopping = asyncio.Event()
        self._aborting = False
        self._retry_horizon: datetime | None = None  # latest retry this worker scheduled (burst waits for it)
        self._side_tasks: list[asyncio.Task[Any]] = []
        self._claim_conn = DedicatedConnection(db, CLAIM_APPLICATION_NAME)
        # Finished successfully, completion not written yet: still ours, still heartbeated.
        self._completer = Completer(DedicatedConnection(db, COMPLETE_APPLICATION_NAME), self.stats, self._bad_result)
        # Heartbeats, failures, releases, rescues, pruning: never the pool, which handlers can exhaust.
        self._lease_conn = DedicatedConnection(db, LEASE_APPLICATION_NAME, hot=False)
        self._rescuer = Rescuer(self._lease_conn, settings)
        self._pruner = Pruner(self._lease_conn, settings.retention_days)
        # A result is stored with the job; one too big (a handler returning megabytes) fails its job instead.
        self._max_result_bytes = queue.PAYLOAD_READ_FACTOR * settings.max_payload_bytes
        self._retry_policy = job_retry(settings.retry_base, settings.retry_max)
        metrics.register_job_types(handlers)

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Soft stop: finish what runs (within the grace period), claim nothing new."""
        if not self._stopping.is_set():
            log.info("worker %s stopping: %d job(s) in flight", self.worker_id, len(self._running))
        self._stopping.set()
        self._kick.set()

    def abort(self) -> None:
        """Hard stop: cancel running jobs now (they are released to pending)."""
        self._aborting = True
        self._completer.abort()
        self.stop()
        for running in list(self._running.values()):
            running.releasing = True
            if running.task is not None:
                running.task.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> WorkerStats:
        log.info(
            "worker %s started: %d slots, job types: %s",
            self.worker_id,
            self.concurrency,
            ", ".join(sorted(self.handlers)),
        )
        self._side_tasks = [
            asyncio.create_task(self._completer.run(), name="completer"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._listen_loop(), name="listener"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
        ]
        for task in self._side_tasks:
            task.add_done_callback(self._side_task_done)
        try:
            try:
                await self._claim_loop()
            finally:
                # Also when the claim loop crashed: running jobs get their grace, then are released.
                self._stopping.set()
                await self._drain()
        finally:
            await self._shutdown_side_tasks()
        log.info(
            "worker %s stopped: %d completed, %d failed, %d retried, %d released",
            self.worker_id,
            self.stats.completed,
            self.stats.failed,
            self.stats.retried,
            self.stats.released,
        )
        return self.stats

    def _side_task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("worker side task %s crashed: %r; stopping the worker", task.get_name(), exc)
            self.stop()

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self.stats.last_cycle = time.monotonic()
            free = self.concurrency - len(self._running)
            if free > 0 and self._wake:
                self._wake = False  # a NOTIFY during the claim sets it again
                self._due_at = None  # the claim takes what is due; a claim that leaves slots free re-arms
                self._claimed_at = asyncio.get_running_loop().time()
                try:
                    jobs = await self._claim(free)
                except BaseException as exc:
                    self._wake = True
                    failures += 1
                    await self._claim_failed(exc, failures)
                    continue
                if jobs is None:  # a result in the carried batch was refused: written apart, claim again
                    self._wake = True
                    continue
                failures = 0
                if self._stopping.is_set():
                    # Stopped while the claim was in flight: hand the jobs straight back.
                    await self._release(jobs, "claimed while the worker was stopping")
                    return
                self._start_all(jobs)
                if len(jobs) + len(jobs.refused) == free:
                    self._wake = True  # the queue may hold more
                    continue
                if self.burst and not self._running:
                    if await self._burst_finished():
                        return
                    continue
                if not self.burst:
                    await self._arm_timer()
            # Wait for a free slot, a wake-up, the next job due or the poll interval, whichever comes first.
            self._kick.clear()
            if self._wake and len(self._running) < self.concurrency:
                continue  # a NOTIFY arrived while the claim was in flight
            kicked = await self._wait_kick(self._wait_timeout())
            if not kicked or self.burst:
                self._wake = True

    async def _arm_timer(self) -> None:
        """Set the timer to the next job scheduled ahead (its delay computed by the database, on its clock).

        Left unset when nothing is due within the poll interval, or when asking fails: the poll
        and the NOTIFY still wake the claim loop.
        """
        loop = asyncio.get_running_loop()
        # Since a little before the claim: a job that came due meanwhile (the claim did not see it) is due now.
        since = loop.time() - self._claimed_at + DUE_SLACK
        try:
            conn = await self._claim_conn.cursor()
            due_in = await queue.next_due_in(conn, since)
        except Exception as exc:
            if is_connection_error(exc):
                await self._claim_conn.close()
            level = logging.WARNING if retryable(exc) else logging.ERROR
            log.log(level, "could not read when the next job is due (%s); polling", first_line(exc))
            return
        if due_in is not None and due_in < self.settings.poll_interval:
            self._due_at = loop.time() + due_in

    def _wait_timeout(self) -> float:
        """How long the claim loop may sleep: the poll interval, or less when a job is due sooner and a slot is free."""
        due_at = self._due_at
        if due_at is None or len(self._running) >= self.concurrency:
            return self.settings.poll_interval
        return min(self.settings.poll_interval, max(due_at - asyncio.get_running_loop().time(), 0.0))

    async def _claim(self, free: int) -> queue.Claimed | None:
        """Claim up to ``free`` jobs; the completions waiting ride along (one statement, one commit).

        None when the database refused a result of that batch: the completer wrote it apart
        (failing that job alone) and nothing was claimed.
        """
        batch = self._completer.take()
        written: set[int] = set()
        try:
            conn = await self._claim_conn.cursor()
            if batch:
                written, jobs = await queue.complete_and_claim(
                    conn, [(j.id, j.token, r) for j, r in batch], free, self.worker_id,
                    self.settings.lease_seconds, max_payload_bytes=self.settings.max_payload_bytes,
                )
            else:
                jobs = await queue.claim(conn, free, self.worker_id, self.settings.lease_seconds,
                                         max_payload_bytes=self.settings.max_payload_bytes)
        except BaseException as exc:
            self._completer.put_back(batch)  # not written (or not known to be): written again, fenced
            if batch and isinstance(exc, BAD_RESULT):
                await self._completer.flush()  # the completer's path isolates the bad result
                return None
            raise
        if batch:
            self._completer.written(batch, written)
        if jobs.refused:
            self._account_refused(jobs.refused)
        self.stats.claims += 1
        return jobs

    async def _claim_failed(self, exc: BaseException, failures: int) -> None:
        """After the ``failures``-th failed claim in a row: wait to try again, or raise what is no outage."""
        if not retryable(exc):
            raise exc
        if is_connection_error(exc):
            await self._claim_conn.close()
        delay = RECONNECT.delay(failures)
        log.warning("claim failed (%s); retrying in %.1fs", first_line(exc), delay)
        await self._sleep(delay)

    async def _burst_finished(self) -> bool:
        """Burst mode, nothing running: return True when nothing runnable is left.

        Waits for the retries this worker scheduled (a short backoff is still drained),
        not for jobs planned for later by someone else.
        """
        try:
            conn = await self._claim_conn.cursor()
            due_in = await queue.next_runnable_in(conn, self._retry_horizon)
        except Exception as exc:
            if not retryable(exc):
                raise
            await self._claim_conn.close()
            await self._sleep(0.5)
            self._wake = True
            return False
        if due_in is None:
            await self._completer.flush()
            return not self._running and self._completer.idle
        if due_in > 0:
            self._kick.clear()
            await self._wait_kick(min(due_in, self.settings.poll_interval))
        self._wake = True
        return False

    def _account_refused(self, refused: Sequence[tuple[int, str]]) -> None:
        """Rows the claim failed without returning them (a payload too big to read): counted and logged."""
        for job_id, job_type in refused:
            self.stats.failed += 1
            metrics_for(job_type).failed.inc()
            log.error("job %s (%s) failed for good without running: its payload is too big to read (see last_error)",
                      job_id, queue.short_repr(job_type))

    def _start_all(self, jobs: Sequence[Job]) -> None:
        now = asyncio.get_running_loop().time()
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job.job_type] = counts.get(job.job_type, 0) + 1
            handler = self.handlers.get(job.job_type)
            timeout = (handler.timeout if handler else None) or self.settings.job_timeout
            running = _Running(job, now + timeout)
            running.task = asyncio.create_task(self._run_job(running, handler, timeout), name=f"job-{job.id}")
            self._running[job.token] = running
        self.stats.claimed += len(jobs)
        for job_type, count in counts.items():
            metrics_for(job_type).claimed.inc(count)

    async def _watchdog(self) -> None:
        """Cancels runs past their timeout (one scan of the running jobs, not a timer per job)."""
        timeouts = [h.timeout for h in self.handlers.values() if h.timeout] + [self.settings.job_timeout]
        interval = min(1.0, max(0.01, min(timeouts) / 10))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for running in list(self._running.values()):
                if running.deadline <= now and not running.timed_out:
                    task = running.task
                    if task is not None and not task.done():
                        running.timed_out = True
                        task.cancel()

    async def _run_job(self, running: _Running, handler: Handler | None, timeout: float) -> None:
        job = running.job
        started = time.monotonic()
        try:
            with job_context(job):
                outcome: Any = None
                error: BaseException | None = None
                try:
                    self._check_runnable(job, handler)
                    assert handler is not None
                    outcome = await handler.fn(JobContext(job, self.db, self.settings, self.services, self.worker_id))
                except asyncio.CancelledError:
                    if running.lost:
                        log.warning("job %s cancelled: its lease is no longer ours", job.id)
                        return
                    if running.releasing or not running.timed_out:
                        raise  # shutdown: the worker hands it back
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()
                    error = TimeoutError(f"job timed out after {timeout:g}s (cancelled)")
                except Exception as exc:
                    error = exc
                metrics_for(job.job_type).duration.observe(time.monotonic() - started)
                if running.lost:
                    return
                result: queue.JsonText | None = None
                if error is None and outcome is not None:
                    try:
                        result = queue.dump_json(_jsonable(outcome), limit=self._max_result_bytes)
                    except ValueError as exc:  # PostgreSQL would refuse it: fail this job alone, now
                        error = _Permanent(f"could not store the job's result: it {exc}")
                if error is None:
                    self._completer.add(job, result)
                else:
                    await self._record_failure(job, error)
        finally:
            # The slot frees as soon as the handler is done; completions are written in batches.
            if self._running.get(job.token) is running:
                del self._running[job.token]
            self._kick.set()

    def _check_runnable(self, job: Job, handler: Handler | None) -> None:
        """Raise a permanent error for a job that must not reach a handler (checked before every run)."""
        if job.problem is not None:
            raise _Permanent(job.problem)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            raise _Permanent(f"unknown job type {queue.short_repr(job.job_type)} (this worker knows: {known})")
        if not isinstance(job.payload, dict):
            raise _Permanent(f"payload must be a JSON object, got a JSON {_json_kind(job.payload)}")
        if job.attempts > job.max_attempts:
            raise _Permanent(f"attempts used up: this would be attempt {job.attempts} of {job.max_attempts}")

    async def _record_failure(self, job: Job, error: BaseException) -> None:
        permanent = is_permanent(error)
        # A handler's "not now" (``refund = True``, e.g. briefs.errors.Defer): run again later, attempt not spent.
        deferred = getattr(error, "refund", False) is True and not permanent
        message = _error_message(error)
        delay = getattr(error, "delay", None)
        if isinstance(delay, bool) or not isinstance(delay, int | float):  # None, or not a number
            delay = self._retry_policy.delay(job.attempts)
        delay = queue.clamp_delay(delay)
        result: queue.FailOutcome | None = None
        for attempt in range(5):
            try:
                conn = await self._lease_conn.get()
                result = await queue.fail(conn, job, message, permanent=permanent, retry_delay=delay,
                                          refund=deferred)
                break
            except Exception as exc:
                if not retryable(exc) or attempt == 4:
                    log.error("could not record failure of job %s: %s", job.id, first_line(exc))
                    return  # the lease will expire and the rescuer takes over
                await asyncio.sleep(RECONNECT.delay(attempt + 1))
        if result is None:
            log.warning("job %s failed but is no longer ours (rescued or cancelled): %s", job.id, message)
            return
        type_metrics = metrics_for(job.job_type)
        if result.status == "failed":
            self.stats.failed += 1
            type_metrics.failed.inc()
            log.error(
                "job %s failed for good after %d attempt(s)%s: %s",
                job.id,
                result.attempts,
                " (permanent error)" if permanent else "",
                message,
            )
        else:
            if result.run_at is not None and delay <= self.settings.retry_max:
                self._note_retry(result.run_at)  # a burst worker waits for it (not for a RetryLater days ahead)
            if deferred:
                self.stats.deferred += 1
                log.info("job %s deferred to %s (attempt not spent): %s", job.id, result.run_at, message)
                return
            self.stats.retried += 1
            type_metrics.retried.inc()
            log.warning("job %s attempt %d failed, retrying at %s: %s", job.id, result.attempts, result.run_at, message)

    def _note_retry(self, run_at: datetime) -> None:
        if self._retry_horizon is None or run_at > self._retry_horizon:
            self._retry_horizon = run_at

    async def _bad_result(self, job: Job, reason: str) -> None:
        """The completer could not store a job's result: the job fails for good, with the reason."""
        await self._record_failure(job, _Permanent(reason))

    # ------------------------------------------------------------------ leases

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            running = [r for r in self._running.values() if not r.lost]
            owned = [(r.job.id, r.job.token) for r in running]
            # Finished runs are still ours until their completion is written (a slow write must not let
            # the lease expire: the job would run again). Those being written right now are left out.
            owned += self._completer.owned()
            if not owned:
                continue
            try:
                conn = await self._lease_conn.get()
                alive = await queue.heartbeat(conn, owned, self.settings.lease_seconds)
            except Exception as exc:
                if not retryable(exc):
                    raise
                log.warning("heartbeat failed (%s); will retry", first_line(exc))
                continue
            for run in running:
                # Still running here but not ours in the database: rescued or cancelled.
                if run.job.token not in alive and not run.lost and self._running.get(run.job.token) is run:
                    run.lost = True
                    self.stats.lost += 1
                    log.warning("job %s is no longer ours (lease lost or cancelled); stopping it", run.job.id)
                    if run.task is not None:
                        run.task.cancel()

    # ------------------------------------------------------------------ wake-ups

    def _wake_up(self) -> None:
        self._wake = True
        self._kick.set()

    async def _listen_loop(self) -> None:
        failures = 0
        while True:
            try:
                conn = await self.db.listen_connection()
            except Exception as exc:
                failures += 1
                log.warning("LISTEN connection failed (%s); polling until it returns", first_line(exc))
                await asyncio.sleep(RECONNECT.delay(failures))
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {queue.NOTIFY_CHANNEL}")
                    if failures:
                        log.info("LISTEN re-established")
                    failures = 0
                    self._wake_up()  # anything enqueued while we were away
                    async for _ in conn.notifies():
                        self._wake_up()
            except Exception as exc:
                failures += 1
                log.warning("LISTEN connection lost (%s); reconnecting", first_line(exc))
                await asyncio.sleep(RECONNECT.delay(failures))

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await self._rescue()
                await self._pruner.prune_if_due()
            except Exception as exc:
                # Whatever the cause, maintenance never stops the worker: it is tried again next round.
                level = logging.WARNING if retryable(exc) else logging.ERROR
                log.log(level, "queue maintenance failed (%s); will retry", first_line(exc))
            await asyncio.sleep(self._rescuer.interval * (0.75 + random.random() / 2))

    async def _rescue(self) -> None:
        """One round of the rescuer; the rescued jobs are runnable again (or soon: a burst waits for them)."""
        rescued = await self._rescuer.rescue()
        for job in rescued:
            if job.run_at is not None:
                self._note_retry(job.run_at)
        if rescued:
            self._wake_up()

    async def prune(self) -> int:
        """Delete every finished job older than the retention period now; returns how many."""
        return await self._pruner.prune()

    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self._running and not self._aborting:
            log.info("waiting up to %gs for %d running job(s)", self.settings.shutdown_grace, len(self._running))
            deadline = loop.time() + self.settings.shutdown_grace
            while self._running and not self._aborting:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._kick.clear()
                await self._wait_kick(remaining)
        leftovers = [r for r in self._running.values() if not r.lost]
        for run in self._running.values():
            run.releasing = True
            if run.task is not None:
                run.task.cancel()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            # A handler that swallows cancellation does not hold the shutdown up for long.
            await asyncio.wait(tasks, timeout=0.5 if self._aborting else 2.0)
        # Runs that ended with a success of their own (a handler that ignored the cancel) are completed instead.
        unfinished = [r.job for r in leftovers if not self._completer.holds(r.job.token)]
        self._running.clear()
        # No heartbeat from here on: it would race the release for the same rows.
        await self._cancel_side_task("heartbeat")
        if unfinished:
            await self._release(unfinished, f"released by worker {self.worker_id} at shutdown")
        try:
            async with asyncio.timeout(1.0 if self._aborting else 10.0):
                await self._completer.flush()
        except Exception as exc:
            log.error("could not write final completions (%s); their leases will expire", first_line(exc))

    async def _release(self, jobs: Sequence[Job], reason: str) -> None:
        """Hand jobs back to pending with their attempt restored (they did not really run)."""
        if not jobs:
            return
        try:
            async with asyncio.timeout(1.0 if self._aborting else 10.0):
                conn = await self._lease_conn.get()
                released = await queue.release(conn, [(job.id, job.token) for job in jobs], reason)
            self.stats.released += len(released)
            log.info("released %d job(s) back to pending (attempts restored)", len(released))
        except Exception as exc:
            log.error("could not release %d job(s) (%s); their leases will expire", len(jobs), first_line(exc))

    async def _cancel_side_task(self, name: str) -> None:
        for task in self._side_tasks:
            if task.get_name() == name:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _shutdown_side_tasks(self) -> None:
        for task in self._side_tasks:
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        await self._claim_conn.close()
        await self._completer.close()
        await self._lease_conn.close()

    # ------------------------------------------------------------------ helpers

    async def _wait_kick(self, timeout: float) -> bool:
        """Wait until the claim loop is kicked (True) or ``timeout`` passes (False).

        A timer that sets the event is much cheaper than ``asyncio.wait_for`` (no task per wait).
        """
        kick = self._kick
        if kick.is_set():
            return True
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            kick.set()

        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            await kick.wait()
        finally:
            timer.cancel()
        return not fired

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the worker stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


class _Permanent(Exception):
    permanent = True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, dict | list | str | int | float | bool):
        return value
    return {"value": str(value)}


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def _error_message(error: BaseException) -> str:
    """What ``last_error`` says: the text of a permanent-by-the-worker error, else ``Type: text``."""
    try:
        text = str(error)
    except Exception:  # an exception whose __str__ fails still gets recorded
        text = "(message could not be read)"
    text = queue.safe_text(text)
    return text if isinstance(error, _Permanent) else f"{type(error).__name__}: {text}"
