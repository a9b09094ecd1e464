"""The services a briefs process can run, built on the layers below for :class:`briefs.app.host.Host`.

* :class:`WorkerService` — the queue worker with every handler this application has:
  the worker's own (``noop``), the brief domain's (:mod:`briefs.jobs`) and the operator's
  (``BRIEFS_HANDLER_MODULES``);
* :class:`SchedulerService` — the APScheduler daemon that ticks the planner;
* :class:`WebService` — the console and HTTP API (uvicorn serving :mod:`briefs.web`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn

from briefs import jobs, metrics
from briefs.app.host import Watch
from briefs.contract import JOB_TYPES
from briefs.db import ConfigError, Database
from briefs.logs import register_secret
from briefs.settings import Settings
from briefs.terminal import one_line
from briefs.web.app import close_app, create_app
from briefs.web.security import AdminAuth
from briefs.web.stats import for_app
from scheduler.daemon import SchedulerDaemon, health_max_age
from worker.handlers import build_handlers
from worker.runner import Handler, Worker, WorkerStats


def label_job_types() -> None:
    """Metrics label the application's job types by name in every process (a scheduler-only
    process reports queue depth by job type too); any other type counts as "other"."""
    metrics.register_job_types(["noop", *JOB_TYPES])


def handlers(settings: Settings) -> dict[str, Handler]:
    """Every job type this application runs."""
    return build_handlers(settings, jobs.HANDLERS)


def worker_health_max_age(settings: Settings) -> float:
    """How stale the claim loop's last cycle may be before /healthz fails.

    The loop marks a cycle at least every poll interval, busy or idle; three of
    them plus ten seconds of slack. During a database outage the loop backs off
    and the check fails, which is the truth.
    """
    return 3 * settings.poll_interval + 10


class WorkerService:
    name = "worker"
    essential = True

    def __init__(
        self,
        db: Database,
        settings: Settings,
        resources: dict[str, Any],
        *,
        concurrency: int | None = None,
        burst: bool = False,
    ) -> None:
        jobs.warn_if_email_unusable(settings)
        label_job_types()
        self.settings = settings
        self.worker = Worker(db, settings, handlers(settings), concurrency=concurrency, burst=burst,
                             services=resources)
        self.stats: WorkerStats | None = None

    async def run(self) -> None:
        self.stats = await self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    def abort(self) -> None:
        self.worker.abort()

    def watches(self) -> Sequence[Watch]:
        return [Watch("worker", lambda: self.worker.stats.last_cycle, worker_health_max_age(self.settings))]


class SchedulerService:
    name = "scheduler"
    essential = True

    def __init__(self, db: Database, settings: Settings) -> None:
        label_job_types()
        self.settings = settings
        self.daemon = SchedulerDaemon(db, settings)
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Tick until stopped; a running tick finishes first."""
        await self.daemon.start()
        try:
            await self._stopped.wait()
        finally:
            await self.daemon.stop()

    def stop(self) -> None:
        self._stopped.set()

    def abort(self) -> None:
        self._stopped.set()  # the host exits shortly after, whatever the tick does

    def watches(self) -> Sequence[Watch]:
        return [Watch("scheduler", lambda: self.daemon.last_tick_completed, health_max_age(self.settings))]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def web_auth(settings: Settings, host: str) -> AdminAuth:
    """The console's admin token: ``BRIEFS_ADMIN_TOKEN``, or a random one for this process, which
    is allowed on a loopback address only (anyone who can reach another address could try it)."""
    if settings.admin_token is not None:
        return AdminAuth(settings.admin_token.get_secret_value())
    if not _loopback(host):
        raise ConfigError(
            f"refusing to serve the console on {one_line(host, 80)} without BRIEFS_ADMIN_TOKEN: set one "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or bind 127.0.0.1"
        )
    auth = AdminAuth.random()
    register_secret(auth.token)
    return auth


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=512)
        # Accepted connections inherit it: without it a small response's body waited for the client's
        # delayed ACK (40 ms) behind its headers on every reused connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, OverflowError, UnicodeError) as exc:  # in use, no such address, not allowed, not a port
        reason = one_line(getattr(exc, "strerror", None) or str(exc), 200)
        raise ConfigError(
            f"cannot serve the console on {one_line(host, 80)}:{port} (--host/--port, BRIEFS_WEB_HOST, "
            f"BRIEFS_WEB_PORT): {reason}"
        ) from None
    sock.set_inheritable(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handlers: the host owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebService:
    """The console and HTTP API (:mod:`briefs.web`) on ``host:port``; the socket is bound at construction,
    so a port in use is a clear error before anything else starts."""

    name = "web"
    essential = True

    def __init__(self, db: Database, settings: Settings, *, host: str, port: int) -> None:
        label_job_types()  # its /metrics labels the queue gauges by the application's job types too
        self.auth = web_auth(settings, host)
        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.db = db
        self.app = create_app(db, settings, self.auth)
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", server_header=False,
            proxy_headers=True, timeout_graceful_shutdown=5, timeout_keep_alive=5, limit_concurrency=1000,
        )
        self.server = _Server(config)

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"http://{f'[{shown}]' if ':' in shown else shown}:{self.port}"

    def login_hint(self) -> str:
        """What to print at start: the one-click login URL for a generated token, else where to log in."""
        if self.auth.generated:
            return f"console: {self.url}/login?token={self.auth.token}  (a token for this run only)"
        return f"console: {self.url}/  (log in with BRIEFS_ADMIN_TOKEN)"

    async def run(self) -> None:
        for_app(self.app, self.db).base.warm()  # the overview's one pass over the queue, before anyone asks
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            self.sock.close()
            await close_app(self.app)

    def stop(self) -> None:
        self.server.should_exit = True

    def abort(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True

    def watches(self) -> Sequence[Watch]:
        return []
