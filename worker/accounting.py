"""What the worker counts: its own :class:`WorkerStats`, and the Prometheus children per job type."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from briefs import metrics


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0  # runs a handler put off without spending an attempt (not failures)
    lost: int = 0
    released: int = 0
    claims: int = 0
    last_cycle: float = field(default_factory=time.monotonic)


class TypeMetrics:
    """The Prometheus children of one job type, looked up once (``labels()`` takes a lock and a dict)."""

    __slots__ = ("claimed", "completed", "duration", "failed", "retried")

    def __init__(self, job_type: str) -> None:
        self.claimed = metrics.JOBS_CLAIMED.labels(job_type)
        self.completed = metrics.JOBS_COMPLETED.labels(job_type)
        self.failed = metrics.JOBS_FAILED.labels(job_type)
        self.retried = metrics.JOBS_RETRIED.labels(job_type)
        self.duration = metrics.JOB_DURATION.labels(job_type)


_TYPE_METRICS: dict[str, TypeMetrics] = {}


def metrics_for(job_type: str) -> TypeMetrics:
    """The metrics of a job type's label: bounded (unknown types share ``other``), and so is this cache."""
    found = _TYPE_METRICS.get(job_type)
    if found is None:
        label = metrics.job_type_label(job_type)
        found = _TYPE_METRICS.get(label)
        if found is None:
            found = _TYPE_METRICS[label] = TypeMetrics(label)
    return found
