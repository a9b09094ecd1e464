"""What the CLI asks of briefs: queue briefs now, print a stored brief, report LLM health.

Queueing goes through the caller's ``enqueue`` hook (the same hook type the
generator uses for its follow-up jobs): ``briefs`` does not import ``worker``,
the CLI passes ``worker.queue``'s bulk insert.

Every stored value is treated as hostile: a user's timezone may be any text (a
bad one skips that user with a reason, never the whole ``--all`` run), and
metadata read for the LLM health report is type-checked in SQL before it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from psycopg.rows import namedtuple_row

from briefs.contract import (
    BRIEF_JOB,
    MAX_TIMEZONE_CHARS,
    STANDARD,
    BriefRequest,
    InvalidTimezone,
    brief_dedup_key,
    check_brief_date,
    load_timezone,
)
from briefs.db import Database
from briefs.errors import PermanentError
from briefs.generator import Conn, EnqueueHook, FollowUp

MANUAL_PRIORITY = 10  # a brief someone asked for by hand runs ahead of scheduled ones (50)
ALL_BATCH = 1000
DATE_PAST_DAYS = 7  # `briefs enqueue --date` accepts the user's today - 7 days …
DATE_FUTURE_DAYS = 1  # … through tomorrow, unless forced


class BadRequest(PermanentError):
    """A request that cannot be honoured as given (the message says what to change)."""


class NotFound(PermanentError):
    """What was asked for does not exist (the message says what does)."""


def _manual_job(user_id: int, day: date, now: datetime, *, force: bool, resend_email: bool = False) -> FollowUp:
    request = BriefRequest(
        user_id,
        day,
        now.astimezone(UTC),
        STANDARD,
        email=False,
        catch_up=False,
        force=force,
        resend_email=resend_email and force,
    )
    return FollowUp(
        job_type=BRIEF_JOB,
        payload=request.to_payload(),
        dedup_key=request.dedup_key,
        user_id=user_id,
        run_at=None,
        notify_at=request.notify_at,
        priority=MANUAL_PRIORITY,
    )


@dataclass(frozen=True)
class BriefQueued:
    """What :func:`queue_brief` did: exactly one of ``job_id`` (queued), ``existing_status`` (the brief is
    already finished and ``force`` was not given) or ``duplicate`` (a brief job for that date is already
    pending or running: ``live_job_id``/``live_job_status``, None when it finished meanwhile) is set."""

    user_id: int
    brief_date: date
    force: bool = False
    resend_email: bool = False
    job_id: int | None = None
    existing_status: str | None = None
    duplicate: bool = False
    live_job_id: int | None = None
    live_job_status: str | None = None

    def line(self) -> str:
        """The CLI's line for humans."""
        what = f"user {self.user_id}, brief date {self.brief_date.isoformat()}"
        if self.existing_status is not None:
            return f"the brief for {what} is already {self.existing_status}; pass --force to regenerate it"
        if self.duplicate:
            live = (f"job {self.live_job_id}, {self.live_job_status}" if self.live_job_id is not None
                    else "job finished meanwhile; try again")
            return f"a brief job for {what} is already pending ({live})"
        resent = self.force and self.resend_email
        note = " (forced; the email is sent again)" if resent else " (forced)" if self.force else ""
        return f"queued job {self.job_id} for {what}{note}"


async def queue_brief(
    db: Database,
    settings: Any,
    user_id: int,
    brief_date: date | None,
    *,
    force: bool,
    enqueue: EnqueueHook,
    now: datetime | None = None,
    resend_email: bool = False,
) -> BriefQueued:
    """Queue one brief to run now; says what happened (:class:`BriefQueued`).

    Unknown user → :class:`NotFound`. Without ``force`` the brief date must lie between the
    user's today - ``DATE_PAST_DAYS`` and tomorrow (:class:`BadRequest` otherwise): a date
    far back or ahead has no meaningful "done in the last 24 hours". ``resend_email`` (with
    ``force``) mails the regenerated brief even if that date's email was already sent.
    """
    now = now or datetime.now(UTC)
    async with db.raw() as conn:
        day = await _brief_day(conn, user_id, brief_date, now, force=force)
        base = BriefQueued(user_id, day, force=force, resend_email=resend_email)
        if not force:
            status = await _finished_status(conn, user_id, day)
            if status is not None:
                return replace(base, existing_status=status)
        [new_id] = await enqueue(conn, [_manual_job(user_id, day, now, force=force, resend_email=resend_email)])
        if new_id is None:
            live = await _live_job(conn, user_id, day)
            return replace(base, duplicate=True, live_job_id=live[0] if live else None,
                           live_job_status=live[1] if live else None)
    return replace(base, job_id=new_id)


