"""Real ``python -m worker`` processes: many at once, SIGKILL, SIGTERM, killed connections, the CLI.

Job types come from :mod:`tests.handlers_for_tests` (``BRIEFS_HANDLER_MODULES``);
``test_runs`` records every real run, keyed by (job id, attempt).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.acceptance.helpers import WorkerProcess, briefs_command, query, scalar
from tests.polling import wait_for
from worker import queue as q


def enqueue(url: str, job_type: str, n: int = 1, payload: dict[str, Any] | None = None, **columns: Any) -> list[int]:
    """Insert ``n`` jobs in one statement (one NOTIFY, as the queue's own enqueue does)."""
    extra_cols = "".join(f", {c}" for c in columns)
    extra_vals = "".join(f", %({c})s" for c in columns)
    with psycopg.connect(url, autocommit=True, application_name="test-admin") as conn:
        rows = conn.execute(
            f"""INSERT INTO queue_jobs (job_type, payload{extra_cols})
                SELECT %(type)s, %(payload)s{extra_vals} FROM generate_series(1, %(n)s) RETURNING id""",
            {"type": job_type, "payload": Jsonb(payload or {}), "n": n, **columns},
        ).fetchall()
        conn.execute("SELECT pg_notify('briefs_queue', '')")
    return [r[0] for r in rows]


def statuses(url: str) -> dict[str, int]:
    return dict(query(url, "SELECT status, count(*) FROM queue_jobs GROUP BY status"))  # type: ignore[arg-type]


def running_runs(url: str, ids: list[int]) -> int:
    return scalar(url, "SELECT count(*) FROM test_runs WHERE job_id = ANY(%s) AND finished_at IS NULL", (ids,))


@pytest.mark.slow
def test_four_workers_run_five_thousand_jobs_exactly_once(clean_db: str, test_runs: str) -> None:
    url = clean_db
    workers = [WorkerProcess(url, "--concurrency", "10") for _ in range(4)]
    try:
        for w in workers:
            w.wait_started()
        ids = enqueue(url, "record", 5000)
        wait_for(lambda: statuses(url), 60, "5,000 completed jobs", accept=lambda s: s == {"completed": 5000},
                 interval=0.2)
        for w in workers:
            w.signal(signal.SIGTERM)
        assert [w.wait(15) for w in workers] == [0, 0, 0, 0]
    finally:
        for w in workers:
            w.close()
    # Every job ran exactly once: one run row per job (UNIQUE (job_id, run) catches a repeat of an attempt).
    [(runs, distinct, max_run, by_workers)] = query(
        url, "SELECT count(*), count(DISTINCT job_id), max(run), count(DISTINCT worker) FROM test_runs")
    assert (runs, distinct, max_run) == (5000, 5000, 1)
    assert by_workers == 4  # all four took part
    assert query(url, "SELECT min(id), max(id), max(attempts), count(*) FILTER (WHERE result IS NULL) "
                      "FROM queue_jobs") == [(ids[0], ids[-1], 1, 0)]


@pytest.mark.slow
def test_jobs_of_a_killed_worker_are_finished_by_another_after_the_lease(clean_db: str, test_runs: str) -> None:
    url = clean_db
    ids = enqueue(url, "sleep", 3, {"seconds": 60, "retry_seconds": 0.2})
    with WorkerProcess(url, LEASE_SECONDS=2) as victim:
        victim.wait_until(lambda: running_runs(url, ids), 30, "three running jobs", accept=lambda n: n == 3)
        old_tokens = query(url, "SELECT id, processing_token FROM queue_jobs WHERE id = ANY(%s)", (ids,))
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        leases = dict(query(url, "SELECT id, lease_expires_at FROM queue_jobs WHERE id = ANY(%s)", (ids,)))
        with WorkerProcess(url, LEASE_SECONDS=2, POLL_INTERVAL=0.2) as rescuer:
            rescuer.wait_until(lambda: statuses(url), 30, "the rescuer to complete them",
                               accept=lambda s: s == {"completed": 3})
            rescuer.signal(signal.SIGTERM)
            assert rescuer.wait(15) == 0
            assert "rescued job" in rescuer.log()
    assert query(url, "SELECT DISTINCT attempts, status FROM queue_jobs") == [(2, "completed")]
    # Not before the lease expired: every second run started after the killed worker's lease on its job ran out.
    restarts = dict(query(url, "SELECT job_id, started_at FROM test_runs WHERE run = 2"))
    assert sorted(restarts) == sorted(ids)
    assert all(restarts[job_id] > leases[job_id] for job_id in ids), (restarts, leases)
    # Run 1 (killed) never finished; run 2 (the rescuer's) did.
    assert query(url, "SELECT run, count(*), count(finished_at) FROM test_runs GROUP BY run ORDER BY run") == [
        (1, 3, 0), (2, 3, 3)]
    # The killed worker's tokens are fenced out: its late writes change nothing.
    with psycopg.connect(url, autocommit=True) as conn:
        for job_id, token in old_tokens:
            assert conn.execute(
                "UPDATE queue_jobs SET status = 'failed' WHERE id = %s AND processing_token = %s "
                "AND status = 'processing' RETURNING id", (job_id, token)).fetchall() == []
    async def late_writes() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            assert await q.complete_many(conn, [(i, t, None) for i, t in old_tokens]) == set()
            assert await q.heartbeat(conn, old_tokens, 60) == set()

    asyncio.run(late_writes())


@pytest.mark.slow
def test_sigterm_finishes_short_jobs_and_releases_long_ones(clean_db: str, test_runs: str) -> None:
    url = clean_db
    short = enqueue(url, "sleep", 2, {"seconds": 0.8})
    long_ = enqueue(url, "sleep", 2, {"seconds": 3600})
    with WorkerProcess(url, SHUTDOWN_GRACE=2) as w:
        w.wait_until(lambda: running_runs(url, short + long_), 30, "four running jobs", accept=lambda n: n == 4)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0  # an hour before the long jobs would end: they were not waited for
        log = w.log()
    assert "shutting down gracefully" in log and "released 2 job(s)" in log
    rows = {
        job_id: (status, attempts, has_error)
        for job_id, status, attempts, has_error in query(
            url, "SELECT id, status, attempts, last_error IS NOT NULL FROM queue_jobs")
    }
    assert {rows[i] for i in short} == {("completed", 1, False)}
    assert {rows[i] for i in long_} == {("pending", 0, True)}  # attempt restored, reason recorded
    assert scalar(url, "SELECT count(*) FROM test_runs WHERE finished_at IS NOT NULL") == 2
    # The grace period was used: the short jobs, running at the signal, finished before the long ones were released.
    short_done = scalar(url, "SELECT max(finished_at) FROM test_runs WHERE job_id = ANY(%s)", (short,))
    released = scalar(url, "SELECT min(updated_at) FROM queue_jobs WHERE id = ANY(%s)", (long_,))
    assert short_done < released, (short_done, released)


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(clean_db: str, test_runs: str) -> None:
    url = clean_db
    ids = enqueue(url, "sleep", 2, {"seconds": 3600})
    with WorkerProcess(url, SHUTDOWN_GRACE=3600) as w:
        w.wait_until(lambda: running_runs(url, ids), 30, "two running jobs", accept=lambda n: n == 2)
        w.signal(signal.SIGTERM)
        w.wait_until(lambda: "waiting up to 3600s for 2 running job(s)" in w.log(), 30, "the drain to start")
        assert w.proc.poll() is None  # draining: the jobs and the grace period have an hour to go
        w.signal(signal.SIGTERM)
        w.wait(60)  # exits without waiting for them
        assert "received again: exiting now" in w.log()
    # Even the hard stop hands the jobs back when it can (no attempt consumed, no lease to wait for).
    assert query(url, "SELECT DISTINCT status, attempts FROM queue_jobs") == [("pending", 0)]


@pytest.mark.slow
def test_worker_recovers_when_its_connections_are_terminated(clean_db: str, test_runs: str) -> None:
    url = clean_db
    # Polling every 30 s: only a working LISTEN makes the last job start quickly.
    with WorkerProcess(url, POLL_INTERVAL=30, LEASE_SECONDS=3) as w:
        w.wait_started()
        ids = enqueue(url, "sleep", 400, {"seconds": 0.02})
        w.wait_until(lambda: scalar(url, "SELECT count(*) FROM test_runs"), 30, "100 runs", accept=lambda n: n >= 100)
        killed = query(
            url,
            """SELECT pid, application_name, pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE datname = current_database() AND application_name LIKE 'briefs%%' AND pid <> pg_backend_pid()""",
        )
        names = {name for _, name, _ in killed}
        assert {"briefs-listen", "briefs-claim"} <= names, names
        assert statuses(url).get("pending", 0) > 0  # it really was mid-run
        w.wait_until(lambda: statuses(url), 60, "all 400 to complete", accept=lambda s: s == {"completed": 400},
                     interval=0.2)
        # A fresh job is woken by its NOTIFY: the worker LISTENs again (else the job waits for the 30 s poll,
        # most often longer than this wait).
        [late] = enqueue(url, "sleep", 1, {"seconds": 0})
        w.wait_until(lambda: scalar(url, "SELECT status FROM queue_jobs WHERE id = %s", (late,)), 10, "the late job",
                     accept=lambda status: status == "completed")
        names_after = {name for (name,) in query(
            url, "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()")}
        assert {"briefs-listen", "briefs-claim"} <= names_after
        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0
        log = w.log()
    assert "LISTEN connection lost" in log and "LISTEN re-established" in log
    assert "Traceback" not in log
    # Runs cut short by the killed connections were retried; none ran twice to completion.
    assert scalar(url, "SELECT count(*) FROM (SELECT job_id FROM test_runs WHERE finished_at IS NOT NULL "
                       "GROUP BY job_id HAVING count(*) > 1) twice") == 0
    assert len(ids) == 400


@pytest.mark.slow
def test_poison_rows_fail_alone_and_the_worker_process_keeps_running(clean_db: str, test_runs: str) -> None:
    """Bug: one claimed row psycopg could not decode made the worker exit with a traceback; its claim batch
    sat in processing until the lease expired, and every restart cost the innocent jobs an attempt."""
    url = clean_db
    with WorkerProcess(url, "--concurrency", "5", LEASE_SECONDS=2) as w:
        w.wait_started()
        with psycopg.connect(url, autocommit=True, application_name="test-admin") as conn:
            conn.execute(
                """INSERT INTO queue_jobs (job_type, payload, notify_at, run_at)
                   SELECT 'record', '{}', CASE WHEN g % 4 = 0 THEN 'infinity'::timestamptz END,
                          CASE WHEN g % 4 = 1 THEN '-infinity'::timestamptz ELSE now() END
                   FROM generate_series(1, 40) g"""
            )
            conn.execute("INSERT INTO queue_jobs (job_type, payload) VALUES ('record', %s::jsonb)",
                         ('{"a":' * 5000 + "1" + "}" * 5000,))
            conn.execute("SELECT pg_notify('briefs_queue', '')")
        w.wait_until(lambda: statuses(url), 30, "20 completed, 21 failed",
                     accept=lambda s: s == {"completed": 20, "failed": 21})
        assert w.proc.poll() is None  # still running
        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0
        log = w.log()
    assert "Traceback" not in log
    failed = query(url, "SELECT attempts, last_error FROM queue_jobs WHERE status = 'failed'")
    assert {attempts for attempts, _ in failed} == {1}
    assert all(error.startswith("the job's row cannot be read: ") for _, error in failed)
    assert all("lease expired" not in error for _, error in failed)
    assert query(url, "SELECT DISTINCT attempts FROM queue_jobs WHERE status = 'completed'") == [(1,)]
    assert scalar(url, "SELECT count(*) FROM test_runs") == 20  # the poison rows never reached the handler


# --------------------------------------------------------------------------- the CLI's error behaviour


def test_status_with_an_unreachable_database_prints_one_line(clean_db: str) -> None:
    result = briefs_command("postgresql://postgres@127.0.0.1:1/nowhere", "status")
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()  # one line, no traceback, no log noise
    assert line.startswith("briefs: error: database unreachable"), result.stderr


def test_retry_needs_a_job_id_or_failed(clean_db: str) -> None:
    result = briefs_command(clean_db, "retry")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["briefs: error: give a JOB_ID or --failed (not both)"]


def test_cancel_of_a_missing_job_says_not_found(clean_db: str) -> None:
    result = briefs_command(clean_db, "cancel", "999999")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "briefs: error: job 999999 is not found; only pending or processing jobs can be cancelled"]
