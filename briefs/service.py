"""What the CLI asks of briefs: queue one brief now, print a stored brief.

``enqueue_brief`` inserts the ``generate_daily_brief`` job itself (``briefs``
must not import ``worker``). The statement mirrors ``worker.queue.enqueue_many``
for one job: ``INSERT … ON CONFLICT DO NOTHING`` against the unique index on live
dedup keys, then ``pg_notify('briefs_queue', '')`` so idle workers wake up. If the
queue's insert ever changes, change it here too (or move a shared ``enqueue``
into ``briefs``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from psycopg.types.json import Jsonb

from briefs.db import Database
from briefs.errors import PermanentError
from briefs.generator import BRIEF_JOB, BriefRequest, brief_dedup_key
from briefs.loading import zone
from briefs.render import STANDARD

NOTIFY_CHANNEL = "briefs_queue"  # worker.queue.NOTIFY_CHANNEL
MANUAL_PRIORITY = 50  # a brief someone asked for by hand runs ahead of scheduled ones

_ENQUEUE = """
INSERT INTO queue_jobs (job_type, payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at)
VALUES (%(type)s, %(payload)s, %(priority)s, now(), %(attempts)s, %(key)s, %(user)s, %(notify)s)
ON CONFLICT DO NOTHING
RETURNING id
"""


async def enqueue_brief(
    db: Database, settings: Any, user_id: int, brief_date: date | None, *, force: bool, now: datetime | None = None
) -> str:
    """Queue one brief to run now; returns a line for humans. Unknown user → PermanentError."""
    now = now or datetime.now(UTC)
    async with db.raw() as conn:
        cur = await conn.execute("SELECT timezone FROM users WHERE id = %s", (user_id,))
        row = await cur.fetchone()
        if row is None:
            raise PermanentError(f"no user with id {user_id}")
        day = brief_date or now.astimezone(zone(row[0])).date()
        key = brief_dedup_key(user_id, day)
        what = f"user {user_id}, brief date {day.isoformat()}"
        if not force:
            cur = await conn.execute(
                "SELECT status FROM daily_briefs WHERE user_id = %s AND brief_date = %s", (user_id, day)
            )
            existing = await cur.fetchone()
            if existing and existing[0] in ("completed", "partial"):
                return f"the brief for {what} is already {existing[0]}; pass --force to regenerate it"
        request = BriefRequest(user_id, day, now.astimezone(UTC), STANDARD, email=False, catch_up=False, force=force)
        cur = await conn.execute(
            _ENQUEUE,
            {
                "type": BRIEF_JOB,
                "payload": Jsonb(request.to_payload()),
                "priority": MANUAL_PRIORITY,
                "attempts": settings.max_attempts,
                "key": key,
                "user": user_id,
                "notify": request.notify_at,
            },
        )
        inserted = await cur.fetchone()
        if inserted is None:
            cur = await conn.execute(
                """SELECT id, status FROM queue_jobs
                   WHERE dedup_key = %s AND status IN ('pending', 'processing') ORDER BY id DESC LIMIT 1""",
                (key,),
            )
            live = await cur.fetchone()
            ident = f"job {live[0]}, {live[1]}" if live else "job finished meanwhile; try again"
            return f"a brief job for {what} is already pending ({ident})"
        await conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return f"queued job {inserted[0]} for {what}" + (" (forced)" if force else "")


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
        row = await cur.fetchone()
    return row[0] if row and row[0] is not None else None
