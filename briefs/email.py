"""Emailing a finished brief: the ``send_brief_email`` job's work.

The message has a plain-text and an HTML part (Jinja2, autoescape on: task
titles and project names are user data), built from the brief's stored
sections. The HTML is kept under :data:`HTML_BUDGET` bytes: for a user with
many projects, sections are trimmed step by step (fewer items per list, then
summaries only, then only the projects that need attention, the rest named in
one line), with a link to the full brief when ``BRIEFS_PUBLIC_URL`` is set.

Sending uses stdlib ``smtplib`` in a thread (``asyncio.to_thread``): one message
per job does not justify a new dependency. ``BRIEFS_SMTP_URL`` is
``smtp://[user:pass@]host[:port]`` (plain, port 25), ``smtp+starttls://…``
(STARTTLS, port 587) or ``smtps://…`` (implicit TLS, port 465). Without it the
job completes with ``{"sent": false, "reason": "email disabled"}`` — never a fake
send.

Idempotency. The brief row is locked (``SELECT … FOR UPDATE``) for the whole
send, ``email_sent_at`` is checked under that lock, and set in the same
transaction right after the SMTP server accepted the message; that sequence is
shielded from cancellation (a job timeout or lost lease cannot cut between
accept and write). Two jobs for one brief therefore never both send. What is
left is the crash window between the server's accept and the commit (the
process dies, or the database is unreachable at that moment): the retry sends
again. We prefer that (at-least-once) to losing a brief, and make the duplicate
recognisable: the ``Message-ID`` is deterministic per brief and revision, so a
resend carries the same id and mail clients that dedupe by it show one message.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from typing import Any
from urllib.parse import unquote, urlsplit

from briefs import render
from briefs.db import Database
from briefs.errors import PermanentError, RetryLater
from briefs.render import BriefView, Section

log = logging.getLogger(__name__)

HTML_BUDGET = 95_000  # bytes of HTML; the requirement is "under 100 KB"
SMTP_TIMEOUT = 30.0
MAX_OMITTED_NAMES = 60
NOT_READY_DELAY = 30.0


@dataclass(frozen=True)
class EmailRequest:
    user_id: int
    brief_date: date
    brief_id: int | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, user_id: int | None = None) -> EmailRequest:
        if not isinstance(payload, dict):
            raise PermanentError("send_brief_email: payload must be an object")
        uid = payload.get("user_id", user_id)
        if not isinstance(uid, int) or isinstance(uid, bool):
            raise PermanentError(f"send_brief_email: user_id must be an integer, got {uid!r}")
        try:
            day = date.fromisoformat(str(payload.get("brief_date")))
        except ValueError:
            raise PermanentError(f"send_brief_email: bad brief_date {payload.get('brief_date')!r}") from None
        brief_id = payload.get("brief_id")
        if brief_id is not None and (not isinstance(brief_id, int) or isinstance(brief_id, bool)):
            raise PermanentError(f"send_brief_email: brief_id must be an integer, got {brief_id!r}")
        return cls(uid, day, brief_id)


@dataclass(frozen=True)
class Email:
    message: EmailMessage
    html: str
    text: str
    level: str  # how much was trimmed to fit


_SQL = {
    "brief": """
        SELECT b.id, b.status, b.subject, b.executive_summary, b.priority_actions, b.engagement_stage,
               b.metadata, b.email_sent_at, b.brief_date, u.id, u.email, u.name
        FROM daily_briefs b JOIN users u ON u.id = b.user_id
        WHERE b.user_id = %s AND b.brief_date = %s
        {lock}
    """,
    "sections": """
        SELECT pdb.metadata
        FROM project_daily_briefs pdb JOIN projects p ON p.id = pdb.project_id
        WHERE pdb.daily_brief_id = %s
        ORDER BY lower(p.name), p.id
    """,
    "sent": """
        UPDATE daily_briefs
        SET email_sent_at = now(), updated_at = now(),
            metadata = metadata || jsonb_build_object('email', jsonb_build_object(
                'message_id', %s::text, 'to', %s::text, 'trim', %s::text, 'html_bytes', %s::int))
        WHERE id = %s
    """,
}


# --------------------------------------------------------------------------- the job


async def send_brief_email(db: Database, settings: Any, request: EmailRequest, *, now: datetime | None = None
                           ) -> dict[str, Any]:
    """Send one brief's email at most once per brief (see the module docstring for the crash window)."""
    smtp_url = settings.smtp_url.get_secret_value() if settings.smtp_url else ""
    if not smtp_url:
        log.info("email disabled (BRIEFS_SMTP_URL is not set): not sending brief email for user %s on %s",
                 request.user_id, request.brief_date)
        return {"sent": False, "reason": "email disabled"}
    # The send and its record run to completion even if this job is cancelled meanwhile.
    task = asyncio.ensure_future(_send_locked(db, settings, request, smtp_url, now or datetime.now(UTC)))
    return await asyncio.shield(task)


