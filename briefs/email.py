"""Emailing a finished brief: the ``send_brief_email`` job's work.

**The message.** A plain-text and an HTML part (Jinja2; the HTML environment autoescapes), built
from the brief's stored sections. Everything in it that comes from a row — the user's name and
address, the stored subject, summary, actions, project sections — is hostile until checked here:

- *one checked recipient.* ``users.email`` must be exactly one address that ``email-validator``
  accepts (no display name, no list, no quoted local part, no IP literal, a real domain); anything
  else fails that email job permanently, saying why. The SMTP envelope names that one address
  explicitly: recipients never come from headers.
- *no header injection.* Display text that goes into a header (the user's name in ``To``, the
  subject) is neutralised: control characters and line breaks removed, whitespace collapsed,
  clipped, and ``=?`` broken up (Python's email package decodes RFC 2047 encoded words in values it
  is given, and an encoded CR LF would come out as a new header line). ``BRIEFS_EMAIL_FROM`` must be
  one valid address (display name allowed; ``@localhost`` allowed for local relays), else the job
  fails permanently naming the setting. The finished header block is parsed back and checked (header
  names, exactly one ``To`` address) before anything is sent.
- *links are ours.* The only links are the full-brief link and the unsubscribe link, both built from
  ``BRIEFS_PUBLIC_URL`` (validated: an http(s) URL without credentials, query or odd characters) plus
  a date or a signed token; user text is escaped in HTML and never becomes a link. The text part
  carries no control characters (only the newlines the template puts there).
- *size.* The whole message as sent (headers, both parts, transfer encoding, CRLF line ends) stays
  under :data:`EMAIL_BUDGET` bytes, whatever the data: every string is clipped first (names,
  headings, items, notes, actions, the summary, the omitted-project names), then :func:`fit` trims
  step by step (fewer items per list, then summaries only, then only the projects that need
  attention with the rest named, then a shorter summary and fewer actions) and measures the real
  serialised message at each step; the last step always fits.

**Unsubscribe.** The link carries a signed token (:mod:`briefs.unsubscribe`), never the user id.
Sending email needs ``BRIEFS_SECRET_KEY`` (``briefs run --demo`` sets a random one): without it a
job fails permanently, naming the setting. With an ``https`` ``BRIEFS_PUBLIC_URL`` the message has
``List-Unsubscribe: <https://…/u/<token>>`` and ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` (RFC 8058); with an ``http`` URL (a local setup) only
``List-Unsubscribe``, since one-click requires https; without ``BRIEFS_PUBLIC_URL`` there is no
link to sign and no ``List-Unsubscribe`` header at all (a ``mailto:`` to the sender would promise an
unsubscribe that nothing processes).

**SMTP** (:mod:`briefs.smtp`). stdlib ``smtplib`` in threads of its own. ``BRIEFS_SMTP_URL`` is
``smtp://[user:pass@]host[:port]`` (plain, port 25), ``smtp+starttls://…`` (STARTTLS, port 587) or
``smtps://…`` (implicit TLS, port 465). Credentials are never sent without TLS: a password with
``smtp://`` is refused unless ``BRIEFS_SMTP_ALLOW_INSECURE`` is set (a local relay), and a server
that does not offer STARTTLS fails the send (no fallback to plain). Certificates are verified.
Each socket operation times out after :data:`briefs.smtp.SMTP_TIMEOUT`; the whole exchange is cut
after :data:`briefs.smtp.SEND_BUDGET` (a server that drips bytes cannot hold a job). Without ``BRIEFS_SMTP_URL`` the
job completes with ``{"sent": false, "reason": "email disabled"}`` — never a fake send.

**Sending once, holding nothing.** No database connection is held during the SMTP exchange:

1. *claim* (one short transaction): lock the brief row, check it (already sent → done; still
   generating → retry later; failed → nothing to send), and unless another send is in progress,
   write a claim ``metadata.email.sending = {token, at}`` (the database's clock); commit.
   A claim younger than :data:`CLAIM_STALE` means a send is in progress elsewhere: this job retries
   after it would go stale. An older one belonged to a sender that died; it is taken over.
2. *send*, with no connection checked out.
3. *record* (one short transaction, fenced by the claim's token): ``email_sent_at``, the
   Message-ID, and the claim removed. A failed send removes the claim (fenced the same way) so the
   retry can go at once.

The send and its record run to completion even if the job is cancelled meanwhile (timeout, lost
lease): the work is shielded. What is left is the crash window between the server's accept and the
record (the process dies, or the database is unreachable then): the claim goes stale and a retry
sends again. We prefer that (at-least-once) to losing a brief, and make the duplicate recognisable:
the ``Message-ID`` is deterministic per brief and revision, so a resend carries the same id and mail
clients that dedupe by it show one message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import smtplib
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from psycopg.rows import namedtuple_row
from pydantic import SecretStr

from briefs import render, unsubscribe
from briefs.contract import EmailRequest
from briefs.db import Database
from briefs.errors import PermanentError, RetryLater
from briefs.render import BriefView, Group, Section
from briefs.settings import http_url_problem
from briefs.smtp import SEND_BUDGET, SmtpTarget, smtp_send, smtp_threads

log = logging.getLogger(__name__)

EMAIL_BUDGET = 98_000  # bytes of the whole message on the wire; the requirement is "under 100 KB"
CLAIM_STALE = SEND_BUDGET + 60.0  # a send claim older than this belonged to a sender that died
NOT_READY_DELAY = 30.0

# Clipping, before any rendering (characters).
NAME_MAX = 100  # the user's name (To display name, greeting)
SUBJECT_MAX = 200
SUMMARY_MAX = 20_000  # the executive summary
ACTIONS_MAX = 20  # priority actions shown
GROUPS_MAX = 8  # lists per project section
OMITTED_NAME_MAX = 80  # each name in the "also in your brief" line
MAX_OMITTED_NAMES = 60
SECTION_JSON_MAX = 200_000  # bytes of one stored section's JSON read at all; bigger ones show by name only
ADDRESS_MAX = 320

# Header values: the message policy folds at 998 (RFC 5322's hard limit) so a long URL in
# List-Unsubscribe stays one token instead of being RFC 2047-encoded (which breaks it).
POLICY = email_policy.default.clone(max_line_length=998)
HEADERS = ("Subject", "From", "To", "Date", "Message-ID", "List-Unsubscribe", "List-Unsubscribe-Post",
           "X-Briefs-Brief", "MIME-Version", "Content-Type", "Content-Transfer-Encoding")

_PUBLIC_URL_OK = re.compile(r"https?://[A-Za-z0-9._~:/@!$&*+;=%\[\]-]+", re.ASCII)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Sender:
    header: Address
    address: str
    domain: str


def check_sender(value: str) -> Sender:
    """``BRIEFS_EMAIL_FROM``: one address, optionally with a display name; else a :class:`PermanentError`."""
    if not isinstance(value, str) or not value.strip():
        raise PermanentError("BRIEFS_EMAIL_FROM is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or "=?" in value:
        raise PermanentError(f"BRIEFS_EMAIL_FROM contains control characters or an encoded word: {_short(value)}")
    options: dict[str, Any] = dict(check_deliverability=False, allow_display_name=True, allow_smtputf8=False,
                                   globally_deliverable=False)
    try:
        checked = validate_email(value, **options)
        domain = checked.ascii_domain
    except EmailNotValidError as exc:
        # email-validator refuses the special-use name "localhost"; a local relay (and the default) uses it.
        if not re.search(r"@localhost>?\s*$", value, re.IGNORECASE):
            raise PermanentError(f"BRIEFS_EMAIL_FROM is not a valid address ({exc}): {_short(value)}") from None
        probe = re.sub(r"@localhost(>?\s*)$", r"@localhost.test\1", value, flags=re.IGNORECASE)
        try:
            checked = validate_email(probe, test_environment=True, **options)
        except EmailNotValidError as exc2:
            raise PermanentError(f"BRIEFS_EMAIL_FROM is not a valid address ({exc2}): {_short(value)}") from None
        domain = "localhost"
    local = checked.ascii_local_part or checked.local_part
    name = checked.display_name or ""
    if len(name) > NAME_MAX:
        raise PermanentError(f"BRIEFS_EMAIL_FROM: the display name is longer than {NAME_MAX} characters")
    address = f"{local}@{domain}"
    return Sender(Address(display_name=name, addr_spec=address), address, domain)


def check_recipient(value: Any) -> str:
    """``users.email``: exactly one deliverable-looking address, normalised; else a :class:`PermanentError`."""
    if not isinstance(value, str) or not value:
        raise PermanentError("the user has no email address")
    if len(value) > ADDRESS_MAX:
        raise PermanentError(f"the user's email address is longer than {ADDRESS_MAX} characters")
    try:
        # ASCII local parts only: the email package cannot write an SMTPUTF8 address into a header.
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise PermanentError(f"the user's email address {_short(value)} is not one valid address: {exc}") from None
    return checked.ascii_email or checked.normalized


def check_public_url(value: str | None) -> str | None:
    """``BRIEFS_PUBLIC_URL`` (None when unset): an http(s) URL, no credentials, query or fragment."""
    if not value:
        return None
    problem = None
    if len(value) > 500:
        problem = "longer than 500 characters"
    elif "?" in value or "#" in value:
        problem = "a query or fragment"
    elif not _PUBLIC_URL_OK.fullmatch(value):
        problem = "not an http(s) URL of plain URL characters"
    else:
        problem = http_url_problem(value)
        if problem is None:
            parts = urlsplit(value)
            if parts.username is not None or parts.password is not None:
                problem = "credentials in the URL"
    if problem:
        raise PermanentError(f"BRIEFS_PUBLIC_URL is not usable for links ({problem}): {_short(value)}")
    return value.rstrip("/")


@dataclass(frozen=True)
class Limits:
    max_sections: int = 50
    max_items: int = 25
    max_text: int = 500

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_sections=max(1, int(getattr(settings, "brief_max_projects", cls.max_sections))),
            max_items=max(1, int(getattr(settings, "brief_max_tasks", cls.max_items))),
            max_text=max(20, int(getattr(settings, "brief_max_text", cls.max_text))),
        )


@dataclass(frozen=True)
class EmailConfig:
    smtp: SmtpTarget
    sender: Sender
    secret: SecretStr = field(repr=False)
    public_url: str | None
    limits: Limits = Limits()

    @classmethod
    def from_settings(cls, settings: Any) -> EmailConfig:
        """Every email setting checked before any row is touched: a bad one is a :class:`PermanentError`."""
        smtp_url = settings.smtp_url.get_secret_value() if settings.smtp_url else ""
        smtp = SmtpTarget.parse(smtp_url, allow_insecure=bool(settings.smtp_allow_insecure))
        secret = settings.secret_key
        try:
            unsubscribe.check_key(secret)
        except unsubscribe.SecretKeyError as exc:
            raise PermanentError(
                f"{exc}: email is refused without it (it signs the unsubscribe links). Set BRIEFS_SECRET_KEY to a "
                "long random value, e.g. from: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            ) from None
        assert secret is not None
        return cls(smtp, check_sender(settings.email_from), secret, check_public_url(settings.public_url),
                   Limits.from_settings(settings))


# --------------------------------------------------------------------------- hostile text

def _clean(value: Any, limit: int, *, lines: bool = False) -> str:
    """``value`` as display text: :func:`render.clean` (control characters, escape sequences, mark runs),
    whitespace collapsed (kept as paragraph breaks when ``lines``), at most ``limit`` characters."""
    if not isinstance(value, str):
        value = "" if value is None or isinstance(value, (dict, list)) else str(value)
    value = value[: limit * 4 + 16]  # bound the work before cleaning; whitespace runs collapse below
    value = render.clean(value.replace("\u2028", "\n").replace("\u2029", "\n\n"))
    if lines:
        paras = (" ".join(p.split()) for p in re.split(r"\n[ \t\xa0]*\n", value))
        value = "\n\n".join(p for p in paras if p)
    else:
        value = " ".join(value.split())
    return render.clip(value, limit)


def header_text(value: Any, limit: int) -> str:
    """Display text safe in a header: one clean line, and no ``=?`` that the email package would decode."""
    return _clean(value, limit).replace("=?", "= ?")


# --------------------------------------------------------------------------- loading


_SQL = {
    # One row, its big values clipped in SQL (a 1 MB summary or 10,000 actions never reach Python).
    "brief": f"""
        SELECT b.id AS brief_id, b.status, left(b.subject, {SUBJECT_MAX * 2}) AS subject,
               left(b.executive_summary, {SUMMARY_MAX * 2}) AS summary,
               (SELECT coalesce(jsonb_agg(left(a.value #>> '{{}}', {2_000}) ORDER BY a.n), '[]'::jsonb)
                FROM jsonb_array_elements(CASE WHEN jsonb_typeof(b.priority_actions) = 'array'
                                               THEN b.priority_actions ELSE '[]'::jsonb END)
                     WITH ORDINALITY AS a(value, n)
                WHERE a.n <= {ACTIONS_MAX} AND jsonb_typeof(a.value) = 'string') AS actions,
               left(b.engagement_stage, 40) AS stage, left(b.metadata ->> 'revision', 12) AS revision,
               left(b.metadata ->> 'llm', 20) AS llm, left(b.metadata ->> 'summary_source', 20) AS summary_source,
               left(b.metadata ->> 'catch_up', 8) AS catch_up, b.metadata ? 'llm_budget' AS over_budget,
               CASE WHEN b.email_sent_at > '9999-12-30' THEN '9999-12-30'::timestamptz  -- one Python holds
                    WHEN b.email_sent_at < '0001-01-03' THEN '0001-01-03'::timestamptz ELSE b.email_sent_at END
                   AS email_sent_at,
               b.brief_date, u.id AS user_id,
               CASE WHEN length(u.email) <= {ADDRESS_MAX} THEN u.email END AS address,
               left(u.name, {NAME_MAX * 2}) AS name,
               left(b.metadata #>> '{{email,sending,token}}', 64) AS sending_token,
               left(b.metadata #>> '{{email,sending,at}}', 64) AS sending_at,
               now() AS db_now
        FROM daily_briefs b JOIN users u ON u.id = b.user_id
        WHERE b.user_id = %s AND b.brief_date = %s
    """,
    # The first sections in brief order (their JSON only when of sane size), then names only, and the total.
    "sections": """
        SELECT s.project_id, left(s.name, 2000) AS name, s.quiet,
               CASE WHEN s.n <= %(sections)s AND octet_length(pdb.metadata::text) <= %(json_max)s
                    THEN pdb.metadata -> 'section' END AS data,
               s.total
        FROM (SELECT pdb.id, p.id AS project_id, p.name, coalesce(pdb.metadata ->> 'reason', '') = 'quiet' AS quiet,
                     row_number() OVER (ORDER BY lower(p.name), p.id) AS n, count(*) OVER () AS total
              FROM project_daily_briefs pdb JOIN projects p ON p.id = pdb.project_id
              JOIN daily_briefs b ON b.id = pdb.daily_brief_id AND b.user_id = p.user_id  -- the owner's only
              WHERE pdb.daily_brief_id = %(brief)s) AS s
        JOIN project_daily_briefs pdb ON pdb.id = s.id
        WHERE s.n <= %(sections)s + %(names)s
        ORDER BY s.n
    """,
    "claim": """
        UPDATE daily_briefs
        SET metadata = jsonb_set(
                CASE WHEN jsonb_typeof(metadata) = 'object' THEN metadata ELSE '{}'::jsonb END, '{email}',
                CASE WHEN jsonb_typeof(metadata -> 'email') = 'object' THEN metadata -> 'email' ELSE '{}'::jsonb END
                || jsonb_build_object('sending', jsonb_build_object('token', %s::text, 'at', now()))),
            updated_at = now()
        WHERE id = %s
    """,
    "sent": """
        UPDATE daily_briefs
        SET email_sent_at = now(), updated_at = now(),
            metadata = jsonb_set(metadata, '{email}', (metadata -> 'email') - 'sending' || jsonb_build_object(
                'message_id', %s::text, 'to', %s::text, 'trim', %s::text, 'html_bytes', %s::int, 'bytes', %s::int))
        WHERE id = %s AND metadata #>> '{email,sending,token}' = %s
        RETURNING id
    """,
    "release": """
        UPDATE daily_briefs SET metadata = jsonb_set(metadata, '{email}', (metadata -> 'email') - 'sending'),
                                updated_at = now()
        WHERE id = %s AND metadata #>> '{email,sending,token}' = %s
    """,
}


@dataclass(frozen=True)
class LoadedSection:
    project_id: int
    name: str
    quiet: bool
    data: Any  # the stored section JSON (None when too big or past the shown sections)


@dataclass(frozen=True)
class LoadedBrief:
    brief_id: int
    status: str
    subject: str | None
    summary: str | None
    actions: list[Any]
    stage: str | None
    revision: int
    llm: bool
    summary_source: str
    catch_up: bool
    email_sent_at: datetime | None
    brief_date: date
    user_id: int
    address: str | None
    name: str | None
    sending_token: str | None
    sending_at: datetime | None
    db_now: datetime
    sections: tuple[LoadedSection, ...] = ()
    total_sections: int = 0
    over_budget: bool = False  # written without AI: the day's LLM budget was spent (metadata.llm_budget)


def _int_or(value: Any, default: int) -> int:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        return default
    return number if 1 <= number <= 1_000_000_000 else default


def _when(value: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(value))
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else None


async def load(conn: Any, user_id: int, brief_date: date, *, lock: bool, limits: Limits = Limits(),
               sections: bool = True) -> LoadedBrief | None:
    """The brief and its user (and its first sections unless ``sections=False``), every value bounded."""
    cur = await conn.execute(_SQL["brief"] + (" FOR UPDATE OF b" if lock else ""), (user_id, brief_date))
    cur.row_factory = namedtuple_row
    row = await cur.fetchone()
    if row is None:
        return None
    brief = LoadedBrief(
        brief_id=row.brief_id, status=row.status, subject=row.subject, summary=row.summary,
        actions=[a for a in (row.actions or []) if isinstance(a, str)], stage=row.stage,
        revision=_int_or(row.revision, 1), llm=row.llm == "enabled", summary_source=row.summary_source or "llm",
        catch_up=row.catch_up == "true", email_sent_at=row.email_sent_at, brief_date=row.brief_date,
        user_id=row.user_id, address=row.address, name=row.name, sending_token=row.sending_token,
        sending_at=_when(row.sending_at), db_now=row.db_now, over_budget=row.over_budget is True,
    )
    return await load_sections(conn, brief, limits) if sections else brief


async def load_sections(conn: Any, brief: LoadedBrief, limits: Limits = Limits()) -> LoadedBrief:
    """``brief`` with its first sections (JSON only when of sane size), the next names, and the total."""
    cur = await conn.execute(
        _SQL["sections"],
        {"brief": brief.brief_id, "sections": limits.max_sections, "names": MAX_OMITTED_NAMES,
         "json_max": SECTION_JSON_MAX},
    )
    cur.row_factory = namedtuple_row
    rows = await cur.fetchall()
    sections = tuple(LoadedSection(row.project_id, row.name or "", bool(row.quiet), row.data) for row in rows)
    return replace(brief, sections=sections, total_sections=int(rows[0].total) if rows else 0)


# --------------------------------------------------------------------------- the job


async def send_brief_email(db: Database, settings: Any, request: EmailRequest, *, now: datetime | None = None
                           ) -> dict[str, Any]:
    """Send one brief's email (see the module docstring for the claim, the send and the crash window)."""
    if not (settings.smtp_url and settings.smtp_url.get_secret_value()):
        log.info("email disabled (BRIEFS_SMTP_URL is not set): not sending brief email for user %s on %s",
                 request.user_id, request.brief_date)
        return {"sent": False, "reason": "email disabled"}
    config = EmailConfig.from_settings(settings)
    # The claim, the send and its record run to completion even if this job is cancelled meanwhile.
    task = asyncio.ensure_future(_claim_send_record(db, config, request, now or datetime.now(UTC)))
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """The job may have stopped waiting (cancelled): still collect the outcome so nothing goes unlogged."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("email send ended with %r", task.exception())


@dataclass(frozen=True)
class _Claim:
    brief: LoadedBrief
    token: str


async def _claim(db: Database, config: EmailConfig, request: EmailRequest) -> _Claim | dict[str, Any]:
    async with db.raw() as conn:
        # The row lock is held for this check and the claim only; the sections are read after the commit.
        brief = await load(conn, request.user_id, request.brief_date, lock=True, sections=False)
        if brief is None:
            raise PermanentError(f"no brief for user {request.user_id} on {request.brief_date}")
        if request.brief_id is not None and brief.brief_id != request.brief_id:
            log.info("brief %s was replaced by brief %s; emailing the current one", request.brief_id, brief.brief_id)
        if brief.email_sent_at is not None:
            log.info("brief %s was already emailed at %s; not sending again", brief.brief_id, brief.email_sent_at)
            return {"sent": False, "reason": "already sent", "brief_id": brief.brief_id,
                    "sent_at": brief.email_sent_at.isoformat()}
        if brief.status == "processing":
            raise RetryLater(f"brief {brief.brief_id} is still being generated", delay=NOT_READY_DELAY)
        if brief.status not in ("completed", "partial"):
            raise PermanentError(f"brief {brief.brief_id} is {brief.status}; nothing to email")
        if brief.sending_token:
            age = (brief.db_now - brief.sending_at).total_seconds() if brief.sending_at else CLAIM_STALE
            if 0 <= age < CLAIM_STALE:
                raise RetryLater(f"brief {brief.brief_id} is being emailed by another run (since {age:.0f}s)",
                                 delay=CLAIM_STALE - age + 1.0)
            log.warning("brief %s: taking over a stale send claim (%s); the earlier sender may have sent it",
                        brief.brief_id, f"{age:.0f}s old" if brief.sending_at else "unreadable")
        token = uuid.uuid4().hex
        await conn.execute(_SQL["claim"], (token, brief.brief_id))
    return _Claim(brief, token)


async def _release(db: Database, claim: _Claim) -> None:
    try:
        async with db.raw() as conn:
            await conn.execute(_SQL["release"], (claim.brief.brief_id, claim.token))
    except Exception as exc:  # the claim goes stale and is taken over then
        log.warning("brief %s: could not release the send claim (%s)", claim.brief.brief_id, exc)


async def _claim_send_record(db: Database, config: EmailConfig, request: EmailRequest, now: datetime
                             ) -> dict[str, Any]:
    claimed = await _claim(db, config, request)
    if isinstance(claimed, dict):
        return claimed
    brief = claimed.brief
    try:
        async with db.raw() as conn:
            brief = await load_sections(conn, brief, config.limits)
        email = build_email(config, brief, now)
        await asyncio.get_running_loop().run_in_executor(
            smtp_threads(), smtp_send, config.smtp, email.wire, config.sender.address, email.to)
    except BaseException as exc:
        await _release(db, claimed)
        raise _classify(exc, config.smtp) from None
    for attempt in range(4):
        try:
            async with db.raw() as conn:
                cur = await conn.execute(
                    _SQL["sent"],
                    (email.message["Message-ID"], email.to, email.level, email.html_bytes, email.size,
                     brief.brief_id, claimed.token),
                )
                recorded = await cur.fetchone() is not None
            break
        except Exception as exc:
            if attempt == 3:
                # Accepted by the server but not recorded: the claim goes stale and a retry sends again.
                raise RetryLater(f"email for brief {brief.brief_id} was sent but could not be recorded: {exc}"
                                 ) from None
            await asyncio.sleep(0.2 * 2**attempt)
    if not recorded:
        log.warning("brief %s: emailed, but the send claim was taken over or the brief was regenerated meanwhile",
                    brief.brief_id)
    log.info("emailed brief %s to user %s (%s, %d bytes, %s)", brief.brief_id, request.user_id,
             email.message["Message-ID"], email.size, email.level)
    return {"sent": True, "brief_id": brief.brief_id, "message_id": email.message["Message-ID"],
            "bytes": email.size, "html_bytes": email.html_bytes, "trim": email.level, "recorded": recorded}


def _classify(exc: BaseException, smtp: SmtpTarget) -> BaseException:
    """An exception from building or sending, as the worker should see it (permanent or retry)."""
    if isinstance(exc, PermanentError | RetryLater | asyncio.CancelledError):
        return exc
    where = f"{smtp.host}:{smtp.port}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        message = f"SMTP server {where} refused the recipient: {_smtp_reply(exc.recipients)}"
        return PermanentError(message) if codes and all(500 <= c < 600 for c in codes) else RetryLater(message)
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        message = f"SMTP server {where} refused: {exc.smtp_code} {_clean(text, 300)}"
        return PermanentError(message) if 500 <= exc.smtp_code < 600 else RetryLater(message)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentError(f"SMTP server {where}: {_clean(str(exc), 300)}")
    if isinstance(exc, TimeoutError | OSError | smtplib.SMTPException):
        return RetryLater(f"could not send email via SMTP {where}: {type(exc).__name__}: {_clean(str(exc), 300)}")
    return exc


def _smtp_reply(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{code} {_clean(msg.decode(errors='replace'), 200)}" for code, msg in recipients.values())


# --------------------------------------------------------------------------- building the message


@dataclass(frozen=True)
class Email:
    message: EmailMessage
    html: str
    text: str
    level: str  # how much was trimmed to fit
    to: str  # the one envelope recipient
    size: int  # bytes on the wire
    wire: bytes  # the message as sent (CRLF line ends): serialised once, measured, checked and sent

    @property
    def html_bytes(self) -> int:
        return len(self.html.encode())


def message_id(brief_id: int, revision: int, user_id: int, brief_date: date, domain: str) -> str:
    return f"<brief-{brief_id}.r{revision}.u{user_id}.{brief_date.isoformat()}@{domain}>"


def wire_bytes(message: EmailMessage) -> bytes:
    """``message`` as smtplib sends it (CRLF line ends)."""
    out = io.BytesIO()
    BytesGenerator(out, policy=message.policy.clone(linesep="\r\n")).flatten(message)
    return out.getvalue()


class _Measured:
    """:func:`fit`'s size: each rendering's whole message on the wire, the last one kept.

    ``fit`` returns the first rendering that fits, which is the last one measured, so the message sent, its
    size and the bytes its headers are checked in are built and serialised once (they were three times: a
    third of an email's CPU at a shared brief time)."""

    def __init__(self, headers: _Headers) -> None:
        self.headers = headers
        self.last: tuple[str, str, EmailMessage, bytes] | None = None

    def __call__(self, html: str, text: str) -> int:
        message = self.headers.message(html, text)
        wire = wire_bytes(message)
        self.last = (html, text, message, wire)
        return len(wire)

    def message(self, html: str, text: str) -> tuple[EmailMessage, bytes]:
        """The message of the rendering ``fit`` chose, and its bytes (built again only if it was not the last)."""
        if self.last is not None and self.last[0] is html and self.last[1] is text:
            return self.last[2], self.last[3]
        message = self.headers.message(html, text)
        return message, wire_bytes(message)


def _section(item: LoadedSection) -> Section:
    """A stored section, tolerant of any JSON shape (what does not fit is left out)."""
    data = item.data if isinstance(item.data, dict) else {}
    raw_name, raw_summary, raw_source = data.get("name"), data.get("summary"), data.get("source")
    name = raw_name if isinstance(raw_name, str) and raw_name else item.name
    groups = []
    raw_groups = data.get("groups")
    for g in raw_groups[:GROUPS_MAX] if isinstance(raw_groups, list) else ():
        if isinstance(g, dict) and isinstance(g.get("items"), list):
            groups.append(Group(str(g.get("heading") or ""), tuple(x for x in g["items"] if isinstance(x, str))))
    note = data.get("note") if isinstance(data.get("note"), str) else None
    summary = raw_summary if isinstance(raw_summary, str) else ""
    if item.data is None and not summary:
        summary = "Details are in the full brief."
    source = raw_source if raw_source in ("llm", "deterministic", "fallback") else "deterministic"
    return Section(project_id=item.project_id, name=name, summary=summary, groups=tuple(groups), source=source,
                   note=note)


_warned: list[bool] = []  # the missing-BRIEFS_PUBLIC_URL warning, once per process


def build_email(config: EmailConfig, brief: LoadedBrief, now: datetime) -> Email:
    """The message for ``brief``; raises :class:`PermanentError` for a recipient that is not one valid address."""
    address = check_recipient(brief.address)
    display = header_text(brief.name, NAME_MAX) or header_text(address.split("@", 1)[0], NAME_MAX)
    stage = render.normal_stage(brief.stage)
    subject = header_text(brief.subject, SUBJECT_MAX) or header_text(
        render.subject(stage, brief.brief_date, display), SUBJECT_MAX)
    unsubscribe_url = _unsubscribe_url(config, brief.user_id, address, now)
    shown = brief.sections[: config.limits.max_sections]
    view = BriefView(
        user_name=display,
        brief_date=brief.brief_date,
        stage=stage,
        subject=subject,
        llm_enabled=brief.llm,
        llm_off_reason=render.BUDGET_NOTICE if brief.over_budget else None,
        executive_summary=brief.summary or "",
        priority_actions=tuple(brief.actions),
        sections=tuple(_section(s) for s in shown),
        status=brief.status,
        summary_source=brief.summary_source,
        catch_up=brief.catch_up,
        omitted=tuple(s.name for s in brief.sections[config.limits.max_sections:]),
        full_url=f"{config.public_url}/briefs/{brief.brief_date.isoformat()}" if config.public_url else None,
        unsubscribe_url=unsubscribe_url,
        extra={"unlisted": max(0, brief.total_sections - len(brief.sections))},
    )
    headers = _Headers(
        subject=subject,
        sender=config.sender.header,
        to=Address(display_name=display, addr_spec=address),
        date=format_datetime(now.astimezone(UTC)),
        message_id=message_id(brief.brief_id, brief.revision, brief.user_id, brief.brief_date, config.sender.domain),
        unsubscribe_url=unsubscribe_url,
        brief=f"{brief.user_id}/{brief.brief_date.isoformat()}",
    )
    measured = _Measured(headers)
    html, text, level = fit(view, [not s.quiet for s in shown], limits=config.limits, size=measured)
    message, wire = measured.message(html, text)
    check_headers(wire, address)
    return Email(message, html, text, level, address, len(wire), wire)


def _unsubscribe_url(config: EmailConfig, user_id: int, address: str, now: datetime) -> str | None:
    """The signed unsubscribe link (None without ``BRIEFS_PUBLIC_URL``: warned about once per process)."""
    base = config.public_url
    if not base and not _warned:
        _warned.append(True)
        log.warning("BRIEFS_PUBLIC_URL is not set: emails carry no unsubscribe link and no List-Unsubscribe header "
                    "(large mail providers expect one-click unsubscribe: set an https BRIEFS_PUBLIC_URL)")
    token = unsubscribe.make_token(config.secret, user_id, address, now=now)
    return unsubscribe.unsubscribe_url(base, token) if base else None


@dataclass(frozen=True)
class _Headers:
    """One brief's message headers, written into each rendering :func:`fit` measures and into the one sent."""

    subject: str
    sender: Address
    to: Address
    date: str
    message_id: str
    unsubscribe_url: str | None
    brief: str  # X-Briefs-Brief: user id / brief date

    def message(self, html: str, text: str) -> EmailMessage:
        msg = EmailMessage(policy=POLICY)
        msg["Subject"] = self.subject
        msg["From"] = self.sender
        msg["To"] = self.to
        msg["Date"] = self.date
        msg["Message-ID"] = self.message_id
        if self.unsubscribe_url:
            msg["List-Unsubscribe"] = f"<{self.unsubscribe_url}>"
            if self.unsubscribe_url.startswith("https://"):
                msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["X-Briefs-Brief"] = self.brief
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
        return msg


def check_headers(wire: bytes, address: str) -> None:
    """Parse the header block of ``wire`` (a message's bytes) back: only our headers, and exactly one ``To``
    address."""
    parsed = BytesHeaderParser(policy=email_policy.default).parsebytes(wire)
    names = {k.lower() for k in parsed}
    unexpected = names - {h.lower() for h in HEADERS}
    to = parsed.get_all("To") or []
    addresses = [a.addr_spec for header in to for a in header.addresses]
    if unexpected or len(to) != 1 or addresses != [address]:
        raise PermanentError(f"refusing to send a message whose headers do not parse back as built "
                             f"(unexpected {sorted(unexpected)}, To {addresses})")


# --------------------------------------------------------------------------- fitting the budget


@dataclass(frozen=True)
class _Group:
    heading: str
    items: tuple[str, ...]
    total: int


@dataclass(frozen=True)
class _Section:
    project_id: int
    name: str
    summary: str
    note: str | None
    source: str
    groups: tuple[_Group, ...]

    def at(self, items: int | None) -> Section:
        """As a render Section with at most ``items`` per list (None: all kept; 0: no lists)."""
        groups: list[Group] = []
        if items != 0:
            for g in self.groups:
                n = len(g.items) if items is None else min(items, len(g.items))
                more = g.total - n
                groups.append(Group(g.heading, (*g.items[:n], *((f"… and {more} more",) if more > 0 else ()))))
        return Section(project_id=self.project_id, name=self.name, summary=self.summary, groups=tuple(groups),
                       source=self.source, note=self.note)


def _prepare(section: Section, limits: Limits) -> _Section:
    text = limits.max_text
    groups = []
    for g in section.groups[:GROUPS_MAX]:
        items = tuple(x for x in (_clean(i, text) for i in g.items[: limits.max_items]) if x)
        total = len(items) + max(0, len(g.items) - limits.max_items)
        groups.append(_Group(_clean(g.heading, 80) or "Items", items, total))
    return _Section(section.project_id, _clean(section.name, text) or f"Project {section.project_id}",
                    _clean(section.summary, text * 4), _clean(section.note, text) or None,
                    section.source, tuple(groups))


def _names(names: Sequence[str], unlisted: int) -> tuple[str, ...]:
    shown = [n for n in (_clean(x, OMITTED_NAME_MAX) for x in names[:MAX_OMITTED_NAMES]) if n]
    more = len(names) - len(shown) + unlisted
    return (*shown, *((f"{more} more",) if more > 0 else ()))


def _weight(view: BriefView) -> int:
    """A lower bound on the characters of both parts: each string appears once in each."""
    chars = sum(len(p) for p in view.extra["paragraphs"]) + sum(len(a) for a in view.priority_actions)
    chars += sum(len(n) for n in view.omitted)
    for s in view.sections:
        chars += len(s.name) + len(s.summary) + len(s.note or "")
        chars += sum(len(g.heading) + sum(len(i) for i in g.items) for g in s.groups)
    return 2 * chars


def _render(view: BriefView) -> tuple[str, str]:
    return render.email_html(view), render.email_text(view)


def fit(
    view: BriefView,
    important: Sequence[bool] | None = None,
    budget: int = EMAIL_BUDGET,
    *,
    limits: Limits = Limits(),
    size: Callable[[str, str], int] | None = None,
) -> tuple[str, str, str]:
    """(html, text, level): the fullest rendering of ``view`` whose ``size(html, text)`` is within ``budget``.

    ``size`` defaults to the UTF-8 bytes of both parts; :func:`build_email` passes the size of the whole
    message on the wire. Every string is cleaned and clipped first, so each step has a bounded size and
    the last step (no sections, a short summary, no actions) fits any budget above a few kilobytes.
    Raises ValueError only for a budget smaller than that.
    """
    measure = size or (lambda h, t: len(h.encode()) + len(t.encode()))
    for level, candidate in _levels(view, important, limits):
        if _weight(candidate) > budget:
            continue  # cannot fit: skip the rendering
        html, text = _render(candidate)
        if measure(html, text) <= budget:
            return html, text, level
    raise ValueError(f"an email budget of {budget} bytes is too small for even the shortest brief")


def _levels(view: BriefView, important: Sequence[bool] | None, limits: Limits) -> Iterator[tuple[str, BriefView]]:
    sections = [_prepare(s, limits) for s in view.sections[: limits.max_sections]]
    unlisted = int(view.extra.get("unlisted") or 0) if isinstance(view.extra, dict) else 0
    extra_names = [s.name for s in view.sections[limits.max_sections:]] + list(view.omitted)
    total = len(sections) + len(extra_names) + unlisted
    paragraphs = tuple(_clean(view.executive_summary, SUMMARY_MAX, lines=True).split("\n\n"))
    paragraphs = tuple(p for p in paragraphs if p)
    actions = tuple(a for a in (_clean(x, limits.max_text) for x in view.priority_actions[:ACTIONS_MAX]) if a)
    base = replace(
        view,
        user_name=header_text(view.user_name, NAME_MAX),
        subject=header_text(view.subject, SUBJECT_MAX),
        executive_summary="\n\n".join(paragraphs),
        priority_actions=actions,
        extra={"paragraphs": paragraphs},
    )

    def make(kept: Sequence[Section], omitted: tuple[str, ...], paras: tuple[str, ...] = paragraphs,
             acts: tuple[str, ...] = actions) -> BriefView:
        return replace(base, sections=tuple(kept), omitted=omitted, priority_actions=acts,
                       executive_summary="\n\n".join(paras), extra={"paragraphs": paras})

    for level, items in (("full", None), ("5 items", 5), ("2 items", 2), ("summaries", 0)):
        yield level, make([s.at(items) for s in sections], _names(extra_names, unlisted))

    # Keep the projects that need attention first (in brief order), name the rest.
    flags = list(important) if important is not None and len(important) >= len(sections) else []
    flags = flags[: len(sections)] or [True] * len(sections)
    order = [i for i, f in enumerate(flags) if f] + [i for i, f in enumerate(flags) if not f]
    keep = len(order)
    while keep > 0:
        keep //= 2
        chosen = set(order[:keep])
        kept = [s.at(0) for i, s in enumerate(sections) if i in chosen]
        rest = [s.name for i, s in enumerate(sections) if i not in chosen] + extra_names
        yield f"{keep} of {total} projects", make(kept, _names(rest, unlisted))

    # Even the bare brief is too big: a count instead of names, then a shorter summary and fewer actions.
    count = (f"{total} projects",) if total else ()
    yield "0 projects, summary", make([], count)
    for chars, n_actions in ((5_000, 10), (1_000, 5), (300, 3)):
        short = _clean("\n\n".join(paragraphs), chars, lines=True)
        yield f"summary cut to {chars} characters", make([], count, tuple(p for p in short.split("\n\n") if p),
                                                          actions[:n_actions])
    yield "minimal", make([], count, (), ())
