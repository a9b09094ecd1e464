"""The overview: the numbers follow the queue live (a job finished by another process shows without a
reload), the charts are drawn, and an unauthenticated visit goes to the login page first."""

from __future__ import annotations

import asyncio
from typing import Any

from playwright.async_api import expect

from tests.browser.conftest import ConsoleServer, login, screenshot_path, sql


async def test_a_visit_without_a_session_logs_in_through_the_form(page: Any, console_server: ConsoleServer) -> None:
    await page.goto("/jobs?status=failed")
    await expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    await page.fill("input[name=token]", "not-the-token")
    await page.click("form[action='/login'] button[type=submit]")
    await expect(page.locator("p.error")).to_contain_text("That token is not right")
    await page.fill("input[name=token]", console_server.token)
    await page.click("form[action='/login'] button[type=submit]")
    await page.wait_for_url(f"{console_server.url}/jobs?status=failed")
    await expect(page.get_by_role("heading", name="Jobs")).to_be_visible()


async def test_the_overview_shows_a_job_finished_by_another_process_without_a_reload(
    page: Any, console_server: ConsoleServer
) -> None:
    url = console_server.database_url
    await login(page, console_server, "/")
    completed = page.locator("[data-field='jobs.by_status.completed']")
    pending = page.locator("[data-field='jobs.by_status.pending']")
    await expect(completed).to_have_text("0")
    marker = await page.evaluate("() => (window.__notReloaded = 'still here')")

    sql(url, "INSERT INTO queue_jobs (job_type, payload) SELECT 'noop', '{}' FROM generate_series(1, 3)")
    await expect(pending).to_have_text("3", timeout=5_000)
    await asyncio.to_thread(console_server.worker_burst)

    await expect(completed).to_have_text("3", timeout=5_000)
    await expect(pending).to_have_text("0", timeout=5_000)
    assert await page.evaluate("() => window.__notReloaded") == marker, "the page was reloaded"
    await expect(page.locator("#chart-minutes rect.bar-ok")).not_to_have_count(0)
    await expect(page.locator("#chart-hours rect.bar-ok")).not_to_have_count(0)
    await expect(page.locator("[data-field='throughput.completed_last_hour']")).to_have_text("3")


async def test_queue_depth_by_type_is_charted_with_hostile_type_names_as_text(
    page: Any, console_server: ConsoleServer
) -> None:
    url = console_server.database_url
    hostile = "<img src=x onerror=alert(1)>"
    sql(url, "INSERT INTO queue_jobs (job_type, run_at) SELECT %s, now() + interval '1 hour' "
             "FROM generate_series(1, 4)", (hostile,))
    sql(url, "INSERT INTO queue_jobs (job_type, run_at) SELECT 'send_brief_email', now() + interval '1 hour' "
             "FROM generate_series(1, 2)")
    sql(url, """INSERT INTO queue_jobs (job_type, status, finished_at, started_at, attempts)
                SELECT 'generate_daily_brief', s, now() - g * interval '7 minutes', now() - g * interval '7 minutes',
                       1
                FROM generate_series(1, 40) g, (VALUES ('completed'), ('completed'), ('failed')) v(s)""")
    await login(page, console_server, "/")
    await expect(page.locator("#chart-queue rect.bar-queue")).to_have_count(2)
    await expect(page.locator("#chart-queue text").first).to_contain_text("<img src=x")  # as text, cut
    await expect(page.locator("#queue-table")).to_contain_text(hostile)
    # History written behind the queue's back (finished minutes ago) shows once the overview's base is
    # recounted: within briefs.web.stats.BASE_MAX_AGE (15 s) of the server's last count.
    await expect(page.locator("#chart-minutes rect.bar-bad")).not_to_have_count(0, timeout=25_000)
    await page.screenshot(path=str(screenshot_path("console-overview.png")), full_page=True)


async def test_the_llm_panel_shows_todays_and_this_months_cost(page: Any, console_server: ConsoleServer) -> None:
    await login(page, console_server, "/")
    panel = page.locator("#llm")
    await expect(panel.get_by_text("Cost today (UTC)")).to_be_visible()
    await expect(panel.locator("[data-field='llm.cost.today.display']")).to_contain_text("USD")
    await expect(panel.locator("[data-field='llm.cost.month.display']")).to_contain_text("USD")
    await expect(panel.locator("[data-field='llm.cost.budget_display']")).to_have_text("none")
