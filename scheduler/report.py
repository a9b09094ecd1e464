"""What one scheduler tick did: :class:`TickReport`, in the forms the CLI, the logs and JSON show.

Enqueued, deduplicated, moved, cancelled and skipped users (with their reasons), the statements
and pages the tick took, and, for a detailed tick (dry runs), the not-due users with their next
due time. Every value in it is safe to print: hostile text is clipped and escaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any


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
        }

    def summary(self) -> str:
        """A few human lines."""
        head = f"tick at {iso(self.now)}" + (" (dry run: nothing written)" if self.dry_run else "")
        if self.skipped_locked:
            return f"{head}: skipped, another scheduler holds the lock"
        lines = [
            f"{head}: {self.users_seen} active preference(s) in {self.pages} page(s), "
            f"{self.queries} queries, {self.duration_s:.3f}s",
            f"  enqueued {len(self.enqueued)}, already queued {self.deduplicated}, "
            f"moved {len(self.moved)}, cancelled {len(self.cancelled)}, skipped {len(self.skipped)}, "
            f"not due {self.not_due_count}",
        ]
        if self.briefs_failed:
            lines.append(f"  marked failed {len(self.briefs_failed)} brief(s) whose last job ended and left them "
                         "processing")
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
