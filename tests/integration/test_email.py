"""The send_brief_email job: a real SMTP server (aiosmtpd), real Postgres, the real worker."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any

from briefs import email as brief_email
from briefs.generator import BriefRequest, generate

XSS = "<script>alert(1)</script>"
PUBLIC = "https://briefs.example.com"


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


async def run_until_settled(h: Any, settings: Any, rounds: int = 5) -> None:
    """Burst mode returns when nothing is runnable *now*; a retry with backoff needs another round."""
    for _ in range(rounds):
        await h.run(settings)
        if not await h.rows("SELECT id FROM queue_jobs WHERE status IN ('pending', 'processing')"):
            return
        await asyncio.sleep(0.1)


async def test_brief_email_is_received_with_headers_both_parts_and_escaped_html(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Ada <Lovelace>", email="ada@example.com", email_enabled=True)
    pid = brief_seed.project(uid, "Engine & Co")
    brief_seed.task(pid, XSS, priority="high", due_date=today - timedelta(days=1))
    settings = h.settings(None, smtp_url=smtp_server.url, email_from="Briefs <briefs@example.com>",
                          public_url=PUBLIC)
    await h.enqueue(uid)
    await h.run(settings, services={})

    [message] = smtp_server.wait_for(1)
    brief = await h.brief(uid)
    assert message["Subject"] == brief["subject"] and message["Subject"].startswith("Your daily brief for")
    assert message["From"] == "Briefs <briefs@example.com>"
    assert message["To"].addresses[0].addr_spec == "ada@example.com"
    assert message["To"].addresses[0].display_name == "Ada <Lovelace>"
    assert abs(parsedate_to_datetime(message["Date"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert message["Message-ID"] == f"<brief-{brief['id']}.r1.u{uid}.{today.isoformat()}@example.com>"
    assert message["List-Unsubscribe"] == f"<{PUBLIC}/briefs/unsubscribe?user={uid}>"
    assert message.is_multipart() and message.get_content_type() == "multipart/alternative"
    text, html = parts(message)
    assert XSS in text
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Engine &amp; Co" in html and "Ada &lt;Lovelace&gt;" in html
    assert "Generated without AI" in html and "Generated without AI" in text
    assert f'href="{PUBLIC}/briefs/{today.isoformat()}"' in html

    assert brief["email_sent_at"] is not None
    assert brief["metadata"]["email"]["message_id"] == message["Message-ID"]
    email_job = (await h.jobs("send_brief_email"))[0]
    assert email_job["status"] == "completed" and email_job["result"]["sent"] is True
    assert email_job["dedup_key"] == f"email:{uid}:{today.isoformat()}"


async def test_email_for_200_projects_stays_under_100_kb(briefs_harness: Any, brief_seed: Any,
                                                         smtp_server: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Busy", email_enabled=True)
    long = "a rather long task title that goes on and on about the details of the work " * 2
    for i in range(200):
        pid = brief_seed.busy_project(uid, f"Project {i:03d}", today, tasks=2)
        brief_seed.task(pid, f"{long} {i}", due_date=today - timedelta(days=3))
        brief_seed.note(pid, f"Note {i}", "Some notes about the project. " * 10)
    settings = h.settings(None, smtp_url=smtp_server.url, public_url=PUBLIC)
    await h.enqueue(uid)
    await h.run(settings, services={})

    [message] = smtp_server.wait_for(1)
    text, html = parts(message)
    assert len(html.encode()) < 100_000
    assert f"{PUBLIC}/briefs/{today.isoformat()}" in html and "Read the full brief" in text
    brief = await h.brief(uid)
    assert brief["metadata"]["email"]["trim"] != "full"
    assert brief["metadata"]["email"]["html_bytes"] < 100_000
    assert "Across your 200 active projects" in html  # the summary always covers every project
    assert len(re.findall(r"### Project \d{3}", brief["summary_markdown"])) == 200  # the stored brief is whole


async def test_fit_trims_step_by_step(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Some")
    for i in range(12):
        brief_seed.busy_project(uid, f"P{i:02d}", today, tasks=3)
    settings = h.settings(None)
    await generate(h.db, settings, BriefRequest(uid, today, datetime.now(UTC)))
    async with h.db.raw() as conn:
        cur = await conn.execute(brief_email._SQL["brief"].format(lock=""), (uid, today))
        row = await cur.fetchone()
        cur = await conn.execute(brief_email._SQL["sections"], (row[0],))
        metas = [m for (m,) in await cur.fetchall()]
    full = brief_email.build_email(settings, row, metas, datetime.now(UTC))
    assert full.level == "full"
    size = len(full.html.encode())
    email = brief_email.build_email(settings, row, metas, datetime.now(UTC))
    view_html, _, level = brief_email.fit(_view(settings, row, metas), budget=size - 1)
    assert level == "5 items" or level == "2 items"
    assert len(view_html.encode()) < size
    tiny_html, _, tiny_level = brief_email.fit(_view(settings, row, metas), budget=3_000)
    assert "projects" in tiny_level and len(tiny_html.encode()) <= 3_000
    assert "Also in your brief" in tiny_html
    assert email.message["Message-ID"] == full.message["Message-ID"]  # deterministic per brief


def _view(settings: Any, row: Any, metas: Any) -> Any:
    from briefs.render import BriefView, Section

    return BriefView(
        user_name="Some", brief_date=row[8], stage="standard", subject=row[2], llm_enabled=False,
        executive_summary=row[3], priority_actions=tuple(row[4]),
        sections=tuple(Section.from_dict(m["section"]) for m in metas),
    )


async def test_email_disabled_without_smtp_url(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada", email_enabled=True)
    brief_seed.busy_project(uid, "Atlas", datetime.now(UTC).date())
    await h.enqueue(uid)
    await h.run(h.settings(None), services={})

    [gen, mail] = await h.jobs()
    assert gen["status"] == "completed" and mail["job_type"] == "send_brief_email"
    assert mail["status"] == "completed"
    assert mail["result"] == {"sent": False, "reason": "email disabled"}
    assert (await h.brief(uid))["email_sent_at"] is None


async def test_no_email_job_unless_asked(briefs_harness: Any, brief_seed: Any, smtp_server: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    quiet, asked = brief_seed.user("NoMail"), brief_seed.user("AskedInPayload")
    brief_seed.busy_project(quiet, "A", today)
    brief_seed.busy_project(asked, "B", today)
    await h.enqueue(quiet)
    await h.enqueue(asked, email=True)
    await h.run(h.settings(None, smtp_url=smtp_server.url), services={})
    mails = await h.jobs("send_brief_email")
    assert [m["user_id"] for m in mails] == [asked]
    [message] = smtp_server.wait_for(1)
    assert message["To"].addresses[0].display_name == "AskedInPayload"


async def test_temporary_smtp_refusal_is_retried_and_sent_once(briefs_harness: Any, brief_seed: Any,
                                                               smtp_server: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada", email_enabled=True)
    brief_seed.busy_project(uid, "Atlas", datetime.now(UTC).date())
    smtp_server.reject_next("451 4.3.0 mailbox busy, try later")
    await h.enqueue(uid)
    await run_until_settled(h, h.settings(None, smtp_url=smtp_server.url))

    [mail] = await h.jobs("send_brief_email")
    assert mail["status"] == "completed" and mail["attempts"] == 2
    assert len(smtp_server.messages) == 1
    assert (await h.brief(uid))["email_sent_at"] is not None


async def test_permanent_smtp_refusal_fails_the_email_job(briefs_harness: Any, brief_seed: Any,
                                                          smtp_server: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada", email_enabled=True)
    brief_seed.busy_project(uid, "Atlas", datetime.now(UTC).date())
    smtp_server.reject_next("550 5.1.1 no such user")
    await h.enqueue(uid)
    await h.run(h.settings(None, smtp_url=smtp_server.url), services={})
    [mail] = await h.jobs("send_brief_email")
    assert mail["status"] == "failed" and mail["attempts"] == 1 and "550" in mail["last_error"]
    assert (await h.brief(uid))["status"] == "completed"  # the brief itself is fine


async def test_engagement_stage_sets_the_email_subject(briefs_harness: Any, brief_seed: Any,
                                                       smtp_server: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    users = {}
    for stage in ("standard", "re_engagement", "re_engagement_late", "dormant_check_in"):
        uid = brief_seed.user(stage, email_enabled=True)
        brief_seed.busy_project(uid, "Work", today)
        await h.enqueue(uid, stage=stage)
        users[stage] = uid
    await h.run(h.settings(None, smtp_url=smtp_server.url), services={})
    subjects = {m["To"].addresses[0].display_name: m["Subject"] for m in smtp_server.wait_for(4)}
    assert subjects["standard"].startswith("Your daily brief for")
    assert subjects["re_engagement"].startswith("Welcome back")
    assert subjects["re_engagement_late"].startswith("It's been a while")
    assert subjects["dormant_check_in"].startswith("Checking in")
    _, html = parts(next(m for m in smtp_server.messages if m["Subject"].startswith("Checking in")))
    assert "pause these briefs" in html
