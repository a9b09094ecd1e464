"""The process host runs whichever services it is given, the same way: prepare, run side by side, stop, close."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from briefs.app.host import Host, Service, Watch
from briefs.db import Database
from briefs.settings import Settings
from tests.conftest import _with_dbname, make_settings


class Probe:
    """A service that records what the host asked of it; ``finish`` ends its run (or raises ``error``)."""

    def __init__(self, name: str, *, essential: bool = True, error: Exception | None = None) -> None:
        self.name, self.essential, self.error = name, essential, error
        self.calls: list[str] = []
        self.finish = asyncio.Event()

    async def run(self) -> None:
        self.calls.append("run")
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.calls.append("cancelled")
            raise
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.calls.append("stop")
        self.finish.set()

    def abort(self) -> None:
        self.calls.append("abort")
        self.finish.set()

    def watches(self) -> Sequence[Watch]:
        return [Watch(self.name, lambda: None, 60.0)]


class Closable:
    def __init__(self) -> None:
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


def _build(*services: Probe, seen: list[Database] | None = None) -> Any:
    async def build(db: Database, resources: dict[str, Any]) -> list[Service]:
        if seen is not None:
            seen.append(db)
        resources["client"] = Closable()
        return list(services)

    return build


async def test_when_an_essential_service_ends_the_others_are_stopped_and_resources_closed(
    db: Database, settings: Settings
) -> None:
    class Deaf(Probe):
        def stop(self) -> None:  # like the demo watcher: nothing to finish, it runs until cancelled
            self.calls.append("stop")

    worker, scheduler, demo = Probe("worker"), Probe("scheduler"), Deaf("demo", essential=False)
    host = Host(settings, db=db, signals=False)
    worker.finish.set()  # a burst worker: done by itself
    ran = await host.run(_build(worker, scheduler, demo))
    assert ran == [worker, scheduler, demo]
    assert worker.calls[0] == "run" and scheduler.calls == ["run", "stop"]
    assert demo.calls == ["run", "stop", "cancelled"]  # not essential: cancelled at the end
    assert host.resources["client"].closed == 1


async def test_a_failing_essential_service_stops_the_rest_and_is_raised(db: Database, settings: Settings) -> None:
    broken, other = Probe("broken", error=RuntimeError("claim loop died")), Probe("other")
    host = Host(settings, db=db, signals=False)
    broken.finish.set()
    with pytest.raises(RuntimeError, match="claim loop died"):
        await host.run(_build(broken, other))
    assert other.calls == ["run", "stop"]
    assert host.resources["client"].closed == 1


async def test_a_failing_optional_service_is_logged_not_fatal(
    db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    essential = Probe("worker")

    class Failing(Probe):
        async def run(self) -> None:
            self.calls.append("run")
            essential.finish.set()  # the process ends after this one failed: it must not take the host down
            raise ValueError("unreadable")

    optional = Failing("demo", essential=False)
    await Host(settings, db=db, signals=False).run(_build(optional, essential))
    assert essential.calls == ["run", "stop"]
    assert any("demo failed: unreadable" in r.getMessage() for r in caplog.records)


async def test_the_host_refuses_an_unmigrated_database_before_building_anything(pg_server_url: str) -> None:
    import secrets

    import psycopg

    name = f"briefs_host_{secrets.token_hex(3)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(pg_server_url, name)  # the embedded server's URL names its socket in the query
    try:
        settings = make_settings(url)
        seen: list[Database] = []
        with pytest.raises(Exception, match="briefs migrate"):
            await Host(settings, signals=False).run(_build(Probe("worker"), seen=seen))
        assert seen == []
        migrated = Probe("worker")
        migrated.finish.set()
        await Host(settings, signals=False, migrate=True).run(_build(migrated, seen=seen))  # `briefs run` migrates
        assert len(seen) == 1 and migrated.calls == ["run", "stop"]
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_services_health_watches_are_served(db: Database, database_url: str) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(database_url, health_port=port)
    probe = Probe("worker")

    async def check_then_finish() -> str:
        for _ in range(200):
            try:
                body = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read().decode())
                break
            except OSError as exc:  # not serving yet, or 503 (no sign of life yet: the probe's last() is None)
                body = getattr(exc, "read", lambda: b"")().decode()
                if body:
                    break
                await asyncio.sleep(0.05)
        probe.finish.set()
        return body

    checker = asyncio.create_task(check_then_finish())
    await Host(settings, db=db, signals=False).run(_build(probe))
    assert "worker" in await checker
