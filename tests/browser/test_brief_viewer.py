"""The brief viewer: a brief made from hostile project and task names shows them as text everywhere (the
sandboxed email, the Markdown, the sections) and runs nothing; progress is live while it is written;
the tabs work with and without scripts."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from playwright.async_api import expect

from tests.browser.conftest import ConsoleServer, login, screenshot_path, sql
from tests.conftest import BriefSeed

PROJECT = "<script>alert('project')</script>"
TASK = "\"><img src=x onerror=alert('task')>"
LINK = "[click me](javascript:alert('link'))"


def _hostile_user(url: str) -> int:
    seed = BriefSeed(url)
    try:
        uid = seed.user("<i>Mallory</i>", email="mallory@example.com")
        today = datetime.now(UTC).date()
        pid = seed.busy_project(uid, PROJECT, today)
        seed.task(pid, TASK, priority="high", start_date=today)
        other = seed.busy_project(uid, LINK, today)
        seed.task(other, "<script>alert('other')</script>", start_date=today)
        return uid
    finally:
        seed.close()


async def test_a_hostile_brief_is_shown_as_text_and_runs_nothing(page: Any, console_server: ConsoleServer) -> None:
    uid = _hostile_user(console_server.database_url)
    await login(page, console_server, f"/users/{uid}")
    await page.click("#make-brief")
    await expect(page.locator(".flash.ok")).to_contain_text("A brief is queued")
    await asyncio.to_thread(console_server.worker_burst)
    await page.reload()
    await page.click("#briefs tbody a")

    await expect(page.locator("h1 [data-field=status]")).to_have_text("completed")
    await expect(page.locator("#sections .name")).to_contain_text([PROJECT, LINK])
    frame = page.frame_locator("#email-frame")
    await expect(frame.locator("body")).to_contain_text(PROJECT)
    await expect(frame.locator("body")).to_contain_text(TASK)
    await expect(frame.locator("a[href^='javascript:' i]")).to_have_count(0)
    await expect(frame.locator("script, img[src=x]")).to_have_count(0)
    assert await page.locator("#email-frame").get_attribute("sandbox") == ""

    await expect(page.locator("#tab-markdown")).to_be_hidden()  # the Email tab is the one shown
    await page.click("#tab-tab-markdown")
    await expect(page.locator("#markdown")).to_be_visible()
    await expect(page.locator("#markdown")).to_contain_text("alert('task')")
    await expect(page.locator("#tab-email")).to_be_hidden()
    await page.click("#tab-tab-email")
    await expect(frame.locator("body")).to_contain_text(PROJECT)
    await page.screenshot(path=str(screenshot_path("console-brief.png")), full_page=True)


def _brief_being_written(url: str) -> tuple[int, str]:
    [user] = sql(url, "INSERT INTO users (email, name) VALUES ('ada@example.com', 'Ada') RETURNING id")
    day = datetime.now(UTC).date().isoformat()
    progress = {"phase": "projects", "projects_total": 3, "projects_done": 1, "projects_failed": 0}
    sql(url, """INSERT INTO daily_briefs (user_id, brief_date, status, progress, started_at)
                VALUES (%s, %s, 'processing', %s, now())""", (user["id"], day, json.dumps(progress)))
    return int(user["id"]), day


async def test_progress_is_live_while_the_brief_is_written(page: Any, console_server: ConsoleServer) -> None:
    url = console_server.database_url
    uid, day = _brief_being_written(url)
    await login(page, console_server, f"/users/{uid}/briefs/{day}")
    done = page.locator("#progress [data-field='progress.projects_done']")
    await expect(page.locator("h1 [data-field=status]")).to_have_text("processing")
    await expect(done).to_have_text("1")
    await expect(page.locator("#tab-email")).to_contain_text("No email: the brief is processing")

    sql(url, """UPDATE daily_briefs SET progress = progress || '{"projects_done": 2, "phase": "summary"}'
                WHERE user_id = %s""", (uid,))
    await expect(done).to_have_text("2", timeout=5_000)
    await expect(page.locator("#progress [data-field='progress.phase']")).to_have_text("summary")

    sql(url, "UPDATE daily_briefs SET status = 'failed', error = 'the model went away', completed_at = now() "
             "WHERE user_id = %s", (uid,))
    await expect(page.locator("h1 [data-field=status]")).to_have_text("failed", timeout=5_000)
    await expect(page.locator("#brief-error")).to_have_text("the model went away")


async def test_without_scripts_every_tab_is_shown(browser: Any, console_server: ConsoleServer, clean_db: str) -> None:
    uid, day = _brief_being_written(console_server.database_url)
    context = await browser.new_context(base_url=console_server.url, java_script_enabled=False)
    page = await context.new_page()
    try:
        await login(page, console_server, f"/users/{uid}/briefs/{day}")
        for panel in ("#tab-email", "#tab-text", "#tab-markdown"):
            await expect(page.locator(panel)).to_be_visible()
        await expect(page.locator(".tabpanel h3.tab-title")).to_have_count(3)
    finally:
        await context.close()
