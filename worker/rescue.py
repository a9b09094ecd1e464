"""Rescue: the jobs of workers that stopped heartbeating go back to the queue.

A run whose lease expired (its worker died, hung, or lost the database for longer
than the lease) consumed its attempt: :func:`worker.queue.rescue_expired` puts the job
back to pending after the job retry backoff, or fails it when its attempts are used
up. Any worker may rescue any job; ``FOR UPDATE SKIP LOCKED`` keeps two rescuers
from taking the same row.
"""

from __future__ import annotations

import logging

from briefs import metrics
from briefs.settings import Settings
from worker import queue
from worker.connection import DedicatedConnection

log = logging.getLogger(__name__)

# A lease is never taken for longer than this: one ending later (``infinity``, a bad manual edit)
# is rescued too. Ten leases at least, so a long BRIEFS_LEASE_SECONDS is never mistaken for one.
MIN_MAX_LEASE = 86400.0


class Rescuer:
    """Rescues expired leases, one batch per :meth:`rescue`; ``interval`` is how often to call it."""

    def __init__(self, conn: DedicatedConnection, settings: Settings) -> None:
        self._conn = conn
        self._retry_base = settings.retry_base
        self._retry_max = settings.retry_max
        self._max_lease = max(MIN_MAX_LEASE, 10 * settings.lease_seconds)
        # Often enough that a dead worker's job waits at most about one and a half leases.
        self.interval = max(0.2, min(settings.lease_seconds / 2, 30.0))

    async def rescue(self) -> list[queue.Rescued]:
        """Rescue what expired now (one statement); returns the jobs rescued, logged and counted."""
        conn = await self._conn.get()
        rescued = await queue.rescue_expired(
            conn, retry_base=self._retry_base, retry_max=self._retry_max, max_lease=self._max_lease
        )
        for job in rescued:
            metrics.JOBS_RESCUED.labels(metrics.job_type_label(job.job_type)).inc()
            log.warning("rescued job %s (%s) after its lease expired: now %s, attempt %d", job.id,
                        queue.short_repr(job.job_type), job.status, job.attempts)
        return rescued
