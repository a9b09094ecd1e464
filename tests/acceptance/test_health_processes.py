"""A worker process started the way the Procfile starts it serves truthful health and metrics."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request

import psycopg
import pytest

from tests.acceptance.helpers import WorkerProcess, wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def test_worker_process_serves_health_and_metrics(clean_db: str) -> None:
    port = _free_port()
    worker = WorkerProcess(clean_db, HEALTH_PORT=port)
    try:
        worker.wait_started()
        wait_for(lambda: _get(port, "/healthz")[0] == 200, 10, "/healthz 200")
        assert _get(port, "/readyz")[0] == 200
        with psycopg.connect(clean_db, autocommit=True) as conn:
            conn.execute("INSERT INTO queue_jobs (job_type) SELECT 'noop' FROM generate_series(1, 5)")
            conn.execute("SELECT pg_notify('briefs_queue', '')")
        wait_for(lambda: 'briefs_jobs_completed_total{job_type="noop"} 5.0' in _get(port, "/metrics")[1], 10,
                 "five completions in /metrics")
        assert _get(port, "/nope")[0] == 404
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log()
    finally:
        worker.close()
