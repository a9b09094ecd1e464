"""Health and metrics over HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

A deliberately small asyncio HTTP server (three GET routes, no framework) on
``BRIEFS_HEALTH_PORT``. Truthful: ``/healthz`` fails (503) when a registered loop
(the worker's claim loop, the scheduler) has not completed a cycle within its
allowed staleness, or when the database does not answer within two seconds.
``/readyz`` also requires the schema to be migrated. ``/metrics`` refreshes the
queue gauges from ``queue_stats`` and serves the Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from briefs import metrics
from briefs.db import Database

log = logging.getLogger(__name__)

DB_TIMEOUT = 2.0


@dataclass
class LoopCheck:
    """A loop that must report progress: ``last()`` is a time.monotonic() stamp (or None before the first)."""

    name: str
    last: Callable[[], float | None]
    max_age: float
    started: float = 0.0

    def status(self, now: float) -> tuple[bool, str]:
        stamp = self.last()
        if stamp is None:
            age = now - self.started
            ok = age <= self.max_age
            return ok, f"no cycle yet ({age:.0f}s since start)"
        age = now - stamp
        return age <= self.max_age, f"last cycle {age:.1f}s ago (limit {self.max_age:.0f}s)"


class HealthServer:
    def __init__(self, db: Database, port: int, host: str = "0.0.0.0") -> None:
        self.db = db
        self.port = port
        self.host = host
        self.loops: list[LoopCheck] = []
        self._server: asyncio.Server | None = None

    def watch(self, name: str, last: Callable[[], float | None], max_age: float) -> None:
        self.loops.append(LoopCheck(name, last, max_age, started=time.monotonic()))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d (/healthz, /readyz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ checks

    async def _database(self, *, schema: bool) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(DB_TIMEOUT):
                async with self.db.raw() as conn:
                    await conn.execute("SELECT 1")
                    if schema:
                        from briefs.migrate import pending_migrations

                        pending = await pending_migrations(conn)
                        if pending:
                            return False, f"{len(pending)} migration(s) pending"
            return True, "ok"
        except Exception as exc:
            return False, f"unreachable: {type(exc).__name__}"

    async def health(self, *, ready: bool = False) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        checks: dict[str, Any] = {}
        ok = True
        for loop in self.loops:
            good, detail = loop.status(now)
            checks[loop.name] = {"ok": good, "detail": detail}
            ok = ok and good
        good, detail = await self._database(schema=ready)
        checks["database"] = {"ok": good, "detail": detail}
        ok = ok and good
        return ok, {"status": "ok" if ok else "failing", "checks": checks}

    async def refresh_queue_gauges(self) -> None:
        try:
            async with asyncio.timeout(DB_TIMEOUT):
                async with self.db.raw() as conn:
                    cur = await conn.execute("SELECT job_type, status, jobs, oldest_pending_age FROM queue_stats")
                    rows = await cur.fetchall()
        except Exception:
            log.debug("queue gauges not refreshed", exc_info=True)
            return
        metrics.QUEUE_DEPTH.clear()
        metrics.QUEUE_OLDEST_PENDING.clear()
        for job_type, status, jobs, oldest in rows:
            metrics.QUEUE_DEPTH.labels(job_type, status).set(jobs)
            if status == "pending":
                metrics.QUEUE_OLDEST_PENDING.labels(job_type).set(oldest.total_seconds() if oldest else 0)

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, b"method not allowed\n", "text/plain")
            elif path == "/healthz" or path == "/readyz":
                ok, body = await self.health(ready=path == "/readyz")
                await self._send(writer, 200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json")
            elif path == "/metrics":
                await self.refresh_queue_gauges()
                await self._send(writer, 200, generate_latest(), CONTENT_TYPE_LATEST)
            else:
                await self._send(writer, 404, b"not found\n", "text/plain")
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
