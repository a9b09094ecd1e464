"""The unsubscribe link of an email, opened in a browser: confirm, and the preference is off in the database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from playwright.async_api import expect

from briefs import unsubscribe
from tests.browser.conftest import SECRET_KEY, ConsoleServer, sql


def _subscribed_user(url: str, email: str) -> int:
    [row] = sql(url, "INSERT INTO users (email, name) VALUES (%s, 'Grace') RETURNING id", (email,))
    sql(url, "INSERT INTO brief_preferences (user_id, email_enabled) VALUES (%s, true)", (row["id"],))
    return int(row["id"])


def _email_enabled(url: str, uid: int) -> bool:
    [row] = sql(url, "SELECT email_enabled FROM brief_preferences WHERE user_id = %s", (uid,))
    return bool(row["email_enabled"])


async def test_the_emailed_link_unsubscribes_after_confirming(page: Any, console_server: ConsoleServer) -> None:
    uid = _subscribed_user(console_server.database_url, "grace@example.com")
    token = unsubscribe.make_token(SECRET_KEY, uid, "grace@example.com", now=datetime.now(UTC))
    link = unsubscribe.unsubscribe_url(console_server.url, token)

    await page.goto(link)
    await expect(page.get_by_role("heading", name="Stop these emails?")).to_be_visible()
    await expect(page.locator("main")).to_contain_text("gr***@example.com")
    assert _email_enabled(console_server.database_url, uid), "opening the link alone must change nothing"

    await page.click("#confirm-unsubscribe")
    await expect(page.get_by_role("heading", name="You are unsubscribed")).to_be_visible()
    assert not _email_enabled(console_server.database_url, uid)


async def test_a_forged_link_is_not_found_and_changes_nothing(page: Any, console_server: ConsoleServer) -> None:
    uid = _subscribed_user(console_server.database_url, "ada@example.com")
    forged = unsubscribe.make_token("another-key-entirely-" + "x" * 20, uid, "ada@example.com", now=datetime.now(UTC))

    response = await page.goto(unsubscribe.unsubscribe_url(console_server.url, forged))
    assert response is not None and response.status == 404
    await expect(page.locator("#confirm-unsubscribe")).to_have_count(0)
    assert _email_enabled(console_server.database_url, uid)
