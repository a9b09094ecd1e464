"""The send_brief_email job: a real SMTP server (aiosmtpd), real Postgres, the real worker."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from briefs import email as brief_email
from briefs import smtp, unsubscribe
from briefs.contract import BriefRequest, EmailRequest
from briefs.errors import PermanentError
from briefs.generator import generate
from briefs.render import BriefView, Group, Section
from tests.smtp import SMTPServer, tls_material

XSS = "<script>alert(1)</script>"
PUBLIC = "https://briefs.example.com"
KEY = "test-secret-key-0123456789abcdef"
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def mail(h: Any, smtp: Any, **overrides: Any) -> Any:
    """Settings that send email to ``smtp`` (with the secret key that signs unsubscribe links)."""
    values: dict[str, Any] = {"smtp_url": smtp.url, "secret_key": KEY}
    values.update(overrides)
    return h.settings(None, **values)


async def run_until_settled(h: Any, settings: Any, rounds: int = 5) -> None:
    """Burst mode returns when nothing is runnable *now*; a retry with backoff needs another round."""
    for _ in range(rounds):
        await h.run(settings)
        if not await h.rows("SELECT id FROM queue_jobs WHERE status IN ('pending', 'processing')"):
            return
        await asyncio.sleep(0.1)


async def brief_without_email(h: Any, brief_seed: Any, name: str = "Ada", *, email: str | None = None,
                              projects: int = 1) -> int:
    """A user with a finished brief and no email job yet."""
    uid = brief_seed.user(name, email=email)
    for i in range(projects):
        brief_seed.busy_project(uid, f"Project {i}", datetime.now(UTC).date())
    await h.enqueue(uid)
    await h.run(h.settings(None), services={})
    return uid


async def email_job(h: Any, uid: int, payload: Any = None, **fields: Any) -> int:
    """A send_brief_email job inserted as a row (so any payload can be tried)."""
    body = payload if payload is not None else {"user_id": uid, "brief_date": datetime.now(UTC).date().isoformat()}
    [row] = await h.rows(
        "INSERT INTO queue_jobs (job_type, payload, user_id) VALUES ('send_brief_email', %s::jsonb, %s) RETURNING id",
        json.dumps(body), fields.get("user_id", uid),
    )
    return int(row["id"])  # type: ignore[call-overload]


async def job(h: Any, job_id: int) -> dict[str, Any]:
    [row] = await h.rows("SELECT * FROM queue_jobs WHERE id = %s", job_id)
    return row


# --------------------------------------------------------------------------- the message


async def test_brief_email_is_received_with_headers_both_parts_and_escaped_html(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Ada <Lovelace>", email="ada@example.com", email_enabled=True)
    pid = brief_seed.project(uid, "Engine & Co")
    brief_seed.task(pid, XSS, priority="high", due_date=today - timedelta(days=1))
    settings = mail(h, smtp_server, email_from="Briefs <briefs@example.com>", public_url=PUBLIC)
    await h.enqueue(uid)
    await h.run(settings, services={})

    [message] = smtp_server.wait_for(1)
    [received] = smtp_server.received
    assert received.rcpt_tos == ("ada@example.com",) and received.mail_from == "briefs@example.com"
    assert len(received.raw) < 100_000
    brief = await h.brief(uid)
    assert message["Subject"] == brief["subject"] and message["Subject"].startswith("Your daily brief for")
    assert message["From"] == "Briefs <briefs@example.com>"
    assert message["To"].addresses[0].addr_spec == "ada@example.com"
    assert message["To"].addresses[0].display_name == "Ada <Lovelace>"
    assert abs(parsedate_to_datetime(message["Date"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert message["Message-ID"] == f"<brief-{brief['id']}.r1.u{uid}.{today.isoformat()}@example.com>"
    assert message.is_multipart() and message.get_content_type() == "multipart/alternative"
    text, html = parts(message)
    assert XSS in text
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Engine &amp; Co" in html and "Ada &lt;Lovelace&gt;" in html
    assert "Generated without AI" in html and "Generated without AI" in text
    assert f'href="{PUBLIC}/briefs/{today.isoformat()}"' in html

    assert brief["email_sent_at"] is not None
    assert brief["metadata"]["email"]["message_id"] == message["Message-ID"]
    assert "sending" not in brief["metadata"]["email"]  # the send claim is gone once recorded
    email_job_row = (await h.jobs("send_brief_email"))[0]
    assert email_job_row["status"] == "completed" and email_job_row["result"]["sent"] is True
    assert email_job_row["dedup_key"] == f"email:{uid}:{today.isoformat()}"
    # What arrived is the message as measured and checked (serialised once, sent as those bytes).
    assert email_job_row["result"]["bytes"] == len(received.raw)


async def test_unsubscribe_link_is_a_signed_token_with_rfc8058_headers(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed, email="grace@example.com")
    await email_job(h, uid)
    await h.run(mail(h, smtp_server, public_url=PUBLIC + "/"), services={})
    [message] = smtp_server.wait_for(1)

    match = re.fullmatch(rf"<{re.escape(PUBLIC)}/u/([A-Za-z0-9._-]+)>",
                         message["List-Unsubscribe"])
    assert match, message["List-Unsubscribe"]
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = match.group(1)
    assert f"user={uid}" not in message["List-Unsubscribe"]
    check = unsubscribe.verify(token, SecretStr(KEY), email="grace@example.com", now=datetime.now(UTC))
    assert check.ok and check.user_id == uid
    assert unsubscribe.verify(token, "some-other-secret-key-000000", email="grace@example.com",
                              now=datetime.now(UTC)).status is unsubscribe.Status.BAD_SIGNATURE
    text, html = parts(message)
    assert f'href="{PUBLIC}/u/{token}"' in html and f"/u/{token}" in text


async def test_unsubscribe_headers_follow_the_public_url(briefs_harness: Any, brief_seed: Any,
                                                         smtp_server: Any) -> None:
    """https: one-click (RFC 8058); http: the link only (one-click needs https); none: nothing to sign."""
    h = briefs_harness
    users = [await brief_without_email(h, brief_seed, f"User{i}") for i in range(3)]
    for uid, public in zip(users, ("https://b.example.com", "http://localhost:8000", None), strict=True):
        await email_job(h, uid)
        await h.run(mail(h, smtp_server, public_url=public), services={})
    https, http, none = smtp_server.wait_for(3)
    assert https["List-Unsubscribe"].startswith("<https://b.example.com/u/u1.")
    assert https["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert http["List-Unsubscribe"].startswith("<http://localhost:8000/u/u1.")
    assert http["List-Unsubscribe-Post"] is None
    assert none["List-Unsubscribe"] is None and none["List-Unsubscribe-Post"] is None
    assert "unsubscribe" not in parts(none)[1] and "href=" not in parts(none)[1]


async def test_no_secret_key_fails_the_email_job_permanently_naming_the_setting(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    short = await brief_without_email(h, brief_seed, "Short")
    first, second = await email_job(h, uid), await email_job(h, short)
    await h.run(mail(h, smtp_server, secret_key=None), services={})
    await h.run(mail(h, smtp_server, secret_key="tooshort"), services={})
    for job_id in (first, second):
        row = await job(h, job_id)
        assert row["status"] == "failed" and row["attempts"] == 1 and "BRIEFS_SECRET_KEY" in row["last_error"]
    assert smtp_server.messages == []


# --------------------------------------------------------------------------- hostile addresses and headers


BAD_ADDRESSES = [
    "victim@example.com, attacker@evil.example",
    "victim@example.com;attacker@evil.example",
    "Victim <victim@example.com>",
    "victim@example.com\r\nBcc: attacker@evil.example",
    "victim@example.com\nBcc: attacker@evil.example",
    '"victim attacker"@example.com',
    "victim@[127.0.0.1]",
    "victim@localhost",
    "victim",
    "@example.com",
    "v" * 400 + "@example.com",
    "vïctim@example.com",  # an SMTPUTF8 local part: not writable into a header by the email package
    " ",
]


async def test_anything_but_one_valid_address_fails_that_job_permanently(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    bad = [await brief_without_email(h, brief_seed, f"Bad{i}", email=a) for i, a in enumerate(BAD_ADDRESSES)]
    good = await brief_without_email(h, brief_seed, "Good", email="good@example.com")
    jobs = [await email_job(h, uid) for uid in bad]
    good_job = await email_job(h, good)
    await h.run(mail(h, smtp_server), services={})

    for job_id, address in zip(jobs, BAD_ADDRESSES, strict=True):
        row = await job(h, job_id)
        assert row["status"] == "failed" and row["attempts"] == 1, (address, row["last_error"])
        assert "address" in row["last_error"], row["last_error"]
        assert "\n" not in row["last_error"] and "\r" not in row["last_error"]
    assert (await job(h, good_job))["status"] == "completed"
    assert [r.rcpt_tos for r in smtp_server.received] == [("good@example.com",)]
    # A failed address leaves no send claim behind.
    for uid in bad:
        assert "sending" not in ((await h.brief(uid))["metadata"].get("email") or {})


async def test_header_injection_from_name_and_subject_is_neutralised(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    injected = [
        "Ada\r\nBcc: attacker@evil.example",
        "=?utf-8?q?Ada=0D=0ABcc:_attacker@evil.example?=",  # an encoded CR LF that the email package decodes
        "Ada\u2028Bcc: attacker@evil.example\x7f\x1b[31m",
        "x" * 5000,
    ]
    users = [await brief_without_email(h, brief_seed, name, email=f"u{i}@example.com")
             for i, name in enumerate(injected)]
    for uid, name in zip(users, injected, strict=True):
        await h.rows("UPDATE daily_briefs SET subject = %s WHERE user_id = %s RETURNING id", name + " subject", uid)
        await email_job(h, uid)
    await h.run(mail(h, smtp_server), services={})

    received = smtp_server.wait_for(len(users))
    assert len(received) == len(users)
    for r in smtp_server.received:
        assert len(r.rcpt_tos) == 1
        head = r.raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        names = {line.split(b":", 1)[0].lower() for line in head.splitlines() if line[:1] not in (b" ", b"\t")}
        assert b"bcc" not in names, head
        assert names <= {b"subject", b"from", b"to", b"date", b"message-id", b"x-briefs-brief", b"mime-version",
                         b"content-type", b"list-unsubscribe", b"list-unsubscribe-post"}, names
        message = r.message
        assert [a.addr_spec for a in message["To"].addresses] == list(r.rcpt_tos)
        assert "\n" not in message["Subject"] and "\r" not in message["Subject"]
        assert not CONTROL.search(message["Subject"]) and not CONTROL.search(message["To"].addresses[0].display_name)
        assert len(message["Subject"]) <= brief_email.SUBJECT_MAX
        text, _ = parts(message)
        assert not CONTROL.search(text.replace("\r\n", "\n"))
    jobs = await h.jobs("send_brief_email")
    assert all(j["status"] == "completed" for j in jobs)


async def test_names_are_cleaned_like_everywhere_else_mark_runs_and_escape_sequences(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    # The email cleans text with render.clean: a run of combining marks is cut to three (a "Zalgo" name
    # drew a tower over the lines around it) and an escape sequence goes whole, leaving no "[31m" behind.
    h = briefs_harness
    name = "Z" + "\u0301" * 60 + "oe \x1b[31mRed\x1b]0;pwned\x07"
    uid = await brief_without_email(h, brief_seed, name, email="zoe@example.com")
    await email_job(h, uid)
    await h.run(mail(h, smtp_server), services={})

    [message] = smtp_server.wait_for(1)
    display = message["To"].addresses[0].display_name
    text, html = parts(message)
    for shown in (display, text, html):
        assert "Z" + "\u0301" * 3 + "oe" in shown
        assert "\u0301" * 4 not in shown
        assert "[31m" not in shown and "pwned" not in shown
    assert display == "Z" + "\u0301" * 3 + "oe Red"


@pytest.mark.parametrize("sender", ["a@example.com, b@example.com", "briefs@example.com\r\nBcc: x@evil.example",
                                    "not an address", "=?utf-8?q?x?= <a@example.com>", ""])
async def test_invalid_email_from_fails_permanently_naming_the_setting(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any, sender: str
) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    job_id = await email_job(h, uid)
    await h.run(mail(h, smtp_server, email_from=sender), services={})
    row = await job(h, job_id)
    assert row["status"] == "failed" and row["attempts"] == 1 and "BRIEFS_EMAIL_FROM" in row["last_error"]
    assert smtp_server.messages == []


def test_sender_checks_accept_a_local_relay_and_display_names() -> None:
    assert brief_email.check_sender("briefs@localhost").address == "briefs@localhost"
    named = brief_email.check_sender("Daily Briefs <briefs@example.com>")
    assert named.address == "briefs@example.com" and named.domain == "example.com"
    assert named.header.display_name == "Daily Briefs"
    with pytest.raises(PermanentError, match="BRIEFS_PUBLIC_URL"):
        brief_email.check_public_url("javascript:alert(1)")
    for bad in ("https://evil.example/\"><script>", "https://user:pw@b.example.com", "https://b.example.com/?a=1",
                "https://b.example.com:99999", "ftp://b.example.com", "https://b.example.com/\r\nX: y", "https://"):
        with pytest.raises(PermanentError, match="BRIEFS_PUBLIC_URL"):
            brief_email.check_public_url(bad)
    assert brief_email.check_public_url("https://b.example.com/app/") == "https://b.example.com/app"
    # each refusal names its reason
    for bad, reason in (("https://b.example.com/?a=1", "query or fragment"), ("https://b.example.com/#x", "query"),
                        ("https://user:pw@b.example.com", "credentials"), ("https://b.example.com/<", "plain URL")):
        with pytest.raises(PermanentError, match=reason):
            brief_email.check_public_url(bad)


async def test_links_come_only_from_our_urls_and_text_has_no_control_characters(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Mallory\x1b]8;;http://evil.example\x07click\x1b]8;;\x07", email="m@example.com")
    hostile = ['<a href="http://evil.example">x</a>', "javascript:alert(1)", "[click](http://evil.example)",
               "![beacon](http://evil.example/b.gif)", '<img src="http://evil.example/b.gif">',
               "bell\x07 escape\x1b[2J nul-free \u202eevil\u202c", "line\rbreak\nand\x0bmore"]
    pid = brief_seed.project(uid, hostile[0])
    for title in hostile:
        brief_seed.task(pid, title, priority="high", due_date=today - timedelta(days=1))
    await h.enqueue(uid)
    await h.run(h.settings(None), services={})
    await h.rows("UPDATE daily_briefs SET executive_summary = %s, priority_actions = %s::jsonb WHERE user_id = %s "
                 "RETURNING id", "\n\n".join(hostile), json.dumps(hostile), uid)
    await email_job(h, uid)
    await h.run(mail(h, smtp_server, public_url=PUBLIC), services={})

    [message] = smtp_server.wait_for(1)
    text, html = parts(message)
    tags = re.findall(r"<[A-Za-z][^<>]*>", html)  # real tags only: user text is escaped, so never one of these
    hrefs = [u for tag in tags for u in re.findall(r"""(?:href|src)\s*=\s*["']?([^"' >]*)""", tag, re.I)]
    assert hrefs and all(u.startswith((f"{PUBLIC}/briefs/", f"{PUBLIC}/u/")) for u in hrefs), hrefs
    assert len(re.findall(r"<a\b", html)) == 2  # "read the full brief" and "stop these emails"
    assert "<img" not in html and "evil.example/b.gif" not in "".join(hrefs)
    text, html = text.replace("\r\n", "\n"), html.replace("\r\n", "\n")  # CRLF is how lines end on the wire
    assert not CONTROL.search(text), [c for c in text if CONTROL.match(c)]
    assert not CONTROL.search(html)
    assert "javascript:alert(1)" in text  # shown as text, never as a link


# --------------------------------------------------------------------------- size


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
    settings = mail(h, smtp_server, public_url=PUBLIC, brief_max_projects=200)
    await h.enqueue(uid)
    await h.run(settings, services={})

    [message] = smtp_server.wait_for(1)
    assert len(smtp_server.received[0].raw) < 100_000
    text, html = parts(message)
    assert f"{PUBLIC}/briefs/{today.isoformat()}" in html and "Read the full brief" in text
    brief = await h.brief(uid)
    assert brief["metadata"]["email"]["trim"] != "full"
    assert brief["metadata"]["email"]["bytes"] < 100_000


async def test_pathological_brief_still_fits_the_budget(briefs_harness: Any, brief_seed: Any,
                                                        smtp_server: Any) -> None:
    """100 projects with 100 KB names, a 1 MB summary and 10,000 actions (was a 14.5 MB email)."""
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed, "Huge", email="huge@example.com")
    [brief] = await h.rows("SELECT id FROM daily_briefs WHERE user_id = %s", uid)
    # Sections of hostile size, built in SQL: 100 KB names and headings, 50 items of 1 KB per list; one
    # project in 20 with 20 such lists (over a megabyte of JSON: shown by name only).
    await h.rows(
        """WITH p AS (INSERT INTO projects (user_id, name) SELECT %s, repeat('ü', 100000) || g
                      FROM generate_series(1, 100) g RETURNING id, name)
           INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, metadata)
           SELECT %s, p.id, 'completed', jsonb_build_object('section', jsonb_build_object(
                      'project_id', p.id, 'name', p.name, 'summary', repeat('s', 20000), 'source', 'llm',
                      'note', repeat('o', 5000),
                      'groups', (SELECT jsonb_agg(jsonb_build_object(
                                     'heading', repeat('h', 5000),
                                     'items', (SELECT jsonb_agg(repeat('i', 1000)) FROM generate_series(1, 50))))
                                 FROM generate_series(1, CASE WHEN p.id %% 20 = 0 THEN 20 ELSE 1 END))))
           FROM p RETURNING id""",
        uid, brief["id"],
    )
    await h.rows("UPDATE daily_briefs SET executive_summary = repeat('word ', 200000), subject = repeat('S', 100000),"
                 " priority_actions = (SELECT jsonb_agg(repeat('a', 1000) || g) FROM generate_series(1, 10000) g)"
                 " WHERE id = %s RETURNING id", brief["id"])
    await h.rows("UPDATE users SET name = repeat('N', 100000) WHERE id = %s RETURNING id", uid)
    await email_job(h, uid)
    await h.run(mail(h, smtp_server, public_url=PUBLIC), services={})

    [received] = smtp_server.received
    assert len(received.raw) < 100_000
    text, html = parts(received.message)
    assert "Read the full brief" in text and f"{PUBLIC}/briefs/" in html
    meta = (await h.brief(uid))["metadata"]["email"]
    assert meta["bytes"] < 100_000 and meta["trim"] != "full"


