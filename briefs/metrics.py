"""Prometheus metrics, shared by every part of the process (exposed on /metrics).

Label values come from a bounded set: a job type gets a label of its own only when
this process knows it (the built-in types, and the types the worker has handlers
for); every other job type (a typo, a job for a newer release, hostile rows) is
counted under ``other``. Thousands of distinct job types in the queue therefore
add one series, not thousands.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

OTHER = "other"
MAX_KNOWN_JOB_TYPES = 200  # registered types beyond this share the "other" label too

_KNOWN_JOB_TYPES: set[str] = {"noop", "generate_daily_brief", "send_brief_email"}
_KNOWN_LOCK = threading.Lock()


def register_job_types(names: Iterable[str]) -> None:
    """Give these job types labels of their own (the worker registers its handlers' types)."""
    with _KNOWN_LOCK:
        for name in names:
            if len(_KNOWN_JOB_TYPES) >= MAX_KNOWN_JOB_TYPES:
                break
            if isinstance(name, str) and 0 < len(name) <= 100:
                _KNOWN_JOB_TYPES.add(name)


def known_job_types() -> list[str]:
    with _KNOWN_LOCK:
        return sorted(_KNOWN_JOB_TYPES)


def job_type_label(job_type: object) -> str:
    """The label for a job type: itself when known, else ``other``."""
    return job_type if job_type in _KNOWN_JOB_TYPES else OTHER  # type: ignore[return-value]

JOBS_CLAIMED = Counter("briefs_jobs_claimed_total", "Jobs claimed by this process", ["job_type"])
JOBS_COMPLETED = Counter("briefs_jobs_completed_total", "Jobs completed", ["job_type"])
JOBS_FAILED = Counter("briefs_jobs_failed_total", "Jobs failed for good", ["job_type"])
JOBS_RETRIED = Counter("briefs_jobs_retried_total", "Job runs that failed and will be retried", ["job_type"])
JOBS_RESCUED = Counter("briefs_jobs_rescued_total", "Jobs rescued after their lease expired", ["job_type"])
JOB_DURATION = Histogram(
    "briefs_job_duration_seconds",
    "Handler run time",
    ["job_type"],
    buckets=(0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_DEPTH = Gauge("briefs_queue_depth", "Jobs per type and status", ["job_type", "status"])
QUEUE_OLDEST_PENDING = Gauge(
    "briefs_queue_oldest_pending_seconds", "Age of the oldest runnable pending job", ["job_type"]
)

TICK_DURATION = Histogram(
    "briefs_scheduler_tick_seconds", "Scheduler tick duration", buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)
)
TICK_USERS_ENQUEUED = Counter("briefs_scheduler_enqueued_total", "Brief jobs enqueued by the scheduler")
TICK_USERS_SKIPPED = Counter("briefs_scheduler_skipped_total", "Users skipped by the scheduler", ["reason"])

LLM_CALLS = Counter("briefs_llm_calls_total", "LLM requests sent", ["purpose"])
LLM_ERRORS = Counter("briefs_llm_errors_total", "LLM requests that failed", ["purpose", "kind"])
LLM_TOKENS = Counter("briefs_llm_tokens_total", "LLM tokens used", ["kind"])
LLM_LATENCY = Histogram(
    "briefs_llm_latency_seconds", "LLM request latency", ["purpose"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
)
