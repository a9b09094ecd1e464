"""Prometheus metrics, shared by every part of the process (exposed on /metrics).

Label values come from a bounded set: a job type gets a label of its own only when
this process knows it (the built-in types, and the types the worker has handlers
for); every other job type (a typo, a job for a newer release, hostile rows) is
counted under ``other``. Thousands of distinct job types in the queue therefore
add one series, not thousands.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

OTHER = "other"
MAX_KNOWN_JOB_TYPES = 200  # registered types beyond this share the "other" label too

# Empty until a process registers the types it knows (metrics sit below every job type's owner).
_KNOWN_JOB_TYPES: set[str] = set()
_KNOWN_LOCK = threading.Lock()


def register_job_types(names: Iterable[str]) -> None:
    """Give these job types labels of their own (the worker registers its handlers' types, the
    composition root the application's)."""
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
    return job_type if isinstance(job_type, str) and job_type in _KNOWN_JOB_TYPES else OTHER

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
QUEUE_DEPTH = Gauge(
    "briefs_queue_depth", "Pending, running, failed and cancelled jobs per type and status", ["job_type", "status"]
)
QUEUE_OLDEST_PENDING = Gauge(
    "briefs_queue_oldest_pending_seconds", "Age of the oldest runnable pending job", ["job_type"]
)

TICK_DURATION = Histogram(
    "briefs_scheduler_tick_seconds", "Scheduler tick duration", buckets=(0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60)
)
TICK_USERS_ENQUEUED = Counter("briefs_scheduler_enqueued_total", "Brief jobs enqueued by the scheduler")
TICK_USERS_SKIPPED = Counter("briefs_scheduler_skipped_total", "Users skipped by the scheduler", ["reason"])
TICK_EXPECTED_LATE = Gauge(
    "briefs_scheduler_briefs_expected_late",
    "Briefs of the scheduler's window that the LLM capacity cannot finish by their notify_at (last tick's plan)",
)

LLM_CALLS = Counter("briefs_llm_calls_total", "LLM requests sent", ["purpose"])
LLM_ERRORS = Counter("briefs_llm_errors_total", "LLM requests that failed", ["purpose", "kind"])
LLM_TOKENS = Counter("briefs_llm_tokens_total", "LLM tokens used", ["kind"])
# Priced by BRIEFS_LLM_PRICES: the label is a model of that table (bounded by it); calls of a model it
# does not price count in briefs_llm_unpriced_calls_total instead (their cost is unknown, not 0).
LLM_COST = Counter("briefs_llm_cost_total", "LLM cost of successful calls, in BRIEFS_LLM_CURRENCY", ["model"])
# Set by the console's stats base (briefs.web.stats, every 15 s or so) in the web process: the day's (UTC)
# priced spend over every process's finished briefs, what BRIEFS_LLM_DAILY_BUDGET is compared with.
LLM_SPEND_TODAY = Gauge("briefs_llm_spend_today", "Today's (UTC) priced LLM spend of finished briefs, all processes")
LLM_UNPRICED = Counter("briefs_llm_unpriced_calls_total", "Successful LLM calls of a model without a price")
LLM_CIRCUIT_STATE = Gauge(
    "briefs_llm_circuit_state", "The LLM circuit breaker: 0 closed, 1 half-open, 2 open (briefs.circuit)"
)
LLM_CIRCUIT_REFUSED = Counter(
    "briefs_llm_circuit_refused_total", "LLM requests not sent because the circuit was open", ["purpose"]
)
LLM_LATENCY = Histogram(
    "briefs_llm_latency_seconds", "LLM request latency", ["purpose"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
)


# --------------------------------------------------------------------------- database connection pools

# What psycopg_pool's get_stats() reports, summed over the process's pools (tests and tools make several;
# a service has one). Gauges: the pools as they are now. Counters: since the process started, including
# the pools already disposed of (their last counts are kept), so they never go down.
POOL_GAUGES = {
    "pool_size": ("briefs_db_pool_connections", "Pooled connections open, in use or idle, or being opened"),
    "pool_available": ("briefs_db_pool_idle_connections", "Pooled connections idle in the pool"),
    "pool_max": ("briefs_db_pool_max_connections", "Most connections the pools may open"),
    "requests_waiting": ("briefs_db_pool_waiting_requests", "Checkouts waiting for a pooled connection now"),
}
POOL_COUNTERS = {
    "requests_num": ("briefs_db_pool_requests", "Connections asked of the pool", 1),
    "requests_queued": ("briefs_db_pool_queued_requests", "Checkouts that had to wait for a connection", 1),
    "requests_wait_ms": ("briefs_db_pool_wait_seconds", "Time checkouts spent waiting for a connection", 1e-3),
    "requests_errors": ("briefs_db_pool_request_errors", "Checkouts that failed (timed out waiting)", 1),
    "connections_num": ("briefs_db_pool_connections_opened", "Connection attempts made by the pool", 1),
    "connections_errors": ("briefs_db_pool_connection_errors", "Connection attempts that failed", 1),
    "connections_lost": ("briefs_db_pool_connections_lost", "Idle connections found broken by a check", 1),
    "returns_bad": ("briefs_db_pool_bad_returns", "Connections returned broken or closed (then replaced)", 1),
}


class _StatsSource(Protocol):
    def get_stats(self) -> dict[str, int]: ...


_POOLS: weakref.WeakSet[_StatsSource] = weakref.WeakSet()
_RETIRED_COUNTS: collections.Counter[str] = collections.Counter()
_POOLS_LOCK = threading.Lock()  # /metrics is rendered in a thread


def watch_pool(pool: _StatsSource) -> None:
    """Include this (open) pool in the ``briefs_db_pool_*`` metrics; watching it twice changes nothing."""
    with _POOLS_LOCK:
        _POOLS.add(pool)


def forget_pool(pool: _StatsSource) -> None:
    """Stop watching a pool that is being closed; its counts stay in the counters' totals."""
    with _POOLS_LOCK:
        if pool in _POOLS:
            _POOLS.discard(pool)
            stats = pool.get_stats()
            _RETIRED_COUNTS.update({key: stats.get(key, 0) for key in POOL_COUNTERS})


def pool_totals() -> dict[str, float]:
    """Every pool statistic summed over the watched pools (counters: plus the forgotten ones)."""
    with _POOLS_LOCK:
        pools = list(_POOLS)
        totals: collections.Counter[str] = collections.Counter(_RETIRED_COUNTS)
    for pool in pools:
        # get_stats() copies the pool's counters in one C-level dict copy: safe off the loop's thread.
        stats = pool.get_stats()
        totals.update({key: stats.get(key, 0) for key in (*POOL_GAUGES, *POOL_COUNTERS)})
    return {key: float(totals[key]) for key in (*POOL_GAUGES, *POOL_COUNTERS)}


class _PoolCollector(Collector):
    """Reads the pools' statistics when /metrics is scraped (nothing to update between scrapes)."""

    def collect(self) -> Iterator[Metric]:
        totals = pool_totals()
        for key, (name, doc) in POOL_GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=totals[key])
        for key, (name, doc, scale) in POOL_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=totals[key] * scale)


REGISTRY.register(_PoolCollector())  # once per process: this module is imported once
