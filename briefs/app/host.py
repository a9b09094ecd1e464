"""The process host: one way to run services in a process, whichever services they are.

``briefs run``, ``briefs worker`` (``python -m worker``) and ``briefs scheduler``
(``python -m scheduler``) differ only in the services they hand to :meth:`Host.run`:

1. connect (starting the embedded PostgreSQL when ``DATABASE_URL`` is unset);
2. migrate (``briefs run``) or refuse an unmigrated database;
3. build the services on that database;
4. install the signals: the first SIGTERM/SIGINT asks every service to stop gracefully,
   a second one aborts them and exits two seconds later whatever they do;
5. serve ``/healthz`` and ``/metrics`` on ``BRIEFS_HEALTH_PORT``, failing when a service's
   own freshness signal goes stale;
6. run the services side by side until an essential one returns (or fails, or a signal
   arrives), then stop the others and wait for them;
7. close the shared resources (the LLM client) and the database.

A service is any object with the small :class:`Service` interface.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from briefs.db import Database
from briefs.health import HealthServer
from briefs.migrate import migrate_url, require_schema
from briefs.process import exit_now, install_stop_signals
from briefs.progress import Progress
from briefs.settings import Settings

log = logging.getLogger(__name__)

HARD_EXIT_AFTER = 2.0  # seconds between the second signal and the exit


@dataclass(frozen=True)
class Watch:
    """A health check: ``last()`` is the monotonic time of the service's last sign of life."""

    name: str
    last: Callable[[], float | None]
    max_age: float


class Service(Protocol):
    """What the host runs. ``run`` returns when the service is done (after ``stop``, or by itself)."""

    name: str
    essential: bool  # when it returns, the process stops; a non-essential one is cancelled at the end

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    def abort(self) -> None: ...

    def watches(self) -> Sequence[Watch]: ...


# Builds the services once the database is ready (migrated, or checked): may seed data first.
ServiceFactory = Callable[[Database, dict[str, Any]], Awaitable[Sequence[Service]]]


@dataclass
class Host:
    """Runs services in this process; see the module docstring for the steps."""

    settings: Settings
    db: Database | None = None  # given: the caller owns it (tests); None: the host connects and disposes
    signals: bool = True
    migrate: bool = False
    resources: dict[str, Any] = field(default_factory=dict)  # shared by the services; aclose()d at the end

    async def run(self, build: ServiceFactory) -> list[Service]:
        """Run the services ``build`` makes on the database until they are done; return them."""
        db = self.db or await Database.connect(self.settings)
        health: HealthServer | None = None
        try:
            await self._prepare(db)
            services = list(await build(db, self.resources))
            if self.signals:
                install_stop_signals(lambda: _each(services, "stop"), lambda: self._abort(services))
            health = await self._health(db, services)
            await _run_all(services)
            return services
        finally:
            if health is not None:
                await health.stop()
            await close_resources(self.resources)
            if self.db is None:
                await db.dispose()

    async def _prepare(self, db: Database) -> None:
        if self.migrate:
            with Progress("migrating", stream=sys.stderr) as bar:
                await migrate_url(db.url, on_step=lambda m, i, n: bar.update(i, n, m.name))
        else:
            async with db.raw() as conn:
                await require_schema(conn)

    async def _health(self, db: Database, services: Sequence[Service]) -> HealthServer | None:
        if not self.settings.health_port:
            return None
        health = HealthServer(db, self.settings.health_port)
        for service in services:
            for watch in service.watches():
                health.watch(watch.name, watch.last, watch.max_age)
        await health.start()
        return health

    def _abort(self, services: Sequence[Service]) -> None:
        _each(services, "abort")
        asyncio.get_running_loop().call_later(HARD_EXIT_AFTER, exit_now, 1)


def _each(services: Sequence[Service], method: str) -> None:
    for service in services:
        try:
            getattr(service, method)()
        except Exception:
            log.exception("%s.%s() failed", service.name, method)


async def _run_all(services: Sequence[Service]) -> None:
    """Run every service; when an essential one ends, stop the rest. The first failure is raised."""
    tasks = {asyncio.create_task(s.run(), name=s.name): s for s in services}
    essential = {task for task, s in tasks.items() if s.essential}
    try:
        if essential:
            await asyncio.wait(essential, return_when=asyncio.FIRST_COMPLETED)
            _each(services, "stop")
            await asyncio.wait(essential)
    finally:
        for task in tasks:
            task.cancel()  # a no-op for the finished ones; ends the non-essential ones
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for service, outcome in zip(tasks.values(), outcomes, strict=True):
        if isinstance(outcome, Exception):
            if service.essential:
                raise outcome
            log.error("%s failed: %s", service.name, outcome, exc_info=outcome)


async def close_resources(resources: dict[str, Any]) -> None:
    """``aclose()`` every shared resource that has it; a failure is logged, the rest still close."""
    for name, resource in list(resources.items()):
        closer = getattr(resource, "aclose", None)
        if closer is None:
            continue
        try:
            await closer()
        except Exception:
            log.warning("closing %s failed", name, exc_info=True)
