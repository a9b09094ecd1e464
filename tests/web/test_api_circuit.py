"""The LLM circuit where operators look: ``/api/v1/stats`` (``llm.circuit``), the overview page, ``/healthz``
(reported, never failing) and ``briefs_llm_circuit_state``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY

from briefs.circuit import circuit_key
from briefs.db import Database
from briefs.health import HealthServer
from briefs.settings import Settings
from briefs.web.app import close_app, create_app
from briefs.web.security import SESSION_COOKIE, AdminAuth
from tests.conftest import make_settings
from tests.web.conftest import BASE, TOKEN

HOSTILE = "<script>alert(1)</script> 500 Internal Server Error"


@pytest.fixture
def keyed(database_url: str) -> Settings:
    return make_settings(database_url, openai_api_key="test-key", openai_base_url="http://127.0.0.1:9/v1")


@pytest.fixture
async def keyed_db(db: Database, keyed: Settings, database_url: str) -> AsyncIterator[Database]:
    database = Database(keyed, database_url, pool_size=2)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def open_circuit(keyed: Settings, database_url: str) -> Iterator[None]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("""INSERT INTO llm_circuit (circuit_key, provider, state, reason, since, next_probe_at,
                                                 opened_count)
                        VALUES (%s, 'http://127.0.0.1:9/v1', 'open', %s, now() - interval '5 minutes',
                                now() + interval '1 minute', 2)""", (circuit_key(keyed), HOSTILE))
    yield
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_circuit")


@pytest.fixture
async def app(keyed_db: Database, keyed: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(keyed_db, keyed, AdminAuth(TOKEN))
    try:
        yield application
    finally:
        await close_app(application)


async def test_stats_and_the_overview_show_an_open_circuit(app: FastAPI, open_circuit: None) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        circuit = (await client.get("/api/v1/stats")).json()["llm"]["circuit"]
    assert circuit["state"] == "open" and circuit["reason"] == HOSTILE
    assert circuit["since"] and circuit["next_probe_at"] and circuit["provider"] == "http://127.0.0.1:9/v1"
    assert circuit["detail"].startswith("open since ")

    _, cookie = app.state.web.auth.new_session()
    async with httpx.AsyncClient(transport=transport, base_url=BASE, cookies={SESSION_COOKIE: cookie}) as console:
        page = (await console.get("/")).text
    assert 'data-field="llm.circuit.state" data-format="circuit">open</span>' in page
    assert "status-down" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


async def test_stats_say_closed_without_a_row_and_disabled_without_a_key(
    app: FastAPI, db: Database, settings: Settings
) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert (await client.get("/api/v1/stats")).json()["llm"]["circuit"]["state"] == "closed"
    plain = create_app(db, settings, AdminAuth(TOKEN))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url=BASE,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            assert (await client.get("/api/v1/stats")).json()["llm"]["circuit"]["state"] == "disabled"
    finally:
        await close_app(plain)


async def test_healthz_reports_an_open_circuit_without_failing(keyed_db: Database, open_circuit: None) -> None:
    server = HealthServer(keyed_db, 0, host="127.0.0.1")
    try:
        ok, body = await server.health()
        assert ok and body["status"] == "ok"
        circuit = body["checks"]["llm_circuit"]
        assert circuit["ok"] is True and circuit["state"] == "open" and circuit["reason"] == HOSTILE
        assert circuit["since"] and circuit["next_probe_at"]
        assert REGISTRY.get_sample_value("briefs_llm_circuit_state") == 2
    finally:
        await server.stop()
