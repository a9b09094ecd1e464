"""The read side of the console and the API: jobs, users, preferences and briefs, page by page.

Every list is keyset-paginated (never OFFSET): jobs newest first by id, users by id, a user's briefs
newest first by date. A page's ``next_cursor`` is opaque to clients (base64url of the last key) and
None at the end; a row inserted meanwhile never shifts or repeats a page.

Every stored value is hostile: an instant Python cannot hold (``infinity``, past year 9999) comes back
as its text, never an exception; JSON too deep or too big for Python comes back as text or is left out;
long texts are cut in SQL. An id outside PostgreSQL's bigint finds nothing (None), never an error.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from psycopg.rows import dict_row

from briefs.contract import MAX_TIMEZONE_CHARS, InvalidTimezone, load_timezone
from briefs.db import Database
from briefs.engagement import EMPTY_HISTORY, decide, inactive_days

BIGINT_MIN = -(2**63)
BIGINT_MAX = 2**63 - 1
MAX_LIMIT = 200
DEFAULT_LIMIT = 50
JOB_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")
TEXT_MAX = 2000  # job_type, dedup_key, locked_by, names … as listed
ERROR_MAX = 8000  # last_error and brief errors, shown whole up to this
JSON_MAX = 1_000_000  # bytes of one JSON value (payload, result, progress) sent at all
MARKDOWN_MAX = 200_000  # of a section's Markdown

# An instant Python holds: 0001-01-03 .. 9999-12-29 (a margin for any timezone's offset).
_HELD = "BETWEEN '0001-01-03 00:00+00' AND '9999-12-29 00:00+00'"


class BadCursor(ValueError):
    """A cursor this API did not hand out (or one that was altered)."""


@dataclass
class Page:
    items: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


def encode_cursor(key: object) -> str:
    return base64.urlsafe_b64encode(str(key).encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str | None) -> str | None:
    """The key a cursor carries (None for no cursor); :class:`BadCursor` for anything else."""
    if cursor is None or cursor == "":
        return None
    if len(cursor) > 200:
        raise BadCursor("cursor is too long to be one this API gave")
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise BadCursor("cursor is not one this API gave (pass next_cursor back unchanged)") from None


def _id_cursor(cursor: str | None) -> int | None:
    key = decode_cursor(cursor)
    if key is None:
        return None
    if not key.lstrip("-").isdigit() or not BIGINT_MIN <= int(key) <= BIGINT_MAX:
        raise BadCursor("cursor is not one this API gave (pass next_cursor back unchanged)")
    return int(key)


def _date_cursor(cursor: str | None) -> str | None:
    key = decode_cursor(cursor)
    if key is None:
        return None
    try:
        date.fromisoformat(key)
    except ValueError:
        if key not in ("infinity", "-infinity"):
            raise BadCursor("cursor is not one this API gave (pass next_cursor back unchanged)") from None
    return key


def is_bigint(value: int) -> bool:
    return BIGINT_MIN <= value <= BIGINT_MAX


def clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_LIMIT))


def instant(column: str, name: str | None = None) -> str:
    """SQL selecting ``column`` as ``name`` when Python can hold it, else as ``name__text`` (merged by
    :func:`merge_instants`). ``column`` is always a constant of this module, never input."""
    name = name or column.rsplit(".", 1)[-1]
    return (f"CASE WHEN {column} {_HELD} THEN {column} END AS {name}, "
            f"CASE WHEN NOT ({column} {_HELD}) THEN {column}::text END AS {name}__text")


def merge_instants(row: dict[str, Any]) -> dict[str, Any]:
    """Fold every ``x__text`` column into ``x``: the datetime, else the text PostgreSQL gave."""
    for key in [k for k in row if k.endswith("__text")]:
        text = row.pop(key)
        base = key[: -len("__text")]
        if row.get(base) is None:
            row[base] = text
    return row


def load_json(text: Any) -> Any:
    """JSON text from the database as Python values; text too deep for Python stays text."""
    if text is None or not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _json(column: str, name: str) -> str:
    return f"CASE WHEN octet_length({column}::text) <= {JSON_MAX} THEN {column}::text END AS {name}"


async def _fetch(
    db: Database, sql: str, params: dict[str, Any], *, prepare: bool | None = None
) -> list[dict[str, Any]]:
    """Rows as dicts. ``prepare=False`` plans every execution for its own parameters: a statement psycopg
    prepares (its fifth execution) may get PostgreSQL's generic plan, which cannot use a LIKE prefix index
    for a pattern it does not know (the user search then read the table: 95 ms instead of 2 ms)."""
    async with db.raw() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params, prepare=prepare)
        rows = await cur.fetchall()
    return [merge_instants(dict(row)) for row in rows]


def _page(rows: list[dict[str, Any]], limit: int, key: str) -> Page:
    if len(rows) > limit:
        rows = rows[:limit]
        return Page(rows, encode_cursor(rows[-1][key]))
    return Page(rows, None)


# --------------------------------------------------------------------------- jobs

_JOB_LIST = f"""
SELECT id, left(job_type, {TEXT_MAX}) AS job_type, status, priority, attempts, max_attempts,
       {instant("run_at")}, user_id, left(dedup_key, {TEXT_MAX}) AS dedup_key,
       left(locked_by, {TEXT_MAX}) AS locked_by, left(last_error, 500) AS last_error,
       {instant("started_at")}, {instant("finished_at")}, {instant("created_at")}, {instant("updated_at")}
