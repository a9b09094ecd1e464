"""The console's process surface: who may bind where, `briefs web` as a real process, and the
unsubscribe page every email links to (no login: the signed token is the permission)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from briefs import unsubscribe
from briefs.app.services import WebService, web_auth
from briefs.contract import BRIEF_JOB
from briefs.db import ConfigError, Database
from briefs.settings import Settings
from briefs.web.app import create_app
from briefs.web.security import AdminAuth
from tests.acceptance.helpers import clean_env

SECRET = "an-unsubscribe-secret-0123456789"
TOKEN = "an-admin-token-of-some-length-0123456789"


def test_a_generated_token_is_for_loopback_only(settings: Settings) -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert web_auth(settings, host).generated
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ConfigError, match="without BRIEFS_ADMIN_TOKEN"):
            web_auth(settings, host)
    configured = settings.model_copy(update={"admin_token": SecretStr(TOKEN)})
    auth = web_auth(configured, "0.0.0.0")
    assert not auth.generated and auth.token_matches(TOKEN)


async def test_a_port_in_use_is_a_clear_error(db: Database, settings: Settings) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve the console on 127.0.0.1:{port}"):
            WebService(db, settings, host="127.0.0.1", port=port)


def _console_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("console: "):
            return line
    raise AssertionError(f"no console line; exit {proc.wait(timeout=10)}")


@pytest.mark.slow
def test_briefs_web_serves_the_console_and_stops_cleanly(database_url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "briefs", "web", "--port", "0"], env=clean_env(database_url),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        match = re.match(r"console: (http://127\.0\.0\.1:\d+)/login\?token=(\S+)", _console_line(proc))
        assert match, "the login URL is printed"
        base, token = match.groups()
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/healthz").json()["status"] == "ok"
            denied = client.get("/api/v1/stats")
            assert denied.status_code == 401 and denied.headers["content-type"] == "application/problem+json"
            assert denied.headers["www-authenticate"].startswith("Bearer")
            assert client.get("/").status_code == 303  # to the login page
            client.get(f"/login?token={token}")
            assert "briefs_session" in client.cookies
            assert client.get("/").status_code == 200
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("INSERT INTO queue_jobs (job_type) VALUES (%s)", (BRIEF_JOB,))
            metrics = client.get("/metrics").text  # the job types are labelled by name in this process too
            assert f'briefs_queue_depth{{job_type="{BRIEF_JOB}",status="pending"}} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_briefs_web_refuses_a_public_address_without_a_token(database_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "briefs", "web", "--host", "0.0.0.0", "--port", "0"],
        env=clean_env(database_url), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to serve the console on 0.0.0.0 without BRIEFS_ADMIN_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- the unsubscribe page


@pytest.fixture
async def unsub_client(db: Database, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    configured = settings.model_copy(update={"secret_key": SecretStr(SECRET)})
    app = create_app(db, configured, AdminAuth(TOKEN))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


async def _subscribed_user(db: Database, email: str = "grace@example.com") -> int:
    async with db.raw() as conn:
        cur = await conn.execute("INSERT INTO users (email, name) VALUES (%s, 'Grace') RETURNING id", (email,))
        row = await cur.fetchone()
        assert row is not None
        (uid,) = row
        await conn.execute("INSERT INTO brief_preferences (user_id, email_enabled) VALUES (%s, true)", (uid,))
    return int(uid)


async def _email_enabled(db: Database, uid: int) -> Any:
    async with db.raw() as conn:
        cur = await conn.execute("SELECT email_enabled FROM brief_preferences WHERE user_id = %s", (uid,))
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def test_the_emailed_link_asks_then_unsubscribes(db: Database, unsub_client: httpx.AsyncClient) -> None:
    uid = await _subscribed_user(db)
    token = unsubscribe.make_token(SECRET, uid, "grace@example.com", now=datetime.now(UTC))
    page = await unsub_client.get(f"/u/{token}")
    assert page.status_code == 200 and "gr***@example.com" in page.text and "grace@" not in page.text
    assert await _email_enabled(db, uid) is True  # looking changes nothing
    done = await unsub_client.post(f"/u/{token}")
    assert done.status_code == 200 and "unsubscribed" in done.text
    assert await _email_enabled(db, uid) is False
    again = await unsub_client.post(f"/u/{token}")  # a second click is fine
    assert again.status_code == 200


async def test_one_click_unsubscribe_needs_no_session(db: Database, unsub_client: httpx.AsyncClient) -> None:
    uid = await _subscribed_user(db)
    token = unsubscribe.make_token(SECRET, uid, "grace@example.com", now=datetime.now(UTC))
    done = await unsub_client.post(
        f"/u/{token}", content="List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert done.status_code == 200
    assert await _email_enabled(db, uid) is False


async def test_links_of_earlier_emails_still_work(db: Database, unsub_client: httpx.AsyncClient) -> None:
    uid = await _subscribed_user(db)
    token = unsubscribe.make_token(SECRET, uid, "grace@example.com", now=datetime.now(UTC))
    assert (await unsub_client.get("/briefs/unsubscribe", params={"token": token})).status_code == 200
    assert (await unsub_client.post("/briefs/unsubscribe", params={"token": token})).status_code == 200
    assert await _email_enabled(db, uid) is False


async def test_a_forged_or_altered_token_gets_404_and_changes_nothing(
    db: Database, unsub_client: httpx.AsyncClient
) -> None:
    uid = await _subscribed_user(db)
    good = unsubscribe.make_token(SECRET, uid, "grace@example.com", now=datetime.now(UTC))
    other_key = unsubscribe.make_token("some-other-secret-0123456789", uid, "grace@example.com", now=datetime.now(UTC))
    moved = unsubscribe.make_token(SECRET, uid, "grace@old.example", now=datetime.now(UTC))
    altered = good[:-1] + ("A" if good[-1] != "A" else "B")
    for token in (other_key, moved, altered, f"u1.{uid}.0.x.y", "nonsense", "u1." + "9" * 30, good + "x"):
        for response in (await unsub_client.get(f"/u/{token}"), await unsub_client.post(f"/u/{token}")):
            assert response.status_code == 404, token
    assert await _email_enabled(db, uid) is True


async def test_without_a_secret_key_no_link_works(db: Database, settings: Settings) -> None:
    uid = await _subscribed_user(db)
    token = unsubscribe.make_token(SECRET, uid, "grace@example.com", now=datetime.now(UTC))
    app = create_app(db, settings, AdminAuth(TOKEN))  # no BRIEFS_SECRET_KEY
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.post(f"/u/{token}")).status_code == 404
    assert await _email_enabled(db, uid) is True
