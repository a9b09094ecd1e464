"""What one scheduler tick did: :class:`TickReport`, in the forms the CLI, the logs and JSON show.

Enqueued, deduplicated, moved, cancelled and skipped users (with their reasons), the statements
and pages the tick took, and, for a detailed tick (dry runs), the not-due users with their next
due time. Every value in it is safe to print: hostile text is clipped and escaped.

The tick log
    ``scheduler_ticks`` keeps the recent ticks for processes other than the scheduler (the web
    console shows the last one). :func:`record_tick` writes one row (the daemon after each tick,
    whoever runs a one-user tick after theirs) and prunes the log in the same statement;
    :func:`recent_ticks` reads it back, newest first. A row's report is :meth:`TickReport.to_dict`
    with every list cut to ``list_cap`` items (``counts`` keeps the full lengths), so a tick of
    100,000 users writes kilobytes, not megabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from briefs.terminal import one_line


@dataclass
class TickReport:
    """What one tick did.

    ``enqueued``: one dict per new job (user_id, brief_date, notify_at, run_at, job_id — None in a dry
    run —, stage, catch_up). ``deduplicated``: planned briefs that already had a pending, running or
    completed job. ``moved``/``cancelled``: pending jobs changed (job_id, user_id, brief_date, reason; moves
    also from_notify_at, notify_at, run_at, catch_up). ``skipped``: {user_id, reason} with reasons
    ``invalid_timezone: …``, ``engagement: …``, ``engagement_error: …``, ``invalid_preference: …``,
    ``plan_error: …``, ``invalid_last_visit: …``. ``queries``: statements issued, the advisory lock
    included. ``not_due_count``: users with nothing to do this tick. A ``detailed`` report also lists
    ``deduplicated_users`` (user_id, brief_date, job_id, status of the job that blocks the brief) and
    ``not_due`` (user_id and the next brief_date, notify_at, run_at; None when there is none within a week).
    """

    now: datetime
    dry_run: bool = False
    detailed: bool = False
    users_seen: int = 0
    enqueued: list[dict[str, Any]] = field(default_factory=list)
    deduplicated: int = 0
    deduplicated_users: list[dict[str, Any]] = field(default_factory=list)
    not_due_count: int = 0
    not_due: list[dict[str, Any]] = field(default_factory=list)
    moved: list[dict[str, Any]] = field(default_factory=list)
    cancelled: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0
    queries: int = 0
    duration_s: float = 0.0
    skipped_locked: bool = False
    # Briefs left 'processing' whose last job ended failed or cancelled with no live job to finish them
    # (a worker killed on the last attempt: the rescuer fails the job in SQL, no brief code runs).
    briefs_failed: list[dict[str, Any]] = field(default_factory=list)
    user_id: int | None = None  # a one-user tick's user (run_tick(user_id=…)); None for a tick of every user
    # Capacity-aware starts (scheduler.starts): the briefs planned, how many started earlier, how many are
    # expected late, the capacity planned with, and ``overloads`` (one per notify_at, with its message).
    # None when the step did not run (switched off, no LLM, a one-user tick).
    capacity: dict[str, Any] | None = None

    def skip(self, user_id: int, reason: str) -> None:
        self.skipped.append({"user_id": user_id, "reason": reason})

    def skipped_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for item in self.skipped:
            kind = _reason_kind(item["reason"])
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (instants and dates as ISO 8601 strings)."""
        return {
            "now": iso(self.now),
            "user_id": self.user_id,
            "dry_run": self.dry_run,
            "skipped_locked": self.skipped_locked,
            "users_seen": self.users_seen,
            "pages": self.pages,
            "queries": self.queries,
            "duration_s": round(self.duration_s, 4),
            "deduplicated": self.deduplicated,
            "enqueued": [_jsonable(e) for e in self.enqueued],
            "moved": [_jsonable(m) for m in self.moved],
            "cancelled": [_jsonable(c) for c in self.cancelled],
            "skipped": [_jsonable(s) for s in self.skipped],
            "skipped_by_kind": self.skipped_by_kind(),
            "detailed": self.detailed,
            "deduplicated_users": [_jsonable(d) for d in self.deduplicated_users],
            "not_due_count": self.not_due_count,
            "not_due": [_jsonable(n) for n in self.not_due],
            "briefs_failed": [_jsonable(b) for b in self.briefs_failed],
            "capacity": None if self.capacity is None else {
                **self.capacity, "overloads": [_jsonable(o) for o in self.capacity.get("overloads", [])]},
        }

    def summary(self) -> str:
        """A few human lines."""
        head = f"tick at {iso(self.now)}"
        if self.user_id is not None:
            head = f"tick for user {self.user_id} at {iso(self.now)}"
        head += " (dry run: nothing written)" if self.dry_run else ""
        if self.skipped_locked:
            return f"{head}: skipped, another scheduler holds the lock"
        lines = [
            # users_seen: the preferences this tick read (the indexed tick reads only those that may be due)
            f"{head}: {self.users_seen} preference(s) read in {self.pages} page(s), "
            f"{self.queries} queries, {self.duration_s:.3f}s",
            f"  enqueued {len(self.enqueued)}, already queued {self.deduplicated}, "
            f"moved {len(self.moved)}, cancelled {len(self.cancelled)}, skipped {len(self.skipped)}, "
            f"not due {self.not_due_count}",
        ]
        if self.briefs_failed:
            lines.append(f"  marked failed {len(self.briefs_failed)} brief(s) whose last job ended and left them "
                         "processing")
        lines += self._capacity_lines()
        kinds = self.skipped_by_kind()
        if kinds:
            lines.append("  skipped: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        for e in self.enqueued[:5]:
            lines.append(
                f"  + user {e['user_id']} {e['brief_date']} at {iso(e['notify_at'])} [{e['stage']}]"
                + (" catch-up" if e["catch_up"] else "")
            )
        if len(self.enqueued) > 5:
            lines.append(f"  … and {len(self.enqueued) - 5} more (use --json for all)")
        for item in self.skipped[:5]:
            lines.append(f"  - user {item['user_id']} skipped: {item['reason']}")
        if len(self.skipped) > 5:
            lines.append(f"  … and {len(self.skipped) - 5} more skipped (use --json for all)")
        for n in self.not_due[:5]:
            when = f"{n['brief_date']} at {iso(n['notify_at'])}" if n["notify_at"] else "no brief within a week"
            lines.append(f"  · user {n['user_id']} not due: next {when}")
        if len(self.not_due) > 5:
            lines.append(f"  … and {len(self.not_due) - 5} more not due (use --json for all)")
        return "\n".join(lines)


    def _capacity_lines(self) -> list[str]:
        return [] if self.capacity is None else ["  " + line for line in capacity_lines(self.capacity)]


def capacity_lines(plan: dict[str, Any], label: str = "LLM capacity") -> list[str]:
    """A tick's capacity plan (``TickReport.capacity``, or its JSON from the tick log) as people read it: what
    it planned, then a line per overload (each shown clipped, on one line)."""
    if "error" in plan:
        return [f"{label}: planning the starts failed ({one_line(str(plan['error']), 300)}): "
                "briefs start the buffer ahead"]
    lines = [f"{label}: {plan['briefs']:,} brief(s) in the window, {plan['started_earlier']:,} started earlier, "
             f"{plan['expected_late']:,} expected late"]
    lines += [f"  ! {one_line(str(item.get('message')), 400)}" for item in plan.get("overloads") or []]
    return lines


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip() or "other"


def iso(value: Any) -> Any:
    """An instant as the reports show it (UTC, ``Z``), a date as ISO; anything else as it is."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _jsonable(item: dict[str, Any]) -> dict[str, Any]:
    return {k: iso(v) for k, v in item.items()}


# --------------------------------------------------------------------------- the tick log

KEEP_DAYS = 7  # the tick log keeps a week of ticks …
KEEP_ROWS = 10_000  # … and never more than this many rows
LIST_CAP = 100  # items kept per list of a logged report
RECENT_MAX = 1000  # recent_ticks returns at most this many rows

# One statement: the new row, then the rows out of the window (older than the week, or more than the cap
# behind the new row's id: ids only grow, so fewer than the cap ever stay ahead of it). The pruning is
# index-driven (the primary key and scheduler_ticks_finished) and touches only what it deletes.
_RECORD = """
WITH new AS (
    INSERT INTO scheduler_ticks (tick_at, duration_s, ok, user_id, summary, report, error)
    VALUES (%(tick_at)s, %(duration_s)s, %(ok)s, %(user_id)s, %(summary)s, %(report)s, %(error)s)
    RETURNING id
), pruned AS (
    DELETE FROM scheduler_ticks t
    USING new
    WHERE t.id <= new.id - %(keep_rows)s OR t.finished_at < now() - make_interval(days => %(keep_days)s)
    RETURNING t.id
)
SELECT new.id, (SELECT count(*) FROM pruned) AS pruned FROM new
"""

# Instants as epoch seconds (a float8 decodes whatever the row holds: infinity, BC dates); checked in Python.
_RECENT = """
SELECT id, date_part('epoch', tick_at) AS tick_epoch, date_part('epoch', finished_at) AS finished_epoch,
       duration_s, ok, user_id, summary, report, error
FROM scheduler_ticks
ORDER BY finished_at DESC, id DESC
LIMIT %s
"""


async def record_tick(
    conn: psycopg.AsyncConnection[Any],
    report: TickReport,
    *,
    error: str | None = None,
    user_id: int | None = None,
    keep_days: int = KEEP_DAYS,
    keep_rows: int = KEEP_ROWS,
    list_cap: int = LIST_CAP,
) -> int | None:
    """Write one tick to ``scheduler_ticks`` and prune the log; the new row's id (None for a dry run: never logged).

    ``error``: the tick failed (``ok`` false, no report; ``report`` then only gives the tick's ``now`` and
    duration). ``user_id`` defaults to the report's (a one-user tick). One statement, in the caller's
    transaction: the caller commits (``Database.raw()`` does when its block ends).
    """
    if report.dry_run:
        return None
    if keep_rows < 1 or keep_days < 1 or list_cap < 0:
        raise ValueError("keep_rows and keep_days must be at least 1, list_cap at least 0")
    ok = error is None
    duration = report.duration_s if math.isfinite(report.duration_s) else None
    params = {
        "tick_at": report.now,
        "duration_s": duration,
        "ok": ok,
        "user_id": report.user_id if user_id is None else user_id,
        "summary": _text(report.summary() if ok else f"tick at {iso(report.now)} failed: {error}"),
        "report": Jsonb(bounded(report.to_dict(), list_cap)) if ok else None,
        "error": None if error is None else _text(one_line(error, 2000)),
        "keep_rows": keep_rows,
        "keep_days": keep_days,
    }
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_RECORD, params)
        row = await cur.fetchone()
    assert row is not None, "the INSERT returns its row"
    return int(row["id"])


async def recent_ticks(conn: psycopg.AsyncConnection[Any], limit: int = 20) -> list[dict[str, Any]]:
    """The last ``limit`` (1..1000) logged ticks, newest first, with JSON-safe values.

    Each: id, tick_at and finished_at (ISO 8601 UTC, None when out of Python's range), duration_s, ok,
    user_id, summary, report (a dict, None for a failed tick) and error.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= RECENT_MAX:
        raise ValueError(f"limit must be an integer from 1 to {RECENT_MAX}, got {limit!r}")
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_RECENT, (limit,))
        rows = await cur.fetchall()
    return [
        {
            "id": row["id"],
            "tick_at": _epoch_iso(row["tick_epoch"]),
            "finished_at": _epoch_iso(row["finished_epoch"]),
            "duration_s": row["duration_s"] if row["duration_s"] is not None and math.isfinite(row["duration_s"])
            else None,
            "ok": row["ok"],
            "user_id": row["user_id"],
            "summary": row["summary"],
            "report": row["report"] if isinstance(row["report"], dict) else None,
            "error": row["error"],
        }
        for row in rows
    ]


# The capacity plan of the last periodic tick that ran (a one-user tick plans nothing).
_LAST_CAPACITY = """
SELECT date_part('epoch', tick_at) AS tick_epoch, report->'capacity' AS capacity
FROM scheduler_ticks
WHERE ok AND user_id IS NULL AND report IS NOT NULL AND NOT coalesce((report->>'skipped_locked')::boolean, false)
ORDER BY finished_at DESC, id DESC
LIMIT 1
"""


async def last_capacity(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """What the last logged periodic tick planned: ``{"tick_at": ISO or None, "capacity": dict or None}``.

    ``capacity`` is the report's (None: the step did not run, or no tick is logged yet; ``tick_at`` says which).
    Read from ``scheduler_ticks``, so any process can show it (``briefs status``).
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_LAST_CAPACITY)
        row = await cur.fetchone()
    if row is None:
        return {"tick_at": None, "capacity": None}
    capacity = row["capacity"] if isinstance(row["capacity"], dict) else None
    return {"tick_at": _epoch_iso(row["tick_epoch"]), "capacity": capacity}


def bounded(report: dict[str, Any], cap: int = LIST_CAP) -> dict[str, Any]:
    """``report`` (a TickReport.to_dict()) with each list cut to ``cap`` items; ``counts`` has every list's length.

    ``truncated`` names the lists that were cut.
    """
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    truncated: list[str] = []
    for key, value in report.items():
        if isinstance(value, list):
            counts[key] = len(value)
            if len(value) > cap:
                truncated.append(key)
                value = value[:cap]
        out[key] = _no_nul(value)
    out["counts"] = counts
    out["truncated"] = truncated
    return out


def _no_nul(value: Any) -> Any:
    """``value`` with NUL characters replaced in every string (jsonb and text cannot hold them)."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(str(k)): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    return value


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd")


# Python's calendar holds years 1..9999.
_EPOCH_MIN = -62135596800.0
_EPOCH_MAX = 253402300799.0


def _epoch_iso(epoch: float | None) -> str | None:
    if epoch is None or not _EPOCH_MIN <= epoch <= _EPOCH_MAX:  # False for NaN too
        return None
    return str(iso(datetime.fromtimestamp(epoch, UTC)))
