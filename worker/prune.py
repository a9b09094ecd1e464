"""Pruning: finished jobs are deleted once they are older than the retention period.

Deleted in small batches (:func:`worker.queue.prune`), with a pause between them, so
that pruning a large backlog never holds many row locks or one long transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from worker import queue
from worker.connection import DedicatedConnection

log = logging.getLogger(__name__)

PRUNE_EVERY = 600.0  # seconds between prunes of one worker
BATCH = 1000  # rows per statement
PAUSE = 0.05  # seconds between batches: room for everyone else


class Pruner:
    """Deletes finished jobs older than ``retention_days``: all of them by :meth:`prune`, on schedule by
    :meth:`prune_if_due`: every ``every`` seconds, the first time ``first_in`` seconds from now (by
    default at random within a minute, so workers started together do not all prune at once)."""

    def __init__(
        self,
        conn: DedicatedConnection,
        retention_days: float,
        *,
        every: float = PRUNE_EVERY,
        batch: int = BATCH,
        first_in: float | None = None,
    ) -> None:
        self._conn = conn
        self.retention_days = retention_days
        self.every = every
        self.batch = batch
        self._next = time.monotonic() + (random.random() * 60 if first_in is None else first_in)

    async def prune(self) -> int:
        """Delete, batch after batch, every finished job past the retention period; returns how many."""
        total = 0
        retention = self.retention_days * 86400
        while True:
            conn = await self._conn.get()
            deleted = await queue.prune(conn, retention, self.batch)
            total += deleted
            if deleted == 0:
                break
            await asyncio.sleep(PAUSE)
        if total:
            log.info("pruned %d finished job(s) older than %g days", total, self.retention_days)
        return total

    async def prune_if_due(self) -> int:
        """:meth:`prune` when its time has come (every ``every`` seconds), else nothing (0)."""
        if time.monotonic() < self._next:
            return 0
        self._next = time.monotonic() + self.every
        return await self.prune()
