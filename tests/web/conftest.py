"""Fixtures of the API tests: the application over the test database (in process, httpx's ASGI
transport), clients with the admin token, with a console session, and with nothing, and helpers that
insert users, preferences, jobs and briefs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date, datetime, time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from psycopg.types.json import Jsonb

from briefs.db import Database
from briefs.settings import Settings
from briefs.web.app import close_app, create_app
from briefs.web.security import SESSION_COOKIE, AdminAuth

TOKEN = "t" * 32
BASE = "http://test"


@pytest.fixture
async def app(db: Database, settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(db, settings, AdminAuth(TOKEN))
    try:
        yield application
    finally:
        await close_app(application)


def _client(app: FastAPI, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, **kw)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Authorised with the admin token."""
    async with _client(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture
async def anon(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(app) as c:
        yield c


class Console:
    """A client with a console session cookie, and that session's CSRF token."""

    def __init__(self, client: httpx.AsyncClient, csrf: str) -> None:
        self.client = client
        self.csrf = csrf


@pytest.fixture
async def console(app: FastAPI) -> AsyncIterator[Console]:
    auth: AdminAuth = app.state.web.auth
    session, cookie = auth.new_session()
    async with _client(app, cookies={SESSION_COOKIE: cookie}) as c:
        yield Console(c, auth.csrf_token(session))


class Data:
    """Rows for API tests, inserted through the test database's pool."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._n = 0

    async def one(self, sql: str, params: Any = None) -> Any:
        async with self.db.raw() as conn:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
        return row[0] if row else None

    async def user(self, name: str = "Ada", *, email: str | None = None, tz: str = "UTC",
                   last_visit_at: datetime | None = None) -> int:
        self._n += 1
        return int(await self.one(
            "INSERT INTO users (email, name, timezone, last_visit_at) VALUES (%s, %s, %s, %s) RETURNING id",
            (email or f"user{self._n}@example.com", name, tz, last_visit_at)))

    async def preference(self, user_id: int, *, frequency: str = "daily", day_of_week: int | None = None,
                         at: time = time(8, 0), active: bool = True, email: bool = False) -> None:
        await self.one(
            """INSERT INTO brief_preferences (user_id, frequency, day_of_week, time_of_day, is_active, email_enabled)
               VALUES (%s, %s, %s, %s, %s, %s) RETURNING user_id""",
            (user_id, frequency, day_of_week, at, active, email))

    async def job(self, job_type: str = "test_job", *, status: str = "pending", run_at: Any = None,
                  user_id: int | None = None, payload: dict[str, Any] | None = None, **cols: Any) -> int:
        """A queue row as given (``run_at`` may be a text such as 'infinity'); a processing one gets a lease."""
        if status == "processing":
            cols.setdefault("processing_token", "00000000-0000-0000-0000-000000000001")
            cols.setdefault("lease_expires_at", datetime(2099, 1, 1))
        if status in ("completed", "failed", "cancelled"):
            cols.setdefault("finished_at", datetime.now().astimezone())
        names = ["job_type", "status", "user_id", "payload", *cols]
        values = [job_type, status, user_id, Jsonb(payload or {}), *cols.values()]
        if run_at is not None:
            names.append("run_at")
            values.append(run_at)
        columns = ", ".join(names)  # the tests' own column names, never input
        marks = ", ".join(["%s"] * len(values))
        return int(await self.one(f"INSERT INTO queue_jobs ({columns}) VALUES ({marks}) RETURNING id", values))

    async def brief(self, user_id: int, day: date, *, status: str = "completed", subject: str | None = "Your brief",
                    markdown: str | None = "# Brief", summary: str | None = "All calm.", **cols: Any) -> int:
        names = ["user_id", "brief_date", "status", "subject", "summary_markdown", "executive_summary", *cols]
        values = [user_id, day, status, subject, markdown, summary, *cols.values()]
        marks = ", ".join(["%s"] * len(values))
        return int(await self.one(
            f"INSERT INTO daily_briefs ({', '.join(names)}) VALUES ({marks}) RETURNING id", values))


@pytest.fixture
def data(db: Database) -> Data:
    return Data(db)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response's problem+json body, after checking status and content type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"].startswith("/api/docs#problem-") and body["detail"]
    return body