async def _brief_day(conn: Conn, user_id: int, brief_date: date | None, now: datetime, *, force: bool) -> date:
    """The date to queue (``brief_date``, else the user's today), checked as :func:`queue_brief` says."""
    cur = await conn.execute(
        "SELECT left(timezone, %s) AS timezone, length(timezone) AS timezone_length FROM users WHERE id = %s",
        (MAX_TIMEZONE_CHARS + 1, user_id),
    )
    cur.row_factory = namedtuple_row
    user = await cur.fetchone()
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    if brief_date is not None and force:
        return _coverable(user_id, brief_date)
    try:
        today = _local_today(user.timezone, user.timezone_length, now)
    except InvalidTimezone as exc:
        raise BadRequest(
            f"user {user_id}'s timezone is unusable ({exc}): fix users.timezone, or pass --date with --force"
        ) from None
    day = _coverable(user_id, brief_date or today)
    if not force and not today - timedelta(days=DATE_PAST_DAYS) <= day <= today + timedelta(days=DATE_FUTURE_DAYS):
        raise BadRequest(
            f"brief date {day.isoformat()} is outside {today - timedelta(days=DATE_PAST_DAYS)} .. "
            f"{today + timedelta(days=DATE_FUTURE_DAYS)} (user {user_id}'s today - {DATE_PAST_DAYS} days .. "
            "tomorrow); pass --force to queue it anyway"
        )
    return day


def _local_today(timezone: Any, length: int | None, now: datetime) -> date:
    """The date it is at ``now`` in a stored timezone (clipped to ``length`` characters); else InvalidTimezone."""
    return now.astimezone(load_timezone(timezone, length=length)).date()


def _coverable(user_id: int, day: date) -> date:
    """``day``, if a brief can cover it; else :class:`BadRequest`."""
    try:
        check_brief_date(day)
    except PermanentError as exc:
        raise BadRequest(f"user {user_id}: {exc}") from None
    return day


async def _finished_status(conn: Conn, user_id: int, day: date) -> str | None:
    """The brief's status when it is finished (``completed`` or ``partial``), else None."""
    cur = await conn.execute("SELECT status FROM daily_briefs WHERE user_id = %s AND brief_date = %s", (user_id, day))
    cur.row_factory = namedtuple_row
    brief = await cur.fetchone()
    return brief.status if brief is not None and brief.status in ("completed", "partial") else None


async def _live_job(conn: Conn, user_id: int, day: date) -> tuple[int, str] | None:
    """(id, status) of the brief job that holds the date's dedup key (the one the new job collided with)."""
    cur = await conn.execute(
        """SELECT id, status FROM queue_jobs
           WHERE dedup_key = %s AND status IN ('pending', 'processing') ORDER BY id DESC LIMIT 1""",
        (brief_dedup_key(user_id, day),),
    )
    cur.row_factory = namedtuple_row
    live = await cur.fetchone()
    return (int(live.id), str(live.status)) if live else None


@dataclass
class EnqueueAllReport:
    queued: int = 0
    already: int = 0  # already queued, or finished (without force)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (user_id, reason)

    def summary(self, shown: int = 20) -> str:
        lines = [f"queued {self.queued} brief job(s); {self.already} already queued or finished"]
        if self.skipped:
            lines[0] += f"; skipped {len(self.skipped)} user(s)"
            lines += [f"  user {uid}: {reason}" for uid, reason in self.skipped[:shown]]
            if len(self.skipped) > shown:
                lines.append(f"  … and {len(self.skipped) - shown} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "already": self.already,
            "skipped": [{"user_id": uid, "reason": reason} for uid, reason in self.skipped],
        }


