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


def _raw(port: int, request: bytes) -> bytes:
    """Send a raw request from a thread while reading the answer (the server may answer before it has it all)."""
    import threading

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send() -> None:
        try:
            sock.sendall(request)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass
    finally:
        sock.close()
        sender.join(10)
    return b"".join(chunks)


def test_worker_process_serves_health_and_metrics(clean_db: str) -> None:
    port = _free_port()
    worker = WorkerProcess(clean_db, HEALTH_PORT=port, HEALTH_HOST="127.0.0.1")
    try:
        worker.wait_started()
        wait_for(lambda: _get(port, "/healthz")[0] == 200, 10, "/healthz 200")
        assert f"health and metrics on http://127.0.0.1:{port}" in worker.log()  # BRIEFS_HEALTH_HOST
        # Hostile requests are refused, and leave no traceback in the log.
        assert _raw(port, b"GET /" + b"a" * 10_000_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 431 ")
        assert _raw(port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"h" * 200_000 + b"\r\n\r\n").startswith(
            b"HTTP/1.1 431 ")
        head = _raw(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
        assert _get(port, "/readyz")[0] == 200
        with psycopg.connect(clean_db, autocommit=True) as conn:
            conn.execute("INSERT INTO queue_jobs (job_type) SELECT 'noop' FROM generate_series(1, 5)")
            conn.execute("SELECT pg_notify('briefs_queue', '')")
        wait_for(lambda: 'briefs_jobs_completed_total{job_type="noop"} 5.0' in _get(port, "/metrics")[1], 10,
                 "five completions in /metrics")
        assert _get(port, "/nope")[0] == 404
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log()
        assert "Traceback" not in worker.log()
    finally:
        worker.close()
