"""Completions: the successes not written yet, batched, written, and counted.

One :class:`Completer` owns every finished job whose completion is not written yet.
From :meth:`Completer.add` until the write, such a job is still this worker's: the
heartbeat keeps its lease (:meth:`Completer.owned`), or a slow write would let the
job run again. Completions are written in batches, two ways:

- the claim loop, whose slot just freed, carries what is waiting along with its
  claim (one statement, one commit): it :meth:`~Completer.take`\\ s the batch and
  reports back with :meth:`~Completer.written` or :meth:`~Completer.put_back`;
- :meth:`Completer.run` writes whatever no claim is about to carry (queue empty,
  every slot busy), as does :meth:`Completer.flush` at shutdown.

A write is fenced by the run's token: a run that is no longer ours (rescued,
cancelled) is not written and is counted ``lost``. A result the database refuses
fails its own job only (``on_bad_result``), not the batch. An outage or a lock
conflict is retried with :data:`briefs.backoff.RECONNECT`; after
:data:`MAX_WRITE_FAILURES` in a row (or at once after :meth:`Completer.abort`)
the completions are dropped: their leases expire and the rescuer takes over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from uuid import UUID

import psycopg

from briefs.backoff import RECONNECT
from briefs.db import is_connection_error
from worker import queue
from worker.accounting import WorkerStats, metrics_for
from worker.connection import DedicatedConnection, first_line, retryable
from worker.queue import Job

log = logging.getLogger(__name__)

# What a result the database cannot store raises (client-side JSON dump, or the server refusing it).
BAD_RESULT = (psycopg.DataError, TypeError, ValueError)

MAX_WRITE_FAILURES = 8  # failed writes in a row before the waiting completions are dropped

Done = tuple[Job, Any]  # a finished run and its result (JSON value, JsonText, or None)


class Completer:
    """The pending completions of one worker and their writing.

    ``on_bad_result(job, reason)`` records the failure of a job whose result the
    database refused (the job is no longer a pending completion by then).
    """

    def __init__(
        self,
        conn: DedicatedConnection,
        stats: WorkerStats,
        on_bad_result: Callable[[Job, str], Awaitable[None]],
    ) -> None:
        self._conn = conn
        self._stats = stats
        self._on_bad_result = on_bad_result
        self._waiting: list[Done] = []  # not on the wire yet
        self._unwritten: dict[UUID, Job] = {}  # every run not settled yet, by token
        self._writing: set[UUID] = set()  # of those, the ones whose completion is on the wire now
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._aborting = False

    # ------------------------------------------------------------------ state

    def add(self, job: Job, result: Any) -> None:
        """A run that succeeded: its completion is to be written."""
        self._unwritten[job.token] = job
        self._waiting.append((job, result))
        self._ready.set()

    def owned(self) -> list[tuple[int, UUID]]:
        """(id, token) of the runs whose lease still needs renewing: unwritten, and not on the wire now."""
        writing = self._writing
        return [(job.id, job.token) for job in self._unwritten.values() if job.token not in writing]

    def holds(self, token: UUID) -> bool:
        """Whether the run of ``token`` finished and its completion is not settled yet."""
        return token in self._unwritten

    @property
    def idle(self) -> bool:
        """Nothing left to write."""
        return not self._unwritten

    def abort(self) -> None:
        """Hard stop: a write that fails is not retried; its completions are dropped."""
        self._aborting = True

    # ------------------------------------------------------------------ the claim loop's batch

    def take(self) -> list[Done]:
        """The completions waiting, handed to a caller that writes them (then :meth:`written` or :meth:`put_back`)."""
        batch, self._waiting = self._waiting, []
        if batch:
            self._ready.clear()
            self._writing.update(job.token for job, _ in batch)
        return batch

    def put_back(self, batch: Sequence[Done]) -> None:
        """A taken batch that was not written (or not known to be): written again later (fenced, idempotent)."""
        if batch:
            self._writing.difference_update(job.token for job, _ in batch)
            self._waiting[:0] = batch
            self._ready.set()

    def written(self, batch: Sequence[Done], written_ids: set[int]) -> None:
        """Book a written batch: counted completed, or lost when the token no longer held."""
        counts: dict[str, int] = {}
        writing = self._writing
        for job, _ in batch:
            writing.discard(job.token)
            if self._unwritten.pop(job.token, None) is None:
                continue  # settled otherwise (its result could not be stored: recorded as a failure)
            if job.id in written_ids:
                counts[job.job_type] = counts.get(job.job_type, 0) + 1
            else:
                self._stats.lost += 1
                log.warning("job %s finished but is no longer ours; its result was discarded", job.id)
        for job_type, count in counts.items():
            self._stats.completed += count
            metrics_for(job_type).completed.inc(count)

    # ------------------------------------------------------------------ writing

    async def run(self) -> None:
        """Write what no claim carries, as soon as it waits (a task for the worker's lifetime)."""
        while True:
            await self._ready.wait()
            # Let the claim loop go first: when the job that just finished freed a slot, it takes
            # the completions along with its claim. What is left (no claim coming) is written here.
            await asyncio.sleep(0)
            if self._waiting:
                await self.flush()
            else:
                self._ready.clear()

    async def flush(self) -> None:
        """Write every waiting completion; returns when none waits (or they were dropped)."""
        async with self._lock:
            failures = 0
            while self._waiting:
                batch = self.take()
                try:
                    written_ids = await self._write(batch)
                except BaseException as exc:
                    self.put_back(batch)
                    failures += 1
                    if not await self._retry_after(exc, failures):
                        return
                    continue
                self.written(batch, written_ids)

    async def _retry_after(self, exc: BaseException, failures: int) -> bool:
        """After a failed write: wait and return True to try again, or drop what waits and return False."""
        if not retryable(exc):
            raise exc
        if is_connection_error(exc):
            await self._conn.close()
        if self._aborting or failures > MAX_WRITE_FAILURES:
            log.error("dropping %d completion(s): database unavailable; leases will expire", len(self._waiting))
            for job, _ in self._waiting:
                self._unwritten.pop(job.token, None)
            self._waiting = []
            self._ready.clear()
            return False
        delay = RECONNECT.delay(failures)
        log.warning("completing %d job(s) failed (%s); retrying in %.1fs", len(self._waiting), first_line(exc), delay)
        await asyncio.sleep(delay)
        return True

    async def _write(self, batch: Sequence[Done]) -> set[int]:
        """Write a batch of completions; returns the ids written (the runs that were still ours)."""
        conn = await self._conn.cursor()
        try:
            return await queue.complete_many(conn, [(job.id, job.token, result) for job, result in batch])
        except BAD_RESULT:
            if len(batch) == 1:
                raise
        # One result the database refuses (e.g. JSON it cannot store) must not sink the others.
        written_ids: set[int] = set()
        for job, result in batch:
            try:
                written_ids |= await self._write([(job, result)])
            except BAD_RESULT as exc:
                self._unwritten.pop(job.token, None)
                await self._on_bad_result(job, f"could not store the job's result: {first_line(exc)}")
        return written_ids

    async def close(self) -> None:
        await self._conn.close()