async def _send_locked(
    db: Database, settings: Any, request: EmailRequest, smtp_url: str, now: datetime
) -> dict[str, Any]:
    async with db.raw() as conn:
        cur = await conn.execute(_SQL["brief"].format(lock="FOR UPDATE OF b"), (request.user_id, request.brief_date))
        row = await cur.fetchone()
        if row is None:
            raise PermanentError(f"no brief for user {request.user_id} on {request.brief_date}")
        brief_id, status, email_sent_at = row[0], row[1], row[7]
        if request.brief_id is not None and brief_id != request.brief_id:
            log.info("brief %s was replaced by brief %s; emailing the current one", request.brief_id, brief_id)
        if email_sent_at is not None:
            log.info("brief %s was already emailed at %s; not sending again", brief_id, email_sent_at)
            return {"sent": False, "reason": "already sent", "brief_id": brief_id,
                    "sent_at": email_sent_at.isoformat()}
        if status == "processing":
            raise RetryLater(f"brief {brief_id} is still being generated", delay=NOT_READY_DELAY)
        if status not in ("completed", "partial"):
            raise PermanentError(f"brief {brief_id} is {status}; nothing to email")
        cur = await conn.execute(_SQL["sections"], (brief_id,))
        sections = [m for (m,) in await cur.fetchall()]
        email = build_email(settings, row, sections, now)
        try:
            await asyncio.to_thread(smtp_send, smtp_url, email.message)
        except smtplib.SMTPResponseException as exc:
            text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
            message = f"SMTP server refused the message: {exc.smtp_code} {text}"
            if 500 <= exc.smtp_code < 600:
                raise PermanentError(message) from None
            raise RetryLater(message) from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise PermanentError(f"SMTP server refused the recipient: {exc.recipients}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise RetryLater(f"could not send email via SMTP: {type(exc).__name__}: {exc}") from None
        await conn.execute(
            _SQL["sent"],
            (email.message["Message-ID"], request_to(email.message), email.level, len(email.html.encode()),
             brief_id),
        )
    log.info("emailed brief %s to user %s (%s, %d bytes of HTML, %s)", brief_id, request.user_id,
             email.message["Message-ID"], len(email.html.encode()), email.level)
    return {"sent": True, "brief_id": brief_id, "message_id": email.message["Message-ID"],
            "html_bytes": len(email.html.encode()), "trim": email.level}


def request_to(message: EmailMessage) -> str:
    return parseaddr(str(message["To"]))[1]


# --------------------------------------------------------------------------- building the message


def message_id(brief_id: int, revision: int, user_id: int, brief_date: date, email_from: str) -> str:
    domain = parseaddr(email_from)[1].rpartition("@")[2] or "briefs.localhost"
    return f"<brief-{brief_id}.r{revision}.u{user_id}.{brief_date.isoformat()}@{domain}>"


def build_email(settings: Any, row: tuple[Any, ...], section_meta: list[dict[str, Any]], now: datetime) -> Email:
    (brief_id, status, subject, summary, actions, stage, meta, _sent, brief_date, user_id, address, name) = row
    meta = meta or {}
    sections = [Section.from_dict(m["section"]) for m in section_meta if isinstance(m, dict) and m.get("section")]
    important = [not (m.get("reason") == "quiet") for m in section_meta if isinstance(m, dict) and m.get("section")]
    display = (name or "").strip() or address.split("@", 1)[0]
    subject = subject or render.subject(stage or render.STANDARD, brief_date, display)
    base = (settings.public_url or "").rstrip("/")
    view = BriefView(
        user_name=display,
        brief_date=brief_date,
        stage=render.normal_stage(stage),
        subject=subject,
        llm_enabled=meta.get("llm") == "enabled",
        executive_summary=summary or "",
        priority_actions=tuple(actions or ()),
        sections=tuple(sections),
        status=status,
        summary_source=str(meta.get("summary_source") or "llm"),
        catch_up=bool(meta.get("catch_up")),
        full_url=f"{base}/briefs/{brief_date.isoformat()}" if base else None,
        unsubscribe_url=f"{base}/briefs/unsubscribe?user={user_id}" if base else None,
    )
    html, text, level = fit(view, important)

    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = settings.email_from
    msg["To"] = formataddr((display, address))
    msg["Date"] = format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = message_id(brief_id, int(meta.get("revision") or 1), user_id, brief_date, settings.email_from)
    if view.unsubscribe_url:
        msg["List-Unsubscribe"] = f"<{view.unsubscribe_url}>"
    msg["X-Briefs-Brief"] = f"{user_id}/{brief_date.isoformat()}"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return Email(msg, html, text, level)


def fit(view: BriefView, important: list[bool] | None = None, budget: int = HTML_BUDGET) -> tuple[str, str, str]:
    """(html, text, level): the fullest rendering whose HTML fits in ``budget`` bytes."""

    def attempt(v: BriefView) -> tuple[str, str] | None:
        html = render.email_html(v)
        return (html, render.email_text(v)) if len(html.encode()) <= budget else None

    for level, items in (("full", None), ("5 items", 5), ("2 items", 2), ("summaries", 0)):
        out = attempt(replace(view, sections=tuple(s.trimmed(items) for s in view.sections)))
        if out:
            return (*out, level)

    # Keep the projects that need attention first (in brief order), name the rest.
    flags = important if important and len(important) == len(view.sections) else [True] * len(view.sections)
    order = [i for i, f in enumerate(flags) if f] + [i for i, f in enumerate(flags) if not f]
    keep = len(order)
    while True:
        keep //= 2
        chosen = set(order[:keep])
        kept = tuple(s.trimmed(0) for i, s in enumerate(view.sections) if i in chosen)
        rest = [s.name for i, s in enumerate(view.sections) if i not in chosen]
        omitted = tuple(rest[:MAX_OMITTED_NAMES]) + ((f"{len(rest) - MAX_OMITTED_NAMES} more",)
                                                     if len(rest) > MAX_OMITTED_NAMES else ())
        out = attempt(replace(view, sections=kept, omitted=omitted))
        if out or keep == 0:
            if out is None:  # even the bare brief is too big (huge summary): send it anyway, trimmed of lists
                html = render.email_html(replace(view, sections=(), omitted=omitted))
                out = (html, render.email_text(replace(view, sections=(), omitted=omitted)))
            return (*out, f"{len(kept)} of {len(view.sections)} projects")


# --------------------------------------------------------------------------- SMTP


def smtp_send(url: str, message: EmailMessage) -> None:
    """Send ``message`` via the server in ``url`` (blocking; run it in a thread)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps", "smtp+starttls"):
        raise PermanentError(f"BRIEFS_SMTP_URL: unsupported scheme {scheme!r} (use smtp, smtp+starttls or smtps)")
    host = parts.hostname or "localhost"
    port = parts.port or {"smtp": 25, "smtps": 465, "smtp+starttls": 587}[scheme]
    context = ssl.create_default_context()
    server: smtplib.SMTP
    if scheme == "smtps":
        server = smtplib.SMTP_SSL(host, port, timeout=SMTP_TIMEOUT, context=context)
    else:
        server = smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT)
    with server:
        if scheme == "smtp+starttls":
            server.starttls(context=context)
        if parts.username:
            server.login(unquote(parts.username), unquote(parts.password or ""))
        server.send_message(message)
