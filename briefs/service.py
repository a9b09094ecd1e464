"""What the CLI asks of briefs: queue briefs now, print a stored brief.

Queueing goes through the caller's ``enqueue`` hook (the same hook type the
generator uses for its follow-up jobs): ``briefs`` does not import ``worker``,
the CLI passes ``worker.queue``'s bulk insert.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from briefs.db import Database
from briefs.errors import PermanentError
from briefs.generator import BRIEF_JOB, BriefRequest, EnqueueHook, FollowUp, brief_dedup_key
from briefs.loading import zone
from briefs.render import STANDARD

MANUAL_PRIORITY = 10  # a brief someone asked for by hand runs ahead of scheduled ones (50)
ALL_BATCH = 1000


def _manual_job(user_id: int, day: date, now: datetime, *, force: bool) -> FollowUp:
    request = BriefRequest(user_id, day, now.astimezone(UTC), STANDARD, email=False, catch_up=False, force=force)
    return FollowUp(
        job_type=BRIEF_JOB,
        payload=request.to_payload(),
        dedup_key=brief_dedup_key(user_id, day),
        user_id=user_id,
        run_at=None,
        notify_at=request.notify_at,
        priority=MANUAL_PRIORITY,
    )


async def enqueue_brief(
    db: Database,
    settings: Any,
    user_id: int,
    brief_date: date | None,
    *,
    force: bool,
    enqueue: EnqueueHook,
    now: datetime | None = None,
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
        [new_id] = await enqueue(conn, [_manual_job(user_id, day, now, force=force)])
        if new_id is None:
            cur = await conn.execute(
                """SELECT id, status FROM queue_jobs
                   WHERE dedup_key = %s AND status IN ('pending', 'processing') ORDER BY id DESC LIMIT 1""",
                (key,),
            )
            live = await cur.fetchone()
            ident = f"job {live[0]}, {live[1]}" if live else "job finished meanwhile; try again"
            return f"a brief job for {what} is already pending ({ident})"
    return f"queued job {new_id} for {what}" + (" (forced)" if force else "")


async def enqueue_all(
    db: Database,
    *,
    force: bool,
    enqueue: EnqueueHook,
    now: datetime | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Queue today's brief (each user's local today) for every user with an active preference.

    Works in keyset batches of 1,000 users, one bulk insert each. Without ``force``
    users whose brief for that date is already finished are left out. Returns
    (queued, already queued or finished).
    """
    now = now or datetime.now(UTC)
    async with db.raw() as conn:
        cur = await conn.execute("SELECT count(*) FROM brief_preferences WHERE is_active")
        total = (await cur.fetchone() or (0,))[0]
    queued = skipped = seen = 0
    after = 0
    while True:
        async with db.raw() as conn:
            cur = await conn.execute(
                """SELECT u.id, u.timezone FROM brief_preferences p JOIN users u ON u.id = p.user_id
                   WHERE p.is_active AND p.user_id > %(after)s AND u.id > %(after)s
                   ORDER BY p.user_id LIMIT %(batch)s""",
                {"after": after, "batch": ALL_BATCH},
            )
            rows = await cur.fetchall()
            if not rows:
                break
            after = rows[-1][0]
            days = {user_id: now.astimezone(zone(tz_name)).date() for user_id, tz_name in rows}
            finished: set[int] = set()
            if not force:
                cur = await conn.execute(
                    """SELECT b.user_id FROM daily_briefs b
                       JOIN unnest(%s::bigint[], %s::date[]) AS t(user_id, brief_date)
                         ON b.user_id = t.user_id AND b.brief_date = t.brief_date
                       WHERE b.status IN ('completed', 'partial')""",
                    (list(days), list(days.values())),
                )
                finished = {r[0] for r in await cur.fetchall()}
            skipped += len(finished)
            jobs = [_manual_job(uid, day, now, force=force) for uid, day in days.items() if uid not in finished]
            ids = await enqueue(conn, jobs) if jobs else []
            new = sum(1 for i in ids if i is not None)
            queued += new
            skipped += len(jobs) - new
        seen += len(rows)
        if on_progress:
            on_progress(seen, max(total, seen))
    return queued, skipped


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