def _view(**overrides: Any) -> BriefView:
    values: dict[str, Any] = dict(user_name="Some", brief_date=date(2026, 12, 1), stage="standard",
                                  subject="Your brief", llm_enabled=True, executive_summary="All fine.",
                                  priority_actions=(), sections=())
    values.update(overrides)
    return BriefView(**values)


@pytest.mark.parametrize(
    "case",
    ["100 projects with 100 KB names", "1 MB summary", "10,000 actions", "1 MB items", "everything at once"],
)
def test_fit_guarantees_the_budget_for_any_input(case: str) -> None:
    huge_items = (Group("Overdue", tuple("t" * 1_000_000 for _ in range(3))),)
    many = tuple(Section(i, "é" * 100_000, "summary", ()) for i in range(100))
    views = {
        "100 projects with 100 KB names": _view(sections=many),
        "1 MB summary": _view(executive_summary="word " * 200_000),
        "10,000 actions": _view(priority_actions=tuple(f"action {i} " * 50 for i in range(10_000))),
        "1 MB items": _view(sections=(Section(1, "P", "s", huge_items),)),
        "everything at once": _view(user_name="<" * 100_000, subject="&" * 100_000, sections=many,
                                    executive_summary="<&>" * 400_000, omitted=tuple("x" * 10_000 for _ in range(5000)),
                                    priority_actions=tuple("\"'" * 5000 for _ in range(10_000))),
    }
    for budget in (brief_email.EMAIL_BUDGET, 40_000, 10_000):
        html, text, level = brief_email.fit(views[case], budget=budget)
        assert len(html.encode()) + len(text.encode()) <= budget, (case, budget, level)
        assert "Your brief" in html or case == "everything at once"