FROM queue_jobs
WHERE (%(before)s::bigint IS NULL OR id < %(before)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(type)s::text IS NULL OR job_type = %(type)s)
  AND (%(user)s::bigint IS NULL OR user_id = %(user)s)
ORDER BY id DESC
LIMIT %(limit)s
"""

_JOB = f"""
SELECT id, left(job_type, {TEXT_MAX}) AS job_type, status, priority, attempts, max_attempts,
       {instant("run_at")}, user_id, left(dedup_key, {TEXT_MAX}) AS dedup_key, {instant("notify_at")},
       left(locked_by, {TEXT_MAX}) AS locked_by, {instant("lease_expires_at")}, {instant("heartbeat_at")},
       {instant("started_at")}, {instant("finished_at")}, left(last_error, {ERROR_MAX}) AS last_error,
       {_json("payload", "payload")}, octet_length(payload::text) AS payload_bytes,
       {_json("result", "result")}, octet_length(result::text) AS result_bytes,
       {_json("progress", "progress")}, octet_length(progress::text) AS progress_bytes,
       {instant("created_at")}, {instant("updated_at")}
FROM queue_jobs
WHERE id = %(id)s
"""


async def list_jobs(
    db: Database,
    *,
    status: str | None = None,
    job_type: str | None = None,
    user_id: int | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page:
    """Jobs newest first (by id), filtered; :class:`BadCursor` for a cursor this API did not give."""
    limit = clamp_limit(limit)
    before = _id_cursor(cursor)
    if user_id is not None and not is_bigint(user_id):
        return Page()
    params = {"before": before, "status": status, "type": job_type, "user": user_id, "limit": limit + 1}
    return _page(await _fetch(db, _JOB_LIST, params), limit, "id")


async def get_job(db: Database, job_id: int) -> dict[str, Any] | None:
    """Everything in one job's row (payload, result and progress as JSON values), or None."""
    if not is_bigint(job_id):
        return None
    rows = await _fetch(db, _JOB, {"id": job_id})
    if not rows:
        return None
    job = rows[0]
    for name in ("payload", "result", "progress"):
        job[name] = load_json(job[name])
        if job[name] is None and job[f"{name}_bytes"] is not None:
            job[name] = f"({job[f'{name}_bytes']:,} bytes of JSON: too big to show)"
    return job


# --------------------------------------------------------------------------- users

_PREFERENCE_COLUMNS = f"""p.frequency, p.day_of_week, p.time_of_day, p.is_active, p.email_enabled,
       {instant("p.updated_at", "preference_updated_at")}"""

_USER_COLUMNS = f"""u.id, left(u.email, {TEXT_MAX}) AS email, left(u.name, {TEXT_MAX}) AS name,
       left(u.timezone, {MAX_TIMEZONE_CHARS + 1}) AS timezone, length(u.timezone) AS timezone_length,
       {instant("u.last_visit_at", "last_visit_at")}, {instant("u.created_at", "created_at")},
       p.user_id IS NOT NULL AS has_preference, {_PREFERENCE_COLUMNS}"""

