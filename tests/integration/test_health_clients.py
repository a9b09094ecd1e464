"""Clients that hold connections open, or speak a form of HTTP the server did not expect."""

from __future__ import annotations

import asyncio

import pytest

from briefs import health as health_module
from briefs.db import Database
from briefs.health import HealthServer


async def request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(30):
            return await reader.read()
    finally:
        writer.close()


async def test_silent_connections_cannot_lock_the_probe_out(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: once MAX_CONNECTIONS clients had connected and sent nothing (slowloris), every new
    # connection was reset at once, so an orchestrator's /healthz probe failed and it restarted
    # a healthy service. Now the oldest silent connection makes room for the newcomer.
    monkeypatch.setattr(health_module, "MAX_CONNECTIONS", 8)
    server = HealthServer(db, 0, host="127.0.0.1")
    await server.start()
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
    try:
        await asyncio.sleep(0.2)  # every one of them accepted and waiting for its request line
        answer = await request(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
        assert server._active <= 8 + 1
    finally:
        for _, writer in idle:
            writer.close()
        await server.stop()


@pytest.mark.parametrize(
    "target", ["http://127.0.0.1/healthz", "HTTP://health.internal:8080/healthz?verbose=1", "https://h/healthz"]
)
async def test_an_absolute_form_target_is_served(db: Database, target: str) -> None:
    # HTTP/1.1 servers must accept the absolute form (what a request through a proxy looks like); it was a 404.
    server = HealthServer(db, 0, host="127.0.0.1")
    await server.start()
    try:
        answer = await request(server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
        other = await request(server.port, b"GET http://h/elsewhere HTTP/1.1\r\n\r\n")
        assert other.startswith(b"HTTP/1.1 404")
    finally:
        await server.stop()


async def test_a_burst_of_scrapes_shares_one_gauge_query(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: every /metrics request ran its own aggregate over queue_jobs on the server's one
    # connection; 150 of them on a 300,000-row queue held /healthz for 1.8 s (its limit is 2 s).
    server = HealthServer(db, 0, host="127.0.0.1")
    queries = 0
    release = asyncio.Event()
    real = HealthServer._refresh_queue_gauges

    async def slow_refresh(self: HealthServer) -> None:
        nonlocal queries
        queries += 1
        await release.wait()
        await real(self)

    callers = 0
    shared = HealthServer.refresh_queue_gauges

    async def counted(self: HealthServer) -> None:
        nonlocal callers
        callers += 1
        await shared(self)

    monkeypatch.setattr(HealthServer, "_refresh_queue_gauges", slow_refresh)
    monkeypatch.setattr(HealthServer, "refresh_queue_gauges", counted)
    await server.start()
    try:
        scrapes = [asyncio.create_task(request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")) for _ in range(40)]
        while callers < 40:  # noqa: ASYNC110 - every scrape is waiting on the refresh in flight
            await asyncio.sleep(0.01)
        health = await request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")  # not queued behind them
        assert health.startswith(b"HTTP/1.1 200 OK"), health[:200]
        release.set()
        answers = await asyncio.gather(*scrapes)
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
        assert queries == 1
    finally:
        await server.stop()
