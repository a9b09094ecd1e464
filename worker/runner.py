"""The claim loop: slots, leases, heartbeats, batched completions, graceful shutdown.

One :class:`Worker` runs up to ``concurrency`` jobs at once. Its pieces:

- the claim loop claims only as many jobs as there are free slots and refills a
  slot as soon as one frees (no batch barrier); it sleeps on LISTEN/NOTIFY with a
  polling fallback;
- each job runs as its own task under a timeout that really cancels it;
- successes are written by a completer in batches (one UPDATE for all the jobs
  that finished since the last write); failures are written at once;
- the heartbeat renews leases for every running job in one statement; a job that
  is no longer ours (rescued, cancelled) is cancelled locally;
- the maintenance task rescues expired leases and prunes old rows.

``stop()`` is a soft stop: no new claims, running jobs get ``shutdown_grace``
seconds, the rest are released to pending with their attempt restored.
``abort()`` is the hard stop. Database outages are logged and retried with
backoff; the worker carries on when the database returns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from briefs import metrics
from briefs.db import Database, is_connection_error
from briefs.logs import job_context
from briefs.settings import Settings
from worker import queue
from worker.queue import Job

log = logging.getLogger(__name__)

HandlerFn = Callable[["JobContext"], Awaitable[Any]]


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


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[Any]
    lost: bool = False  # the lease is no longer ours: never write this job's outcome


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    lost: int = 0
    released: int = 0
    claims: int = 0
    last_cycle: float = field(default_factory=time.monotonic)


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
        self._running: dict[int, _Running] = {}
        self._done: list[tuple[Job, Any]] = []
        self._done_ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._aborting = False
        self._side_tasks: list[asyncio.Task[Any]] = []
        self._claim_conn = db.held()
        self._done_conn = db.held()
        self._flush_lock = asyncio.Lock()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Soft stop: finish what runs (within the grace period), claim nothing new."""
        if not self._stopping.is_set():
            log.info("worker %s stopping: %d job(s) in flight", self.worker_id, len(self._running))
        self._stopping.set()
        self._wake.set()
        self._slot_free.set()

    def abort(self) -> None:
        """Hard stop: cancel running jobs now."""
        self._aborting = True
        self.stop()
        for running in list(self._running.values()):
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
            asyncio.create_task(self._completer(), name="completer"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._listen_loop(), name="listener"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
        ]
        for task in self._side_tasks:
            task.add_done_callback(self._side_task_done)
        try:
            await self._claim_loop()
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
        while not self.stopping:
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            self._wake.clear()
            try:
                async with self._claim_conn.transaction() as conn:
                    jobs = await queue.claim(conn, free, self.worker_id, self.settings.lease_seconds)
                failures = 0
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6)) * (0.5 + random.random() / 2)
                log.warning("claim failed (database unavailable: %s); retrying in %.1fs", _first_line(exc), delay)
                await self._sleep(delay)
                continue
            self.stats.claims += 1
            self.stats.last_cycle = time.monotonic()
            for job in jobs:
                self._start(job)
            if len(jobs) < free:
                # The queue has nothing more runnable right now.
                if self.burst:
                    if not self._running and not await self._runnable_left():
                        return
                    # Wait for a slot or a wake-up: running jobs may enqueue or retry more.
                    await self._wait_any(self._slot_free, self._wake, timeout=0.2)
                    continue
                await self._wait_any(self._wake, timeout=self.settings.poll_interval)

    async def _runnable_left(self) -> bool:
        await self._flush_done()
        async with self.db.raw() as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM queue_jobs WHERE status = 'pending' AND run_at <= now())"
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    def _start(self, job: Job) -> None:
        self.stats.claimed += 1
        metrics.JOBS_CLAIMED.labels(job.job_type).inc()
        task = asyncio.create_task(self._run_job(job), name=f"job-{job.id}")
        self._running[job.id] = _Running(job, task)

    async def _run_job(self, job: Job) -> None:
        started = time.monotonic()
        with job_context(job):
            try:
                handler = self.handlers.get(job.job_type)
                outcome: Any = None
                error: BaseException | None = None
                try:
                    if handler is None:
                        raise _Permanent(
                            f"unknown job type {job.job_type!r} (this worker knows: {', '.join(sorted(self.handlers))})"
                        )
                    ctx = JobContext(job, self.db, self.settings, self.services, self.worker_id)
                    timeout = handler.timeout or self.settings.job_timeout
                    deadline = asyncio.timeout(timeout)
                    try:
                        async with deadline:
                            outcome = await handler.fn(ctx)
                    except TimeoutError as exc:
                        if deadline.expired():
                            raise TimeoutError(f"job timed out after {timeout:g}s (cancelled)") from exc
                        raise
                except asyncio.CancelledError:
                    if self._running.get(job.id) is None or self._running[job.id].lost:
                        log.warning("job %s cancelled: its lease is no longer ours", job.id)
                        return
                    raise  # shutdown: the releaser hands it back
                except Exception as exc:
                    error = exc
                metrics.JOB_DURATION.labels(job.job_type).observe(time.monotonic() - started)
                running = self._running.get(job.id)
                if running is not None and running.lost:
                    return
                if error is None:
                    self._done.append((job, _jsonable(outcome)))
                    self._done_ready.set()
                else:
                    await self._record_failure(job, error)
            finally:
                # The slot frees as soon as the handler is done; completions are written in batches.
                self._running.pop(job.id, None)
                self._slot_free.set()

    async def _record_failure(self, job: Job, error: BaseException) -> None:
        permanent = bool(getattr(error, "permanent", False))
        message = f"{type(error).__name__}: {error}" if not isinstance(error, _Permanent) else str(error)
        delay = getattr(error, "delay", None)
        if delay is None:
            delay = queue.backoff_seconds(job.attempts, self.settings.retry_base, self.settings.retry_max)
        for attempt in range(5):
            try:
                async with self.db.raw() as conn:
                    result = await queue.fail(conn, job, message, permanent=permanent, retry_delay=delay)
                break
            except Exception as exc:
                if not is_connection_error(exc) or attempt == 4:
                    log.error("could not record failure of job %s: %s", job.id, _first_line(exc))
                    return  # the lease will expire and the rescuer takes over
                await asyncio.sleep(0.5 * 2**attempt)
        if result is None:
            log.warning("job %s failed but is no longer ours (rescued or cancelled): %s", job.id, message)
            return
        if result.status == "failed":
            self.stats.failed += 1
            metrics.JOBS_FAILED.labels(job.job_type).inc()
            log.error(
                "job %s failed for good after %d attempt(s)%s: %s",
                job.id,
                result.attempts,
                " (permanent error)" if permanent else "",
                message,
            )
        else:
            self.stats.retried += 1
            metrics.JOBS_RETRIED.labels(job.job_type).inc()
            log.warning("job %s attempt %d failed, retrying at %s: %s", job.id, result.attempts, result.run_at, message)

    # ------------------------------------------------------------------ completions

    async def _completer(self) -> None:
        while True:
            await self._done_ready.wait()
            await self._flush_done()

    async def _flush_done(self) -> None:
        async with self._flush_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        failures = 0
        while self._done:
            batch, self._done = self._done, []
            self._done_ready.clear()
            try:
                async with self._done_conn.transaction() as conn:
                    written = await queue.complete_many(conn, [(j.id, j.token, result) for j, result in batch])
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._done = batch + self._done
                failures += 1
                if self._aborting or failures > 8:
                    log.error("dropping %d completion(s): database unavailable; leases will expire", len(batch))
                    self._done = []
                    return
                delay = min(10.0, 0.2 * 2**failures)
                log.warning("completing %d job(s) failed (%s); retrying in %.1fs", len(batch), _first_line(exc), delay)
                await asyncio.sleep(delay)
                continue
            for job, _ in batch:
                if job.id in written:
                    self.stats.completed += 1
                    metrics.JOBS_COMPLETED.labels(job.job_type).inc()
                else:
                    self.stats.lost += 1
                    log.warning("job %s finished but is no longer ours; its result was discarded", job.id)
            self.stats.last_cycle = time.monotonic()

    # ------------------------------------------------------------------ leases

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, self.settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            owned = [(r.job.id, r.job.token) for r in self._running.values() if not r.lost]
            if not owned:
                continue
            try:
                async with self.db.raw() as conn:
                    alive = await queue.heartbeat(conn, owned, self.settings.lease_seconds)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                log.warning("heartbeat failed (%s); will retry", _first_line(exc))
                continue
            for job_id, _ in owned:
                running = self._running.get(job_id)
                if job_id not in alive and running is not None and not running.lost:
                    running.lost = True
                    self.stats.lost += 1
                    log.warning("job %s is no longer ours (lease lost or cancelled); stopping it", job_id)
                    running.task.cancel()

    # ------------------------------------------------------------------ wake-ups

    async def _listen_loop(self) -> None:
        failures = 0
        while True:
            try:
                conn = await self.db.listen_connection()
            except Exception as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("LISTEN connection failed (%s); polling until it returns", _first_line(exc))
                await asyncio.sleep(delay)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {queue.NOTIFY_CHANNEL}")
                    if failures:
                        log.info("LISTEN re-established")
                    failures = 0
                    self._wake.set()  # anything enqueued while we were away
                    async for _ in conn.notifies():
                        self._wake.set()
            except Exception as exc:
                failures += 1
                log.warning("LISTEN connection lost (%s); reconnecting", _first_line(exc))
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))

    async def _maintenance_loop(self) -> None:
        rescue_every = max(0.2, min(self.settings.lease_seconds / 2, 30.0))
        prune_every = 600.0
        next_prune = time.monotonic() + random.random() * 60
        while True:
            try:
                async with self.db.raw() as conn:
                    rescued = await queue.rescue_expired(
                        conn, retry_base=self.settings.retry_base, retry_max=self.settings.retry_max
                    )
                for job_id, job_type, status, attempts in rescued:
                    metrics.JOBS_RESCUED.labels(job_type).inc()
                    log.warning("rescued job %s (%s) after its lease expired: now %s, attempt %d", job_id, job_type,
                                status, attempts)
                if rescued:
                    self._wake.set()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + prune_every
                    await self.prune()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                log.warning("queue maintenance failed (%s); will retry", _first_line(exc))
            await asyncio.sleep(rescue_every * (0.75 + random.random() / 2))

    async def prune(self) -> int:
        total = 0
        retention = self.settings.retention_days * 86400
        while True:
            async with self.db.raw() as conn:
                deleted = await queue.prune(conn, retention)
            total += deleted
            if deleted == 0:
                break
            await asyncio.sleep(0.05)  # small batches, room for everyone else
        if total:
            log.info("pruned %d finished job(s) older than %g days", total, self.settings.retention_days)
        return total

    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        if self._running and not self._aborting:
            log.info("waiting up to %gs for %d running job(s)", self.settings.shutdown_grace, len(self._running))
            deadline = time.monotonic() + self.settings.shutdown_grace
            while self._running and not self._aborting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._slot_free.clear()
                await self._wait_any(self._slot_free, timeout=remaining)
        leftovers = [r for r in self._running.values() if not r.lost]
        for running in self._running.values():
            running.task.cancel()
        if self._running:
            await asyncio.gather(*(r.task for r in self._running.values()), return_exceptions=True)
        if leftovers:
            try:
                async with asyncio.timeout(1.0 if self._aborting else 10.0):
                    async with self.db.raw() as conn:
                        released = await queue.release(
                            conn,
                            [(r.job.id, r.job.token) for r in leftovers],
                            f"released by worker {self.worker_id} at shutdown",
                        )
                self.stats.released += len(released)
                log.info("released %d job(s) back to pending (attempts restored)", len(released))
            except Exception as exc:
                log.error("could not release %d job(s) (%s); their leases will expire", len(leftovers),
                          _first_line(exc))
        self._running.clear()
        try:
            async with asyncio.timeout(1.0 if self._aborting else 10.0):
                await self._flush_done()
        except Exception as exc:
            log.error("could not write final completions (%s); their leases will expire", _first_line(exc))

    async def _shutdown_side_tasks(self) -> None:
        for task in self._side_tasks:
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        await self._claim_conn.close()
        await self._done_conn.close()

    # ------------------------------------------------------------------ helpers

    async def _sleep(self, seconds: float) -> None:
        await self._wait_any(timeout=seconds)

    async def _wait_any(self, *events: asyncio.Event, timeout: float) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in (*events, self._stopping)]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


class _Permanent(Exception):
    permanent = True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, dict | list | str | int | float | bool):
        return value
    return {"value": str(value)}


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