_USER_LIST = f"""
SELECT {_USER_COLUMNS}
FROM users u LEFT JOIN brief_preferences p ON p.user_id = u.id
WHERE (%(after)s::bigint IS NULL OR u.id > %(after)s)
  AND (%(pattern)s::text IS NULL OR u.id = %(id)s
       OR (left(lower(u.email), 200) LIKE lower(%(head)s) ESCAPE '\\'
           AND lower(u.email) LIKE lower(%(pattern)s) ESCAPE '\\')
       OR (left(lower(u.name), 200) LIKE lower(%(head)s) ESCAPE '\\'
           AND lower(u.name) LIKE lower(%(pattern)s) ESCAPE '\\'))
ORDER BY u.id
LIMIT %(limit)s
"""

_USER = f"""
SELECT {_USER_COLUMNS},
       b.brief_date::text AS latest_brief_date, b.status AS latest_brief_status,
       left(b.engagement_stage, 40) AS latest_brief_stage
FROM users u LEFT JOIN brief_preferences p ON p.user_id = u.id
LEFT JOIN LATERAL (SELECT brief_date, status, engagement_stage FROM daily_briefs
                   WHERE user_id = u.id ORDER BY brief_date DESC LIMIT 1) b ON true
WHERE u.id = %(id)s
"""


SEARCH_HEAD_CHARS = 150  # of a search, matched through the indexes of the first 200 characters


def like_prefix(text: str) -> str:
    """A LIKE pattern matching values that start with ``text`` (its wildcards escaped)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _user(row: dict[str, Any]) -> dict[str, Any]:
    """A user's row as the API shows it: the preference apart (None without one)."""
    pref_keys = ("frequency", "day_of_week", "time_of_day", "is_active", "email_enabled", "preference_updated_at")
    preference = {k.replace("preference_", ""): row.pop(k) for k in pref_keys}
    row["preference"] = preference if row.pop("has_preference") else None
    length = row.pop("timezone_length")
    if length is not None and length > MAX_TIMEZONE_CHARS:
        row["timezone"] = f"{row['timezone'][:MAX_TIMEZONE_CHARS]}… ({length} characters)"
    return row


