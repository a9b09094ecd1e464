"""The users pages: search, a user's page, the preference form (the API's rules; errors next to the
field), the coming briefs, and "Make a brief now"."""

from __future__ import annotations

import asyncio
from typing import Any

from playwright.async_api import expect

from tests.browser.conftest import ConsoleServer, login, sql


def _user(url: str, name: str, email: str, tz: str = "Europe/Paris", *, preference: bool = True) -> int:
    [row] = sql(url, "INSERT INTO users (email, name, timezone) VALUES (%s, %s, %s) RETURNING id", (email, name, tz))
    if preference:
        sql(url, "INSERT INTO brief_preferences (user_id, time_of_day) VALUES (%s, '07:30')", (row["id"],))
    return int(row["id"])


def _preference(url: str, uid: int) -> dict[str, Any]:
    [row] = sql(url, """SELECT u.timezone, p.frequency, p.day_of_week, p.time_of_day::text AS time_of_day,
                               p.is_active, p.email_enabled
                        FROM users u JOIN brief_preferences p ON p.user_id = u.id WHERE u.id = %s""", (uid,))
    return row


async def test_search_and_open_a_user(page: Any, console_server: ConsoleServer) -> None:
    url = console_server.database_url
    _user(url, "Ada Lovelace", "ada@example.com")
    grace = _user(url, "<b>Grace</b> \"><script>alert(1)</script>", "grace@example.com")
    await login(page, console_server, "/users")
    await expect(page.locator("tbody tr")).to_have_count(2)
    await page.fill("input[name=query]", "grace")
    await page.click("form[role=search] button")
    await expect(page.locator("tbody tr")).to_have_count(1)
    await page.click(f"tbody a[href='/users/{grace}'] >> nth=1")
    await expect(page.locator("h1")).to_contain_text("<b>Grace</b> \"><script>alert(1)</script>")
    await expect(page.locator("#schedule tbody tr")).to_have_count(7)
    await expect(page.locator("#schedule")).to_contain_text("07:30")


async def test_an_invalid_timezone_is_refused_next_to_the_field_and_nothing_changes(
    page: Any, console_server: ConsoleServer
) -> None:
    url = console_server.database_url
    uid = _user(url, "Ada", "ada@example.com")
    before = _preference(url, uid)
    await login(page, console_server, f"/users/{uid}")
    await page.fill("input[name=timezone]", "Mars/Olympus_Mons")
    await page.select_option("select[name=frequency]", "weekly")
    await page.select_option("select[name=day_of_week]", "3")
    async with page.expect_response(lambda r: r.url.endswith(f"/users/{uid}/preference")) as answer:
        await page.click("#save-preference")
    assert (await answer.value).status == 422
    await expect(page.locator("#error-timezone")).to_be_visible()
    await expect(page.locator("#error-timezone")).to_contain_text("Mars/Olympus_Mons")
    await expect(page.locator("input[name=timezone]")).to_have_value("Mars/Olympus_Mons")  # what was typed stays
    await expect(page.locator("input[name=timezone]")).to_have_attribute("aria-invalid", "true")
    assert _preference(url, uid) == before


async def test_a_valid_preference_is_saved_with_the_api_rules(page: Any, console_server: ConsoleServer) -> None:
    url = console_server.database_url
    uid = _user(url, "Ada", "ada@example.com")
    await login(page, console_server, f"/users/{uid}")
    await page.fill("input[name=timezone]", "America/New_York")
    await page.select_option("select[name=frequency]", "weekly")
    await page.click("#save-preference")
    await expect(page.locator("#error-day_of_week")).to_contain_text("required for a weekly preference")

    await page.select_option("select[name=day_of_week]", "5")
    await page.fill("input[name=time_of_day]", "09:15")
    await page.check("input[name=email_enabled]")
    await page.click("#save-preference")
    await expect(page.locator(".flash.ok")).to_contain_text("The preference is saved")
    assert _preference(url, uid) == {"timezone": "America/New_York", "frequency": "weekly", "day_of_week": 5,
                                     "time_of_day": "09:15:00", "is_active": True, "email_enabled": True}
    await expect(page.locator("#schedule tbody tr")).to_have_count(1)
    await expect(page.locator("#schedule")).to_contain_text("09:15")


async def test_make_a_brief_now_queues_it_and_a_second_click_says_why_not(
    page: Any, console_server: ConsoleServer
) -> None:
    url = console_server.database_url
    uid = _user(url, "Ada", "ada@example.com")
    await login(page, console_server, f"/users/{uid}")
    await page.click("#make-brief")
    await expect(page.locator(".flash.ok")).to_contain_text("A brief is queued")
    [job] = sql(url, "SELECT job_type, status FROM queue_jobs WHERE user_id = %s", (uid,))
    assert job == {"job_type": "generate_daily_brief", "status": "pending"}

    async with page.expect_response(lambda r: r.url.endswith(f"/users/{uid}/briefs")) as answer:
        await page.click("#make-brief")
    assert (await answer.value).status == 409
    await expect(page.locator("#action-error")).to_contain_text("already pending")

    await asyncio.to_thread(console_server.worker_burst)
    await page.goto(f"/users/{uid}")
    await expect(page.locator("#briefs tbody tr")).to_have_count(1)
    await expect(page.locator("#briefs tbody .status")).to_have_text("completed")
