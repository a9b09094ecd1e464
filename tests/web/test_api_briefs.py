"""A user's briefs over the API: queueing one (the rules of ``briefs enqueue``: 202, or 409 saying what
exists), reading them, and their email exactly as the email job builds it."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import httpx
from fastapi import FastAPI

from briefs import email as mail
from briefs.web.api_briefs import preview_config
from briefs.web.security import EMAIL_CSP
from tests.web.conftest import Data, problem

HOSTILE = "<script>alert(1)</script>"


async def test_queue_a_brief_then_409_while_it_is_pending(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    today = datetime.now(UTC).date()
    queued = await client.post(f"/api/v1/users/{uid}/briefs")
    assert queued.status_code == 202, queued.text
    body = queued.json()
    assert body["brief_date"] == today.isoformat() and queued.headers["location"] == f"/api/v1/jobs/{body['job_id']}"
    job = (await client.get(queued.headers["location"])).json()
    assert job["job_type"] == "generate_daily_brief" and job["payload"]["force"] is False
    again = problem(await client.post(f"/api/v1/users/{uid}/briefs", json={"date": today.isoformat()}), 409)
    assert again["job_id"] == body["job_id"] and "already pending" in again["detail"]


async def test_409_with_the_brief_url_when_it_exists_unless_forced(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    await data.brief(uid, yesterday)
    body = problem(await client.post(f"/api/v1/users/{uid}/briefs", json={"date": yesterday.isoformat()}), 409)
    assert body["brief_url"] == f"/api/v1/users/{uid}/briefs/{yesterday.isoformat()}"
    assert (await client.get(body["brief_url"])).status_code == 200
    forced = await client.post(f"/api/v1/users/{uid}/briefs", json={"date": yesterday.isoformat(), "force": True})
    assert forced.status_code == 202, forced.text


async def test_queueing_refuses_what_briefs_enqueue_refuses(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    far = (datetime.now(UTC).date() - timedelta(days=30)).isoformat()
    body = problem(await client.post(f"/api/v1/users/{uid}/briefs", json={"date": far}), 422)
    assert "outside" in body["detail"] and body["errors"][0]["field"] == "body.date"
    problem(await client.post(f"/api/v1/users/{uid}/briefs", json={"date": "2026-02-30"}), 422)
    problem(await client.post(f"/api/v1/users/{uid}/briefs", json={"force": "yes"}), 422)
    problem(await client.post("/api/v1/users/31337/briefs"), 404)
    problem(await client.post("/api/v1/users/99999999999999999999/briefs"), 404)
    broken = await data.user(tz="Mars/Olympus")
    assert "timezone" in problem(await client.post(f"/api/v1/users/{broken}/briefs"), 422)["detail"]


async def test_list_and_read_briefs(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    days = [date(2026, 3, d) for d in (1, 2, 3)]
    for day in days:
        await data.brief(uid, day, subject=HOSTILE, prompt_tokens=7, completion_tokens=3, model="m")
    first = (await client.get(f"/api/v1/users/{uid}/briefs", params={"limit": 2})).json()
    assert [b["brief_date"] for b in first["items"]] == ["2026-03-03", "2026-03-02"]
    await data.brief(uid, date(2026, 3, 4))  # a newer brief does not shift the next page
    rest = (await client.get(f"/api/v1/users/{uid}/briefs", params={"limit": 2, "cursor": first["next_cursor"]}))
    assert [b["brief_date"] for b in rest.json()["items"]] == ["2026-03-01"] and rest.json()["next_cursor"] is None
    brief = (await client.get(f"/api/v1/users/{uid}/briefs/2026-03-02")).json()
    assert brief["subject"] == HOSTILE and brief["summary_markdown"] == "# Brief" and brief["model"] == "m"
    assert (brief["prompt_tokens"], brief["completion_tokens"], brief["sections"]) == (7, 3, [])
    problem(await client.get(f"/api/v1/users/{uid}/briefs/2026-03-09"), 404)
    problem(await client.get(f"/api/v1/users/{uid}/briefs/yesterday"), 422)
    problem(await client.get("/api/v1/users/4444/briefs"), 404)
    problem(await client.get("/api/v1/users/4444/briefs/2026-03-02"), 404)


async def test_the_email_as_the_email_job_builds_it(client: httpx.AsyncClient, data: Data, app: FastAPI) -> None:
    uid = await data.user(HOSTILE, email="ada@example.com")
    day = date(2026, 3, 2)
    await data.brief(uid, day, subject=f"Brief {HOSTILE}", summary="Quiet & calm")
    html = await client.get(f"/api/v1/users/{uid}/briefs/{day}/email.html")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert html.headers["content-security-policy"] == EMAIL_CSP and html.headers["x-frame-options"] == "SAMEORIGIN"
    assert HOSTILE not in html.text and "&lt;script&gt;" in html.text
    async with app.state.web.db.raw() as conn:
        loaded = await mail.load(conn, uid, day, lock=False)
    assert loaded is not None
    built = mail.build_email(preview_config(app.state.web.settings), loaded, datetime.now(UTC))
    assert html.text == built.html
    text = await client.get(f"/api/v1/users/{uid}/briefs/{day}/email.txt")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert text.text == built.text and "Quiet & calm" in text.text


async def test_no_email_while_the_brief_is_being_written(client: httpx.AsyncClient, data: Data) -> None:
    uid = await data.user()
    await data.brief(uid, date(2026, 3, 2), status="processing", markdown=None, summary=None, subject=None)
    await data.brief(uid, date(2026, 3, 3), status="failed", markdown=None)
    body = problem(await client.get(f"/api/v1/users/{uid}/briefs/2026-03-02/email.html"), 409)
    assert "still being written" in body["detail"]
    assert "failed" in problem(await client.get(f"/api/v1/users/{uid}/briefs/2026-03-03/email.txt"), 409)["detail"]
    problem(await client.get(f"/api/v1/users/{uid}/briefs/2026-03-04/email.html"), 404)
    problem(await client.get("/api/v1/users/999/briefs/2026-03-04/email.html"), 404)