async def list_users(
    db: Database, *, query: str | None = None, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> Page:
    """Users by id: all, or those whose id is ``query`` or whose email or name starts with it (any case)."""
    limit = clamp_limit(limit)
    after = _id_cursor(cursor)
    query = query.strip() if query else None
    wanted = int(query) if query and query.isdigit() and len(query) < 20 and is_bigint(int(query)) else None
    # `head`: the pattern of the query's first characters, which the prefix indexes (sql/0007: the first 200
    # characters of lower(email) and lower(name)) can answer; `pattern` then checks the whole query.
    params = {"after": after, "pattern": like_prefix(query) if query else None,
              "head": like_prefix(query[:SEARCH_HEAD_CHARS]) if query else None, "id": wanted, "limit": limit + 1}
    page = _page(await _fetch(db, _USER_LIST, params, prepare=False if query else None), limit, "id")
    page.items = [_user(row) for row in page.items]
    return page


async def user_exists(db: Database, user_id: int) -> bool:
    if not is_bigint(user_id):
        return False
    return bool(await _fetch(db, "SELECT 1 AS one FROM users WHERE id = %(id)s", {"id": user_id}))


async def get_user(db: Database, user_id: int, now: datetime | None = None) -> dict[str, Any] | None:
    """One user with their preference, latest brief and engagement (see :func:`engagement_of`), or None."""
    if not is_bigint(user_id):
        return None
    rows = await _fetch(db, _USER, {"id": user_id})
    if not rows:
        return None
    row = rows[0]
    latest = {k: row.pop(f"latest_brief_{k}") for k in ("date", "status", "stage")}
    user = _user(row)
    user["latest_brief"] = latest if latest["date"] is not None else None
    user["engagement"] = engagement_of(user, latest["stage"], now or datetime.now(UTC))
    return user


def engagement_of(user: dict[str, Any], latest_stage: str | None, now: datetime) -> dict[str, Any]:
    """Where the user stands: the stage of their latest brief (what they last got), the whole local days
    since their last visit, and the stage the rules give for today's brief before history is considered
    (``tier``: the stage they would get if it was not sent yet in this absence; the scheduler may skip)."""
    visit = user.get("last_visit_at")
    out: dict[str, Any] = {"latest_brief_stage": latest_stage, "inactive_days": None, "tier": None, "reason": None}
    try:
        tz = load_timezone(user.get("timezone"))
    except InvalidTimezone as exc:
        out["reason"] = str(exc)
        return out
    if visit is not None and not isinstance(visit, datetime):
        out["reason"] = f"last visit {str(visit)[:40]} is not an instant the rules can use"
        return out
    today = now.astimezone(tz).date()
    out["inactive_days"] = inactive_days(visit, today, tz)
    out["tier"] = decide(visit, EMPTY_HISTORY, today, tz=tz).stage
    return out


# --------------------------------------------------------------------------- briefs

_BRIEF_LIST = f"""
SELECT brief_date::text AS brief_date, status, left(subject, 500) AS subject,
       left(engagement_stage, 40) AS engagement_stage, prompt_tokens, completion_tokens,
       {instant("completed_at")}, {instant("email_sent_at")}
FROM daily_briefs
WHERE user_id = %(user)s AND (%(before)s::date IS NULL OR brief_date < %(before)s::date)
ORDER BY brief_date DESC
LIMIT %(limit)s
"""

_BRIEF = f"""
SELECT id, brief_date::text AS brief_date, status, left(subject, 2000) AS subject,
       left(executive_summary, 20000) AS executive_summary, left(engagement_stage, 40) AS engagement_stage,
       {_json("progress", "progress")}, {_json("priority_actions", "priority_actions")},
       left(error, {ERROR_MAX}) AS error, left(model, 200) AS model, prompt_tokens, completion_tokens,
       summary_markdown IS NOT NULL AS has_markdown, {instant("notify_at")}, {instant("email_sent_at")},
       {instant("started_at")}, {instant("completed_at")}, {instant("created_at")}, {instant("updated_at")}
FROM daily_briefs
WHERE user_id = %(user)s AND brief_date = %(date)s
"""

_SECTIONS = f"""
SELECT s.project_id, left(p.name, {TEXT_MAX}) AS project_name, s.status, left(s.error, {ERROR_MAX}) AS error,
       left(s.content_markdown, {MARKDOWN_MAX}) AS content_markdown,
       left(s.metadata ->> 'source', 40) AS source, left(s.metadata ->> 'reason', 200) AS reason,
       {instant("s.updated_at", "updated_at")}
FROM project_daily_briefs s JOIN projects p ON p.id = s.project_id
WHERE s.daily_brief_id = %(brief)s
ORDER BY lower(p.name), p.id
LIMIT %(limit)s
"""
SECTIONS_MAX = 500


async def list_briefs(
    db: Database, user_id: int, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None
) -> Page:
    """A user's briefs newest first (by date): date, status, subject, stage, tokens, when."""
    limit = clamp_limit(limit)
    before = _date_cursor(cursor)
    if not is_bigint(user_id):
        return Page()
    params = {"user": user_id, "before": before, "limit": limit + 1}
    return _page(await _fetch(db, _BRIEF_LIST, params), limit, "brief_date")


async def get_brief(db: Database, user_id: int, brief_date: date) -> dict[str, Any] | None:
    """One brief with its per-project sections (status, error, Markdown), or None. The summary Markdown is
    :func:`briefs.service.load_brief_markdown`'s to read (it is not here)."""
    if not is_bigint(user_id):
        return None
    rows = await _fetch(db, _BRIEF, {"user": user_id, "date": brief_date})
    if not rows:
        return None
    brief = rows[0]
    brief["progress"] = load_json(brief["progress"])
    brief["priority_actions"] = load_json(brief["priority_actions"])
    brief["sections"] = await _fetch(db, _SECTIONS, {"brief": brief.pop("id"), "limit": SECTIONS_MAX})
    return brief


async def preference_of(db: Database, user_id: int) -> dict[str, Any] | None:
    """A user's timezone and preference (``preference`` None without one), or None for no such user."""
    if not is_bigint(user_id):
        return None
    rows = await _fetch(db, f"SELECT {_USER_COLUMNS} FROM users u LEFT JOIN brief_preferences p "
                            "ON p.user_id = u.id WHERE u.id = %(id)s", {"id": user_id})
    return _user(rows[0]) if rows else None

