"""The jobs pages: filter, open a failed job, retry it and watch it complete; refusals shown with 409."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from playwright.async_api import expect

from tests.browser.conftest import ConsoleServer, login, screenshot_path, sql

HOSTILE = "<script>alert('payload')</script>\"><img src=x onerror=alert(1)>"


def _failed_noop(url: str, note: str = HOSTILE) -> int:
    [row] = sql(
        url,
        """INSERT INTO queue_jobs (job_type, payload, status, attempts, max_attempts, last_error, started_at,
                                   finished_at)
           VALUES ('noop', %s, 'failed', 1, 1, %s, now() - interval '2 seconds', now()) RETURNING id""",
        (json.dumps({"note": note}), f"RuntimeError: noop was asked to fail {HOSTILE}"),
    )
    return int(row["id"])


async def test_retry_a_failed_job_from_its_page_and_watch_it_complete(page: Any, console_server: ConsoleServer
                                                                      ) -> None:
    job_id = _failed_noop(console_server.database_url)
    await login(page, console_server, "/jobs?status=failed&type=noop")
    await expect(page.locator("#retry-all")).to_be_visible()
    await page.click(f"a[href='/jobs/{job_id}']")

    await expect(page.locator("h1")).to_contain_text(f"Job {job_id}")
    await expect(page.locator("[data-field=status]")).to_have_text("failed")
    await expect(page.locator("#payload")).to_contain_text(json.dumps(HOSTILE))  # as text, not markup
    await expect(page.locator("#last-error")).to_contain_text("noop was asked to fail")

    await page.click("#retry")
    await expect(page.locator(".flash.ok")).to_contain_text("queued to run again")
    await expect(page.locator("[data-field=status]")).to_have_text("pending")

    await asyncio.to_thread(console_server.worker_burst)
    # The page follows the job (it polls the API while the job is pending or running): no reload by the test.
    await expect(page.locator("[data-field=status]")).to_have_text("completed", timeout=10_000)
    await expect(page.locator("#retry")).to_have_count(0)
    await page.screenshot(path=str(screenshot_path("console-job.png")), full_page=True)


async def test_a_refused_retry_is_shown_on_the_page_with_its_reason(browser: Any, console_server: ConsoleServer,
                                                                    clean_db: str, watched: Any) -> None:
    job_id = _failed_noop(console_server.database_url, "plain")
    context = await browser.new_context(base_url=console_server.url, java_script_enabled=False)
    page = await context.new_page()
    page.on("dialog", watched.on_dialog)
    try:
        await login(page, console_server, f"/jobs/{job_id}")
        sql(console_server.database_url, "UPDATE queue_jobs SET status = 'completed' WHERE id = %s", (job_id,))
        async with page.expect_response(lambda r: r.url.endswith(f"/jobs/{job_id}/retry")) as answer:
            await page.click("#retry")
        assert (await answer.value).status == 409
        await expect(page.locator("#action-error")).to_contain_text("only failed or cancelled jobs can be retried")
        await expect(page.locator("[data-field=status]")).to_have_text("completed")
    finally:
        await context.close()
    watched.assert_clean()


async def test_retry_all_failed_jobs_of_a_type(page: Any, console_server: ConsoleServer) -> None:
    first, second = _failed_noop(console_server.database_url), _failed_noop(console_server.database_url)
    await login(page, console_server, "/jobs?status=failed&type=noop")
    await expect(page.locator("tbody tr")).to_have_count(2)
    await page.click("#retry-all")
    await expect(page.locator(".flash.ok")).to_contain_text("2 jobs")
    await expect(page.locator("tbody")).to_contain_text("No jobs match these filters")
    rows = sql(console_server.database_url, "SELECT status FROM queue_jobs WHERE id IN (%s, %s)", (first, second))
    assert [r["status"] for r in rows] == ["pending", "pending"]


async def test_the_list_pages_back_with_the_cursor_and_filters_stay(page: Any, console_server: ConsoleServer) -> None:
    url = console_server.database_url
    sql(url, "INSERT INTO queue_jobs (job_type, status) SELECT 'noop', 'cancelled' FROM generate_series(1, 60)")
    sql(url, "INSERT INTO queue_jobs (job_type, status) SELECT 'other', 'cancelled' FROM generate_series(1, 5)")
    await login(page, console_server, "/jobs?status=cancelled&type=noop")
    await expect(page.locator("tbody tr")).to_have_count(50)
    first_page = await page.locator("tbody tr td:first-child").all_inner_texts()
    await page.click("#older")
    await expect(page.locator("tbody tr")).to_have_count(10)
    second_page = await page.locator("tbody tr td:first-child").all_inner_texts()
    assert not set(first_page) & set(second_page)
    assert {int(i) for i in first_page + second_page} == {r["id"] for r in sql(
        url, "SELECT id FROM queue_jobs WHERE job_type = 'noop'")}
    await expect(page.locator("#older")).to_have_count(0)
    await expect(page.locator("select[name=status]")).to_have_value("cancelled")
    await expect(page.locator("input[name=type]")).to_have_value("noop")


async def test_a_running_jobs_progress_is_live(page: Any, console_server: ConsoleServer) -> None:
    url = console_server.database_url
    [row] = sql(url, """INSERT INTO queue_jobs (job_type, status, attempts, processing_token, lease_expires_at,
                                                locked_by, started_at, progress)
                        VALUES ('generate_daily_brief', 'processing', 1, gen_random_uuid(),
                                now() + interval '1 hour', 'worker-a', now(), '{"projects_done": 1}')
                        RETURNING id""")
    await login(page, console_server, f"/jobs/{row['id']}")
    await expect(page.locator("#progress")).to_contain_text('"projects_done": 1')
    await expect(page.locator("#cancel")).to_be_visible()
    sql(url, """UPDATE queue_jobs SET progress = '{"projects_done": 7, "note": "<b>bold</b>"}' WHERE id = %s""",
        (row["id"],))
    await expect(page.locator("#progress")).to_contain_text('"projects_done": 7', timeout=5_000)
    await expect(page.locator("#progress")).to_contain_text("<b>bold</b>")
    await page.click("#cancel")
    await expect(page.locator(".flash.ok")).to_contain_text("The job is cancelled")
    await expect(page.locator("[data-field=status]")).to_have_text("cancelled")
    await expect(page.locator("#retry")).to_be_visible()