async def enqueue_all(
    db: Database,
    *,
    force: bool,
    enqueue: EnqueueHook,
    now: datetime | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EnqueueAllReport:
    """Queue today's brief (each user's local today) for every user with an active preference.

    Works in keyset batches of 1,000 users, one bulk insert each. Without ``force``
    users whose brief for that date is already finished are left out. A user whose
    timezone is unusable is skipped with the reason; the others are queued.
    """
    now = now or datetime.now(UTC)
    async with db.raw() as conn:
        cur = await conn.execute("SELECT count(*) AS active FROM brief_preferences WHERE is_active")
        cur.row_factory = namedtuple_row
        counted = await cur.fetchone()
        total = counted.active if counted is not None else 0
    report = EnqueueAllReport()
    seen = 0
    after = 0
    while True:
        async with db.raw() as conn:
            users = await _active_users(conn, after)
            if not users:
                break
            after = users[-1].id
            days = _local_todays(users, now, report)
            await _enqueue_todays(conn, days, now, force=force, enqueue=enqueue, report=report)
        seen += len(users)
        if on_progress:
            on_progress(seen, max(total, seen))
    return report


async def _active_users(conn: Conn, after: int) -> list[Any]:
    """The next batch of users with an active preference (ids above ``after``), with their timezones."""
    cur = await conn.execute(
        """SELECT u.id, left(u.timezone, %(zmax)s) AS timezone, length(u.timezone) AS timezone_length
           FROM brief_preferences p JOIN users u ON u.id = p.user_id
           WHERE p.is_active AND p.user_id > %(after)s AND u.id > %(after)s
           ORDER BY p.user_id LIMIT %(batch)s""",
        {"after": after, "batch": ALL_BATCH, "zmax": MAX_TIMEZONE_CHARS + 1},
    )
    cur.row_factory = namedtuple_row
    return await cur.fetchall()


def _local_todays(users: list[Any], now: datetime, report: EnqueueAllReport) -> dict[int, date]:
    """Each user's local today; a user whose timezone is unusable is skipped in ``report``."""
    days: dict[int, date] = {}
    for user in users:
        try:
            days[user.id] = _local_today(user.timezone, user.timezone_length, now)
        except InvalidTimezone as exc:
            report.skipped.append((user.id, str(exc)))
    return days


async def _enqueue_todays(
    conn: Conn, days: dict[int, date], now: datetime, *, force: bool, enqueue: EnqueueHook, report: EnqueueAllReport
) -> None:
    """Queue the brief of each user's date (without ``force``, not the finished ones); counted in ``report``."""
    finished: set[int] = set()
    if not force and days:
        cur = await conn.execute(
            """SELECT b.user_id FROM daily_briefs b
               JOIN unnest(%s::bigint[], %s::date[]) AS t(user_id, brief_date)
                 ON b.user_id = t.user_id AND b.brief_date = t.brief_date
               WHERE b.status IN ('completed', 'partial')""",
            (list(days), list(days.values())),
        )
        cur.row_factory = namedtuple_row
        finished = {brief.user_id for brief in await cur.fetchall()}
    report.already += len(finished)
    jobs = [_manual_job(uid, day, now, force=force) for uid, day in days.items() if uid not in finished]
    ids = await enqueue(conn, jobs) if jobs else []
    new = sum(1 for i in ids if i is not None)
    report.queued += new
    report.already += len(jobs) - new


async def load_brief_markdown(db: Database, user_id: int, brief_date: date | None) -> str | None:
    """The stored Markdown of a finished brief (the latest when no date is given), or None."""
    async with db.raw() as conn:
        if brief_date is None:
            cur = await conn.execute(
                """SELECT summary_markdown FROM daily_briefs
                   WHERE user_id = %s AND summary_markdown IS NOT NULL
                   ORDER BY brief_date DESC LIMIT 1""",
                (user_id,),
            )
        else:
            cur = await conn.execute(
                "SELECT summary_markdown FROM daily_briefs WHERE user_id = %s AND brief_date = %s",
                (user_id, brief_date),
            )
        cur.row_factory = namedtuple_row
        brief = await cur.fetchone()
    return brief.summary_markdown if brief is not None else None


async def show_brief(db: Database, user_id: int, brief_date: date | None) -> str:
    """The brief's Markdown, or :class:`NotFound` saying whether the user exists and what they have."""
    text = await load_brief_markdown(db, user_id, brief_date)
    if text is not None:
        return text
    async with db.raw() as conn:
        cur = await conn.execute(
            """SELECT u.id, (SELECT max(brief_date)::text FROM daily_briefs b  -- text: 'infinity' is a date too
                             WHERE b.user_id = u.id AND b.summary_markdown IS NOT NULL) AS latest
               FROM users u WHERE u.id = %s""",
            (user_id,),
        )
        cur.row_factory = namedtuple_row
        user = await cur.fetchone()
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    latest = user.latest
    if latest is None:
        raise NotFound(f"user {user_id} has no brief yet; queue one with `briefs enqueue {user_id}`")
    raise NotFound(f"user {user_id} has no brief for {brief_date}; the latest is {latest} (`briefs show {user_id}`)")


# --------------------------------------------------------------------------- LLM health (`briefs status`)

LLM_WINDOW = timedelta(hours=1)
ERROR_HINTS = {
    "auth": "check OPENAI_API_KEY",
    "quota": "the account is out of quota or credit: check billing with the provider",
    "rate_limit": "rate limited: lower BRIEFS_LLM_RPM or BRIEFS_LLM_CONCURRENCY",
    "server": "the provider is failing (5xx); calls are retried, nothing to change here",
    "timeout": "calls time out: check OPENAI_BASE_URL, or raise BRIEFS_LLM_TIMEOUT",
    "connection": "cannot reach the LLM: check OPENAI_BASE_URL and the network",
    "malformed": "the model's replies do not fit the expected shape: check BRIEFS_MODEL",
    "rejected": "the provider refused the request: check BRIEFS_MODEL and the prompt limits",
    "disabled": "no OPENAI_API_KEY: briefs are deterministic",
    "circuit_open": "the LLM circuit is open (the provider kept failing): no calls until it probes again; "
                    "see `briefs status`, and `briefs llm reset` once the cause is fixed",
}

# Everything read from metadata is checked in SQL (jsonb_typeof) and cut (left()): a row
# with a string where a number belongs, or a megabyte of error text, cannot break the report.
_LLM_HEALTH_SQL = """
WITH b AS (
    SELECT id, user_id, completed_at, metadata AS m
    FROM daily_briefs
    WHERE completed_at >= %(since)s AND completed_at <= %(now)s AND status IN ('completed', 'partial', 'failed')
),
errs AS (
    SELECT b.completed_at AS at, b.user_id, left(b.m ->> 'summary_error_kind', 40) AS kind,
           left(b.m ->> 'summary_error', 500) AS error, NULL::text AS http_status, 'summary' AS part
    FROM b WHERE b.m ->> 'summary_source' = 'fallback'
    UNION ALL
    SELECT b.completed_at, b.user_id, left(p.metadata ->> 'error_kind', 40),
           left(coalesce(p.metadata ->> 'error', p.error), 500), left(p.metadata ->> 'http_status', 10), 'project'
    FROM b JOIN project_daily_briefs p ON p.daily_brief_id = b.id
    WHERE p.metadata ->> 'source' = 'fallback'
)
SELECT
    (SELECT count(*) FROM b) AS briefs,
    (SELECT count(*) FROM b WHERE b.m ->> 'llm' = 'enabled') AS llm_briefs,
    (SELECT count(*) FROM b WHERE b.m ->> 'llm' = 'disabled') AS llm_disabled,
    (SELECT coalesce(sum(CASE WHEN jsonb_typeof(b.m -> 'llm_requests') = 'number'
                             THEN least(greatest((b.m ->> 'llm_requests')::numeric, 0), 1e9) END), 0)
     FROM b) AS requests,
    (SELECT coalesce(sum(CASE WHEN jsonb_typeof(b.m -> 'llm_failures') = 'number'
                             THEN least(greatest((b.m ->> 'llm_failures')::numeric, 0), 1e9) END), 0)
     FROM b) AS failures,
    (SELECT count(*) FROM b
     WHERE b.m ->> 'summary_source' = 'fallback'
        OR EXISTS (SELECT 1 FROM project_daily_briefs p
                   WHERE p.daily_brief_id = b.id AND p.metadata ->> 'source' = 'fallback')) AS fell_back,
    (SELECT coalesce(jsonb_object_agg(kind, n), '{}'::jsonb)
     FROM (SELECT coalesce(kind, 'unknown') AS kind, count(*) AS n FROM errs
           WHERE kind IS DISTINCT FROM 'disabled' GROUP BY 1) k) AS by_kind,
    (SELECT to_jsonb(e) FROM (SELECT at, user_id, kind, error, http_status, part FROM errs
                               WHERE kind IS DISTINCT FROM 'disabled'
                               ORDER BY at DESC, (http_status IS NOT NULL) DESC LIMIT 1) e) AS last_error
"""


async def llm_health(db: Database, now: datetime | None = None, window: timedelta = LLM_WINDOW) -> dict[str, Any]:
    """LLM health over the briefs finished in the last ``window``: calls, errors by kind, the
    last error with its hint, and the share of briefs that fell back to deterministic text.

    A wrong API key shows here (every call a 401, every brief a fallback) even though the
    briefs come out ``partial`` and their jobs ``completed``.
    """
    now = now or datetime.now(UTC)
    async with db.raw() as conn:
        cur = await conn.execute(_LLM_HEALTH_SQL, {"since": now - window, "now": now})
        row = await cur.fetchone()
    assert row is not None
    briefs, llm_briefs, disabled, requests, failures, fell_back, by_kind, last = row
    last_error = None
    if last:
        kind = last.get("kind") or "unknown"
        status = last.get("http_status")
        hint = ERROR_HINTS.get(kind, "see project_daily_briefs.error")
        last_error = {
            "at": last.get("at"),
            "user_id": last.get("user_id"),
            "part": last.get("part"),
            "kind": kind,
            "http_status": int(status) if isinstance(status, str) and status.isdigit() else None,
            "error": last.get("error"),
            "hint": f"{status if isinstance(status, str) and status.isdigit() else kind}: {hint}",
        }
    return {
        "window_seconds": int(window.total_seconds()),
        "briefs": int(briefs),
        "llm_enabled_briefs": int(llm_briefs),
        "llm_disabled_briefs": int(disabled),
        "calls": int(requests),
        "failed_calls": int(failures),
        "errors_by_kind": {str(k): int(v) for k, v in sorted(by_kind.items())},
        "fell_back": int(fell_back),
        "fell_back_share": round(fell_back / briefs, 3) if briefs else None,
        "last_error": last_error,
    }


# Today's and this month's LLM use (UTC), over the briefs finished in each: one scan of the month's rows
# through daily_briefs_completed. A brief with tokens but no cost had a model without a price: unknown.
_LLM_COST_SQL = """
SELECT count(*) FILTER (WHERE today) AS day_briefs,
       coalesce(sum(prompt_tokens) FILTER (WHERE today), 0)::bigint AS day_prompt,
       coalesce(sum(completion_tokens) FILTER (WHERE today), 0)::bigint AS day_completion,
       coalesce(sum(cost) FILTER (WHERE today), 0)::float8 AS day_cost,
       count(*) FILTER (WHERE today AND unpriced) AS day_unpriced,
       count(*) AS month_briefs,
       coalesce(sum(prompt_tokens), 0)::bigint AS month_prompt,
       coalesce(sum(completion_tokens), 0)::bigint AS month_completion,
       coalesce(sum(cost), 0)::float8 AS month_cost,
       count(*) FILTER (WHERE unpriced) AS month_unpriced
FROM (SELECT prompt_tokens, completion_tokens, cost, completed_at >= %(day)s AS today,
             cost IS NULL AND prompt_tokens + completion_tokens > 0 AS unpriced
      FROM daily_briefs
      WHERE completed_at >= %(month)s AND completed_at < %(end)s AND completed_at IS NOT NULL) AS finished
"""


async def llm_cost(db: Database, settings: Any, now: datetime | None = None) -> dict[str, Any]:
    """Today's and this month's (UTC) LLM tokens and cost, with the daily budget and what is left of it.

    ``cost`` is None ("unknown") when some brief's tokens had no price (``BRIEFS_LLM_PRICES``);
    ``priced_cost`` is then the part that had one, and what the budget is counted against."""
    async with db.raw() as conn:
        return await llm_cost_on(conn, settings, now)


async def llm_cost_on(conn: Conn, settings: Any, now: datetime | None = None) -> dict[str, Any]:
    """:func:`llm_cost` on the caller's connection."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    cur = await conn.execute(_LLM_COST_SQL, {"day": day, "month": month, "end": day + timedelta(days=1)})
    cur.row_factory = namedtuple_row
    row = await cur.fetchone()
    assert row is not None
    budget = settings.llm_daily_budget
    today = _cost_part(row.day_briefs, row.day_prompt, row.day_completion, row.day_cost, row.day_unpriced)
    today["remaining"] = None if budget is None else round(max(budget - row.day_cost, 0.0), 6)
    today["budget_reached"] = budget is not None and row.day_cost >= budget
    return {
        "currency": settings.llm_currency,
        "daily_budget": budget,
        "today": {"day": day.date().isoformat(), **today},
        "month": {"month": month.strftime("%Y-%m"),
                  **_cost_part(row.month_briefs, row.month_prompt, row.month_completion, row.month_cost,
                               row.month_unpriced)},
    }


def _cost_part(briefs: int, prompt: int, completion: int, cost: float, unpriced: int) -> dict[str, Any]:
    return {
        "briefs": int(briefs),
        "prompt_tokens": int(prompt),
        "completion_tokens": int(completion),
        "cost": None if unpriced else round(cost, 6),
        "priced_cost": round(cost, 6),
        "unpriced_briefs": int(unpriced),
    }
