"""Prometheus metrics, shared by every part of the process (exposed on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