async def test_fit_trims_step_by_step(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Some")
    for i in range(12):
        brief_seed.busy_project(uid, f"P{i:02d}", today, tasks=3)
    settings = h.settings(None, smtp_url="smtp://127.0.0.1:25", secret_key=KEY)
    await generate(h.db, settings, BriefRequest(uid, today, datetime.now(UTC)))
    config = brief_email.EmailConfig.from_settings(settings)
    async with h.db.raw() as conn:
        loaded = await brief_email.load(conn, uid, today, lock=False)
    assert loaded is not None
    full = brief_email.build_email(config, loaded, datetime.now(UTC))
    assert full.level == "full"
    again = brief_email.build_email(config, loaded, datetime.now(UTC))
    assert again.message["Message-ID"] == full.message["Message-ID"]  # deterministic per brief
    view = BriefView(
        user_name="Some", brief_date=today, stage="standard", subject="s", llm_enabled=False,
        executive_summary=loaded.summary or "", priority_actions=tuple(loaded.actions),
        sections=tuple(brief_email._section(s) for s in loaded.sections),
    )
    html, text, level = brief_email.fit(view)
    size = len(html.encode()) + len(text.encode())
    assert level == "full"
    smaller_html, smaller_text, level = brief_email.fit(view, budget=size - 1)
    assert level in ("5 items", "2 items")
    assert len(smaller_html.encode()) + len(smaller_text.encode()) < size
    tiny_html, tiny_text, tiny_level = brief_email.fit(view, budget=6_000)
    assert "projects" in tiny_level and len(tiny_html.encode()) + len(tiny_text.encode()) <= 6_000
    assert "Also in your brief" in tiny_html


# --------------------------------------------------------------------------- SMTP and TLS


async def test_password_is_never_sent_without_tls(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    with SMTPServer(auth=("user", "secret")) as smtp:
        job_id = await email_job(h, uid)
        url = f"smtp://user:secret@127.0.0.1:{smtp.port}"
        await h.run(h.settings(None, smtp_url=url, secret_key=KEY), services={})
        row = await job(h, job_id)
        assert row["status"] == "failed" and row["attempts"] == 1
        assert "TLS" in row["last_error"] and "BRIEFS_SMTP_ALLOW_INSECURE" in row["last_error"]
        assert "secret" not in row["last_error"]
        assert smtp.auth_attempts == [] and smtp.messages == []

        # Explicitly allowed for a local relay: the credentials go, and the message.
        await h.rows("UPDATE queue_jobs SET status = 'pending', attempts = 0, run_at = now() WHERE id = %s "
                     "RETURNING id", job_id)
        await h.run(h.settings(None, smtp_url=url, secret_key=KEY, smtp_allow_insecure=True), services={})
        assert (await job(h, job_id))["status"] == "completed"
        assert smtp.auth_attempts and smtp.auth_attempts[-1][1:] == ("user", False)
        assert len(smtp.messages) == 1


async def test_starttls_that_the_server_does_not_offer_fails(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    with SMTPServer(auth=("user", "secret")) as smtp:
        job_id = await email_job(h, uid)
        url = f"smtp+starttls://user:secret@127.0.0.1:{smtp.port}"
        await h.run(h.settings(None, smtp_url=url, secret_key=KEY), services={})
        row = await job(h, job_id)
        assert row["status"] == "failed" and row["attempts"] == 1 and "STARTTLS" in row["last_error"]
        assert smtp.auth_attempts == [] and smtp.messages == []


async def test_starttls_protects_the_login(briefs_harness: Any, brief_seed: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    h = briefs_harness
    try:
        material = tls_material(tmp_path)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no test certificate: {exc}")
    monkeypatch.setenv("SSL_CERT_FILE", str(material.cert))  # the client verifies the server against it
    uid = await brief_without_email(h, brief_seed)
    with SMTPServer(auth=("user", "p@ss word"), tls=material) as smtp:
        await email_job(h, uid)
        url = f"smtp+starttls://user:p%40ss%20word@127.0.0.1:{smtp.port}"
        await h.run(h.settings(None, smtp_url=url, secret_key=KEY), services={})
        [mail_job] = await h.jobs("send_brief_email")
        assert mail_job["status"] == "completed", mail_job["last_error"]
        assert smtp.auth_attempts and all(tls for _, _, tls in smtp.auth_attempts)
        assert len(smtp.messages) == 1


def test_a_server_that_stalls_cannot_hold_the_exchange_past_its_budget(smtp_server: Any) -> None:
    message = EmailMessage()
    message["Subject"] = "x"
    message.set_content("x")
    smtp_server.hold_data()
    target = smtp.SmtpTarget.parse(smtp_server.url)
    with pytest.raises(TimeoutError, match="cut"):
        smtp.smtp_send(target, message, "a@example.com", "b@example.com", budget=1.0)
    smtp_server.release()


# --------------------------------------------------------------------------- sending once, holding nothing


async def test_no_connection_or_lock_is_held_while_smtp_stalls(briefs_harness: Any, brief_seed: Any,
                                                               smtp_server: Any) -> None:
    """More stalled sends than pool connections, stalled for longer than a lease: nobody waits for the pool,
    no lock is held on the briefs, no lease expires, every email goes out once."""
    h = briefs_harness
    count = 12  # the test pool holds 5 + 5 overflow
    users = [await brief_without_email(h, brief_seed, f"U{i}") for i in range(count)]
    for uid in users:
        await email_job(h, uid)
    settings = mail(h, smtp_server, lease_seconds=1.0, worker_concurrency=count)
    smtp_server.hold_data()
    run = asyncio.create_task(h.run(settings, services={}))
    try:
        assert await asyncio.to_thread(smtp_server.wait_held, count) == count
        checked_out, locks = [], []
        for _ in range(15):  # three leases' worth of stall
            checked_out.append(h.db.pool_stats()["pool_size"] - h.db.pool_stats()["pool_available"])
            [row] = await h.rows(
                """SELECT count(*) AS n FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                   WHERE c.relname = 'daily_briefs' AND l.pid <> pg_backend_pid()""")
            locks.append(row["n"])
            await asyncio.sleep(0.2)
        assert max(locks) == 0, locks
        assert min(checked_out) == 0, checked_out  # sampled between this test's own queries
    finally:
        smtp_server.release()
        await run
    jobs = await h.jobs("send_brief_email")
    assert [(j["status"], j["attempts"]) for j in jobs] == [("completed", 1)] * count
    assert len(smtp_server.messages) == count
    assert len({m["Message-ID"] for m in smtp_server.messages}) == count


async def test_a_send_in_progress_is_not_repeated_and_a_stale_claim_is_taken_over(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    claim = """UPDATE daily_briefs SET metadata = jsonb_set(metadata, '{email}',
                   jsonb_build_object('sending', jsonb_build_object('token', 'other', 'at', now() - %s::interval)))
               WHERE user_id = %s RETURNING id"""
    await h.rows(claim, "5 seconds", uid)
    job_id = await email_job(h, uid)
    await h.run(mail(h, smtp_server), services={})
    row = await job(h, job_id)
    assert row["status"] == "pending" and "being emailed by another run" in row["last_error"]
    assert row["run_at"] > datetime.now(UTC) + timedelta(seconds=brief_email.CLAIM_STALE - 30)
    assert smtp_server.messages == []

    # The other sender died: its claim goes stale and is taken over.
    await h.rows(claim, f"{brief_email.CLAIM_STALE + 1} seconds", uid)
    await h.rows("UPDATE queue_jobs SET run_at = now() WHERE id = %s RETURNING id", job_id)
    await h.run(mail(h, smtp_server), services={})
    assert (await job(h, job_id))["status"] == "completed"
    assert len(smtp_server.messages) == 1
    brief = await h.brief(uid)
    assert brief["email_sent_at"] is not None and "sending" not in brief["metadata"]["email"]


async def test_a_failed_send_releases_its_claim(briefs_harness: Any, brief_seed: Any, smtp_server: Any) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    smtp_server.reject_next("451 4.3.0 mailbox busy, try later")
    job_id = await email_job(h, uid)
    await run_until_settled(h, mail(h, smtp_server))
    # The retry went at once: a claim left behind would have made it wait for the claim to go stale.
    row = await job(h, job_id)
    assert row["status"] == "completed" and row["attempts"] == 2
    assert len(smtp_server.messages) == 1
    assert "sending" not in (await h.brief(uid))["metadata"]["email"]


async def test_hostile_metadata_shapes_do_not_stop_the_send(briefs_harness: Any, brief_seed: Any,
                                                            smtp_server: Any) -> None:
    h = briefs_harness
    shapes = ['[1, 2]', '"text"', '{"email": "x", "revision": "9999999999999999999999"}',
              '{"email": {"sending": {"token": "t", "at": "not a time"}}}', '{"email": {"sending": [1]}}']
    users = [await brief_without_email(h, brief_seed, f"M{i}") for i in range(len(shapes))]
    for uid, shape in zip(users, shapes, strict=True):
        await h.rows("UPDATE daily_briefs SET metadata = %s::jsonb, priority_actions = '{\"a\": 1}' "
                     "WHERE user_id = %s RETURNING id", shape, uid)
        await email_job(h, uid)
    await h.run(mail(h, smtp_server), services={})
    jobs = await h.jobs("send_brief_email")
    assert [j["status"] for j in jobs] == ["completed"] * len(shapes), [j["last_error"] for j in jobs]
    assert len(smtp_server.messages) == len(shapes)


# --------------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    "payload",
    [[1, 2], "text", 42, None, {"user_id": 2**70, "brief_date": "2026-12-01"},
     {"user_id": 0, "brief_date": "2026-12-01"}, {"user_id": -5, "brief_date": "2026-12-01"},
     {"user_id": "1", "brief_date": "2026-12-01"}, {"user_id": True, "brief_date": "2026-12-01"},
     {"user_id": 1, "brief_date": "99999-01-01"}, {"user_id": 1, "brief_date": "2026-02-30"},
     {"user_id": 1, "brief_date": 20261201}, {"user_id": 1, "brief_date": "2026-12-01", "brief_id": 2**64},
     {"user_id": 1, "brief_date": "2026-12-01", "brief_id": 1.5}, {"user_id": 2, "brief_date": "2026-12-01"}],
)
def test_bad_payloads_are_permanent_errors(payload: Any) -> None:
    with pytest.raises(PermanentError, match="send_brief_email"):
        EmailRequest.from_payload(payload, user_id=1)


async def test_bad_payloads_fail_once_permanently_in_the_worker(briefs_harness: Any, brief_seed: Any,
                                                                smtp_server: Any) -> None:
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    bad = [await email_job(h, uid, payload) for payload in (
        {"user_id": 2**70, "brief_date": "2026-12-01"}, {"user_id": uid, "brief_date": "0000-01-01"},
        {"user_id": uid, "brief_date": "2026-12-01", "brief_id": -1}, ["not", "an", "object"],
    )]
    good = await email_job(h, uid)
    await h.run(mail(h, smtp_server), services={})
    for job_id in bad:
        row = await job(h, job_id)
        assert row["status"] == "failed" and row["attempts"] == 1, row["last_error"]
    assert (await job(h, good))["status"] == "completed"


# --------------------------------------------------------------------------- the flow


async def test_email_disabled_without_smtp_url(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada", email_enabled=True)
    brief_seed.busy_project(uid, "Atlas", datetime.now(UTC).date())
    await h.enqueue(uid)
    await h.run(h.settings(None), services={})

    [gen, mail_job] = await h.jobs()
    assert gen["status"] == "completed" and mail_job["job_type"] == "send_brief_email"
    assert mail_job["status"] == "completed"
    assert mail_job["result"] == {"sent": False, "reason": "email disabled"}
    assert (await h.brief(uid))["email_sent_at"] is None


async def test_no_email_job_unless_asked(briefs_harness: Any, brief_seed: Any, smtp_server: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    quiet, asked = brief_seed.user("NoMail"), brief_seed.user("AskedInPayload")
    brief_seed.busy_project(quiet, "A", today)
    brief_seed.busy_project(asked, "B", today)
    await h.enqueue(quiet)
    await h.enqueue(asked, email=True)
    await h.run(mail(h, smtp_server), services={})
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
    await run_until_settled(h, mail(h, smtp_server))

    [mail_job] = await h.jobs("send_brief_email")
    assert mail_job["status"] == "completed" and mail_job["attempts"] == 2
    assert len(smtp_server.messages) == 1
    assert (await h.brief(uid))["email_sent_at"] is not None


async def test_permanent_smtp_refusal_fails_the_email_job(briefs_harness: Any, brief_seed: Any,
                                                          smtp_server: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada", email_enabled=True)
    brief_seed.busy_project(uid, "Atlas", datetime.now(UTC).date())
    smtp_server.reject_next("550 5.1.1 no such user")
    await h.enqueue(uid)
    await h.run(mail(h, smtp_server), services={})
    [mail_job] = await h.jobs("send_brief_email")
    assert mail_job["status"] == "failed" and mail_job["attempts"] == 1 and "550" in mail_job["last_error"]
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
    await h.run(mail(h, smtp_server), services={})
    subjects = {m["To"].addresses[0].display_name: m["Subject"] for m in smtp_server.wait_for(4)}
    assert subjects["standard"].startswith("Your daily brief for")
    assert subjects["re_engagement"].startswith("Welcome back")
    assert subjects["re_engagement_late"].startswith("It's been a while")
    assert subjects["dormant_check_in"].startswith("Checking in")
    _, html = parts(next(m for m in smtp_server.messages if m["Subject"].startswith("Checking in")))
    assert "pause these briefs" in html


def test_smtp_url_problems_are_permanent_and_never_show_the_password() -> None:
    for url in ("http://x", "smtp://u:pw@host:99999", "smtp://u:pw@host:notaport", "smtp://h\r\nx"):
        with pytest.raises(PermanentError, match="BRIEFS_SMTP_URL") as info:
            smtp.SmtpTarget.parse(url)
        assert "pw" not in str(info.value)
    assert smtp.SmtpTarget.parse("smtps://u:pw@mail.example.com").port == 465
    assert smtp.SmtpTarget.parse("smtp+starttls://u:pw@mail.example.com").tls == "starttls"
    assert smtp.SmtpTarget.parse("smtp://u:pw@127.0.0.1", allow_insecure=True).password == "pw"
    # The classification of SMTP errors: 5xx permanent, 4xx and network trouble transient.
    target = smtp.SmtpTarget.parse("smtp://127.0.0.1")
    assert brief_email._classify(smtplib.SMTPResponseException(554, b"no"), target).permanent
    assert not brief_email._classify(smtplib.SMTPResponseException(421, b"busy"), target).permanent
    assert not brief_email._classify(ConnectionResetError(), target).permanent
    assert brief_email._classify(smtplib.SMTPNotSupportedError("no"), target).permanent


async def test_follow_up_jobs_are_held_to_the_payload_limit(briefs_harness: Any, brief_seed: Any) -> None:
    """The handlers' enqueue hook passes BRIEFS_MAX_PAYLOAD_BYTES to the queue: an oversized follow-up is refused
    alone, the others go in."""
    from briefs.generator import FollowUp
    from briefs.jobs import enqueue_hook

    h = briefs_harness
    uid = brief_seed.user("Ada")
    small = FollowUp("send_brief_email", {"user_id": uid, "brief_date": "2026-12-01"}, f"email:{uid}:2026-12-01",
                     uid, None, None)
    big = FollowUp("send_brief_email", {"user_id": uid, "brief_date": "2026-12-02", "pad": "x" * 2000},
                   f"email:{uid}:2026-12-02", uid, None, None)
    async with h.db.raw() as conn:
        ids = await enqueue_hook(5, 1024)(conn, [small, big])
    assert ids[0] is not None and ids[1] is None
    assert [j["dedup_key"] for j in await h.jobs()] == [f"email:{uid}:2026-12-01"]


async def test_smtps_verifies_the_certificate_and_logs_in_over_tls(briefs_harness: Any, brief_seed: Any,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    h = briefs_harness
    try:
        material = tls_material(tmp_path)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no test certificate: {exc}")
    uid = await brief_without_email(h, brief_seed)
    with SMTPServer(auth=("user", "secret"), tls=material, implicit_tls=True) as smtp:
        job_id = await email_job(h, uid)
        settings = h.settings(None, smtp_url=f"smtps://user:secret@127.0.0.1:{smtp.port}", secret_key=KEY)
        # A certificate nobody vouches for: no login, no message, an error naming the cause (retried: a
        # certificate can be renewed).
        await h.run(settings, services={})
        row = await job(h, job_id)
        assert row["attempts"] > 1 and "CERTIFICATE_VERIFY_FAILED" in row["last_error"], row["last_error"]
        assert smtp.auth_attempts == [] and smtp.messages == []

        monkeypatch.setenv("SSL_CERT_FILE", str(material.cert))
        await h.rows("UPDATE queue_jobs SET status = 'pending', attempts = 0, run_at = now() WHERE id = %s "
                     "RETURNING id", job_id)
        await h.run(settings, services={})
        assert (await job(h, job_id))["status"] == "completed"
        assert [login for _, login, _ in smtp.auth_attempts] == ["user"]
        assert len(smtp.messages) == 1


async def test_a_send_cancelled_mid_smtp_still_completes_and_is_recorded_once(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    """A job timeout or a lost lease cancels the handler; the send already under way finishes and is recorded,
    so the retry finds it sent instead of sending again."""
    h = briefs_harness
    uid = await brief_without_email(h, brief_seed)
    settings = mail(h, smtp_server)
    request = EmailRequest(uid, datetime.now(UTC).date())
    smtp_server.hold_data()
    sending = asyncio.create_task(brief_email.send_brief_email(h.db, settings, request))
    assert await asyncio.to_thread(smtp_server.wait_held, 1) == 1
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    smtp_server.release()
    for _ in range(200):  # wait for the shielded send to record itself
        if (await h.brief(uid))["email_sent_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert (await h.brief(uid))["email_sent_at"] is not None
    again = await brief_email.send_brief_email(h.db, settings, request)
    assert again["sent"] is False and again["reason"] == "already sent"
    assert len(smtp_server.messages) == 1
