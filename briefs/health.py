"""Health and metrics over HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

A deliberately small asyncio HTTP server (three GET routes, no framework) on
``BRIEFS_HEALTH_PORT``. Truthful: ``/healthz`` fails (503) when a registered loop
(the worker's claim loop, the scheduler) has not completed a cycle within its
allowed staleness, or when the database does not answer within two seconds.
``/readyz`` also requires the schema to be migrated. The checks and the gauges use
the server's own database connection, never the pool that handlers can exhaust. ``/metrics`` refreshes the
queue gauges (counted like the ``queue_stats`` view, labels bounded: see
:mod:`briefs.metrics`) and serves the Prometheus exposition, rendered in a thread so
a scrape never blocks the event loop. ``HEAD`` gets the headers without the body.
Bound to ``BRIEFS_HEALTH_HOST`` (default all interfaces) unless a host is given.

Both health routes also report the LLM circuit breaker (``checks.llm_circuit``: state, reason,
since, next probe; :mod:`briefs.circuit`) — reported, never failing: an open circuit means the
LLM provider is down, not this process, which goes on writing briefs on time without AI (a
restart would change nothing). ``/metrics`` sets ``briefs_llm_circuit_state`` from the same row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from briefs import metrics
from briefs.circuit import STATE_VALUES, read_status
from briefs.db import ConfigError, Database
from briefs.migrate import pending_migrations
from briefs.terminal import one_line

log = logging.getLogger(__name__)

DB_TIMEOUT = 2.0
READ_TIMEOUT = 5.0  # to receive the request line and headers
MAX_LINE = 8 * 1024  # bytes of the request line, or of one header line
MAX_HEADER_BYTES = 32 * 1024  # bytes of all header lines together
MAX_HEADERS = 100
MAX_CONNECTIONS = 256  # served at once; more are closed at once (bounds the file descriptors used)
LINGER_SECONDS = 1.0  # after refusing a request, read (and drop) what the client still sends, so it
LINGER_BYTES = 1024 * 1024  # sees the answer instead of a reset; bounded in time and bytes

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
    """``/healthz``, ``/readyz``, ``/metrics`` on ``host:port``.

    ``host`` defaults to ``BRIEFS_HEALTH_HOST`` (``db.settings.health_host``, all
    interfaces unless set: what Procfile platforms route to). Requests are bounded:
    a request line or header line over :data:`MAX_LINE` bytes, or headers over
    :data:`MAX_HEADER_BYTES` in all, get 431; a malformed request 400; at most
    :data:`MAX_CONNECTIONS` are served at once (more are closed at once).
    """

    def __init__(self, db: Database, port: int, host: str | None = None) -> None:
        self.db = db
        self.port = port
        self.host = host if host is not None else db.settings.health_host
        self.loops: list[LoopCheck] = []
        self._server: asyncio.Server | None = None
        self._active = 0
        self._reading: dict[asyncio.StreamWriter, None] = {}  # still sending the request head, oldest first
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._conn_lock = asyncio.Lock()
        self._gauges: asyncio.Future[None] | None = None  # the refresh in flight, shared by concurrent scrapes

    def watch(self, name: str, last: Callable[[], float | None], max_age: float) -> None:
        self.loops.append(LoopCheck(name, last, max_age, started=time.monotonic()))

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_LINE)
        except (OSError, OverflowError, UnicodeError) as exc:  # in use, no such host, not allowed, not a port
            where = one_line(f"{self.host}:{self.port}", 120)
            reason = one_line(getattr(exc, "strerror", None) or str(exc), 200)
            raise ConfigError(
                f"cannot serve health checks on {where} (BRIEFS_HEALTH_HOST, BRIEFS_HEALTH_PORT): {reason}"
            ) from None
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d (/healthz, /readyz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        if self._gauges is not None and not self._gauges.done():
            self._gauges.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    # ------------------------------------------------------------------ checks

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The server's own autocommit connection (kept, replaced when it breaks), one user at a time.

        Not the pool: handlers may hold every pool connection for minutes (a slow SMTP
        exchange), and a busy worker must not look dead to the platform's probes.
        """
        async with self._conn_lock:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                self._conn = None
                conn = await psycopg.AsyncConnection.connect(
                    self.db.url, autocommit=True, application_name="briefs-health", connect_timeout=5
                )
                self._conn = conn
            try:
                yield conn
            except BaseException:
                # Timed out or failed mid-statement: start afresh next time.
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.close()
                raise

    async def _database(self, *, schema: bool) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(DB_TIMEOUT):
                async with self._connection() as conn:
                    await conn.execute("SELECT 1")
                    if schema:
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
        checks["llm_circuit"] = await self.llm_circuit()  # reported; never fails the check (module docstring)
        return ok, {"status": "ok" if ok else "failing", "checks": checks}

    async def llm_circuit(self) -> dict[str, Any]:
        """The LLM circuit of this process's configuration, always ``ok`` (an open circuit is the provider's
        trouble, not this process's); the ``briefs_llm_circuit_state`` gauge follows it."""
        try:
            async with asyncio.timeout(DB_TIMEOUT):
                async with self._connection() as conn:
                    status = await read_status(conn, self.db.settings)
        except Exception as exc:
            return {"ok": True, "state": "unknown", "detail": f"unreadable: {type(exc).__name__}"}
        state = status["state"]
        if state in STATE_VALUES:
            metrics.LLM_CIRCUIT_STATE.set(STATE_VALUES[state])
        return {"ok": True, "state": state, "reason": status["reason"], "since": status["since"],
                "next_probe_at": status["next_probe_at"], "detail": status["detail"]}

    async def refresh_queue_gauges(self) -> None:
        """Refresh the queue gauges; scrapes arriving while a refresh runs share it.

        Without this, a burst of ``/metrics`` requests queued one aggregate query each on the
        server's single connection, and ``/healthz`` waited behind all of them.
        """
        task = self._gauges
        if task is None or task.done():
            task = self._gauges = asyncio.ensure_future(self._refresh_queue_gauges())
        await asyncio.shield(task)

    async def _refresh_queue_gauges(self) -> None:
        """Set the queue gauges from the table: one series per known job type, the rest under ``other``.

        Pending, running, failed and cancelled jobs only, each status through its partial index (a
        BitmapOr: 3 ms at a million rows where counting every row took 140 ms); completed jobs are
        the bulk of the table, and the workers count completions (``briefs_jobs_completed_total``).
        Aggregated in SQL (a few rows whatever is in the queue) and safe with any row:
        ages are computed from epochs, so an infinite ``run_at`` gives an infinite age,
        not an error.
        """
        try:
            async with asyncio.timeout(DB_TIMEOUT):
                async with self._connection() as conn:
                    cur = await conn.execute(
                        """SELECT CASE WHEN job_type = ANY(%s) THEN job_type ELSE %s END AS label, status, count(*),
                                  extract(epoch FROM now()) - min(extract(epoch FROM run_at))
                                      FILTER (WHERE status = 'pending' AND run_at <= now())
                           FROM queue_jobs
                           WHERE status = 'pending' OR status = 'processing' OR status = 'failed'
                              OR status = 'cancelled'
                           GROUP BY 1, 2""",
                        (metrics.known_job_types(), metrics.OTHER),
                    )
                    rows = await cur.fetchall()
        except Exception as exc:
            log.debug("queue gauges not refreshed: %s", type(exc).__name__)
            return
        metrics.QUEUE_DEPTH.clear()
        metrics.QUEUE_OLDEST_PENDING.clear()
        for label, status, jobs, oldest in rows:
            metrics.QUEUE_DEPTH.labels(label, status).set(jobs)
            if status == "pending":
                metrics.QUEUE_OLDEST_PENDING.labels(label).set(float(oldest) if oldest is not None else 0.0)

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            if not self._reading:  # every slot is answering a request: this one waits its turn elsewhere
                writer.transport.abort()
                return
            # Full of clients that have not finished sending their request (idle or slowloris): drop the
            # oldest of them, not the newcomer, so an orchestrator's probe is answered however many
            # silent connections someone keeps open.
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.transport.abort()
        self._active += 1
        try:
            await self._serve(reader, writer)
        except Exception as exc:  # never a traceback from a client's doing; the server goes on
            log.warning("health request failed: %s: %s", type(exc).__name__, str(exc)[:200])
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reading[writer] = None
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                method, path = await self._read_request(reader)
        except _Refused as refused:
            self._reading.pop(writer, None)  # answered: no longer evictable
            await self._send(writer, refused.status, f"{refused}\n".encode(), "text/plain")
            await self._linger(reader, writer)
            return
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._reading.pop(writer, None)
        head = method == "HEAD"
        try:
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, b"method not allowed\n", "text/plain")
            elif path in ("/healthz", "/readyz"):
                ok, body = await self.health(ready=path == "/readyz")
                await self._send(writer, 200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json",
                                 head=head)
            elif path == "/metrics":
                await self.refresh_queue_gauges()
                await self.llm_circuit()
                exposition = await asyncio.to_thread(generate_latest)  # CPU work off the event loop
                await self._send(writer, 200, exposition, CONTENT_TYPE_LATEST, head=head)
            else:
                await self._send(writer, 404, b"not found\n", "text/plain", head=head)
        except ConnectionError:
            pass

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
        """(method, path) of a request whose head fits the limits, or :class:`_Refused`."""
        line = await _read_line(reader, "request line")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise _Refused(400, "bad request line")
        total = 0
        for _ in range(MAX_HEADERS + 1):
            header = await _read_line(reader, "header line")
            if header in (b"\r\n", b"\n"):
                return parts[0], _path(parts[1])
            total += len(header)
            if total > MAX_HEADER_BYTES:
                raise _Refused(431, f"headers over {MAX_HEADER_BYTES} bytes")
        raise _Refused(431, f"more than {MAX_HEADERS} headers")

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an early answer, drop what the client is still sending for a moment, then close."""
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            received = 0
            async with asyncio.timeout(LINGER_SECONDS):
                while received < LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    received += len(chunk)

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, *, head: bool = False
    ) -> None:
        """The response; for HEAD the same headers (Content-Length included) and no body."""
        head_lines = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head_lines.encode() + (b"" if head else body))
        await writer.drain()


def _path(target: str) -> str:
    """The path of a request target: origin form (``/healthz?x``) or absolute form
    (``http://host:port/healthz``, which HTTP/1.1 servers must accept)."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        target = "/" + rest.partition("/")[2]
    return target.split("?", 1)[0]


async def _read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    """One CRLF- (or LF-) terminated line of at most MAX_LINE bytes; 431 when longer, 400 when cut short."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _Refused(431, f"{what} over {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _Refused(400, f"{what} cut short") from None
        raise
