"""Briefs without an LLM: sections, the executive summary and priority actions from the data alone.

Used for quiet projects (nothing today, overdue or recently done: an LLM call
would add nothing), when no API key is configured, and as the fallback when the
LLM fails for a project or for the summary. Pure functions of the loaded data.

Counts are the buckets' full counts (``ProjectContext.total``: a bucket may hold
only its first tasks), and a count of zero is left out, never spelled out. Text
here is plain (cleaned, one line, clipped); the Markdown templates escape it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from briefs.loading import NoteItem, ProjectContext, TaskItem
from briefs.render import Group, Section, plain_inline, project_title, short_date

MAX_ITEMS = 10
MAX_ACTIONS = 7

NOTE_FALLBACK = "The AI summary for this project is unavailable today; here is the plain task list."
NOTE_QUIET = None
UNTITLED_TASK = "(untitled task)"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _title(task: TaskItem, limit: int | None = None) -> str:
    """A task's title as one clean line; a title with nothing printable in it gets a placeholder."""
    return plain_inline(task.title, limit) or UNTITLED_TASK


def _task_line(task: TaskItem, *, show_due: bool = True) -> str:
    bits = []
    if show_due and task.due_date:
        bits.append(f"due {short_date(task.due_date)}")
    if task.priority == "high":
        bits.append("high priority")
    if task.status in ("blocked", "in_progress"):
        bits.append(task.status.replace("_", " "))
    title = _title(task)
    return f"{title} ({', '.join(bits)})" if bits else title


def _group(heading: str, items: Sequence[str], total: int | None = None) -> Group | None:
    """At most MAX_ITEMS items, then one "… and N more" line (N counts the whole bucket)."""
    if not items:
        return None
    total = max(len(items), total or 0)
    if total > MAX_ITEMS:
        items = [*items[:MAX_ITEMS], f"… and {total - min(len(items), MAX_ITEMS)} more"]
    return Group(heading, tuple(items))


def _count_phrases(overdue: int, high: int, today: int, upcoming: int, done: int) -> dict[str, str]:
    """The phrase of each non-zero count, by bucket (zero counts are left out of a brief)."""
    phrases = {
        "overdue": _plural(overdue, "overdue task") + (f" ({high} high priority)" if high else ""),
        "today": f"{today} starting or due today",
        "upcoming": f"{upcoming} due in the next 7 days",
        "completed": f"{done} completed in the last 24 hours",
    }
    counts = {"overdue": overdue, "today": today, "upcoming": upcoming, "completed": done}
    return {bucket: phrase for bucket, phrase in phrases.items() if counts[bucket]}


def counts_sentence(p: ProjectContext) -> str:
    found = _count_phrases(p.total("overdue"), p.overdue_high, p.total("today"), p.total("upcoming"),
                           p.total("completed"))
    parts = [found[b] for b in ("overdue", "today", "completed", "upcoming") if b in found]
    if not parts:
        if not p.open_tasks:
            return "No open tasks."
        return f"{_plural(p.open_tasks, 'open task')}, nothing due this week."
    return "; ".join(parts).capitalize() + "."


def project_section(p: ProjectContext, *, source: str = "deterministic", note: str | None = None) -> Section:
    """The project's section as plain lists (no LLM)."""
    if p.quiet:
        summary = "Quiet day: nothing due or starting today, nothing overdue, nothing completed in the last 24 hours."
        if p.upcoming:
            summary += f" {_plural(p.total('upcoming'), 'task')} due in the next 7 days."
        elif p.open_tasks:
            summary += f" {_plural(p.open_tasks, 'open task')}."
    else:
        summary = counts_sentence(p)
    groups = [
        _group("Overdue", [_task_line(t) for t in p.overdue[:MAX_ITEMS]], p.total("overdue")),
        _group("Today", [_task_line(t, show_due=False) for t in p.today[:MAX_ITEMS]], p.total("today")),
        _group("Done in the last 24 hours", [_title(t) for t in p.completed[:MAX_ITEMS]],
               p.total("completed")),
        _group("Coming up this week", [_task_line(t) for t in p.upcoming[:MAX_ITEMS]], p.total("upcoming")),
        _group("Recent notes", [line for n in p.notes if (line := _note_line(n))]),
    ]
    return Section(p.id, project_title(p.name), summary, tuple(g for g in groups if g), source=source, note=note)


def _note_line(note: NoteItem) -> str:
    """A note as ``title: content`` (cleaned, one line); either part alone when the other cleans to nothing."""
    title, content = plain_inline(note.title), plain_inline(note.content, 120)
    return f"{title}: {content}" if title and content else title or content


def compact_line(p: ProjectContext, section: Section | None) -> dict[str, Any]:
    """One project, compactly, for the executive summary prompt (every project gets one)."""
    top = [*p.overdue[:2], *p.today[:2]]
    return {
        "name": project_title(p.name, 120),
        "overdue": p.total("overdue"),
        "overdue_high": p.overdue_high,
        "today": p.total("today"),
        "upcoming": p.total("upcoming"),
        "completed": p.total("completed"),
        "open": p.open_tasks,
        "top": [_title(t, 80) for t in top[:3]],
        "summary": plain_inline(section.summary if section else counts_sentence(p), 300),
    }


def priority_actions(projects: Sequence[ProjectContext], brief_date: date, limit: int = MAX_ACTIONS) -> list[str]:
    """Overdue high-priority work first (oldest first), then other overdue work, then today's high priority."""
    rank = {"high": 0, "medium": 1, "low": 2}
    overdue = sorted(
        ((t, p) for p in projects for t in p.overdue),
        key=lambda tp: (rank.get(tp[0].priority, 3), tp[0].due_date or brief_date, tp[0].id),
    )
    actions: list[str] = []
    seen: set[int] = set()
    for t, p in overdue:
        if len(actions) >= limit:
            break
        days = (brief_date - t.due_date).days if t.due_date else 0
        late = f"{_plural(days, 'day')} overdue"
        prio = ", high priority" if t.high else ""
        actions.append(f"{project_title(p.name, 100)}: {_title(t, 100)} ({late}{prio})")
        seen.add(t.id)
    today = sorted(
        ((t, p) for p in projects for t in p.today if t.id not in seen),
        key=lambda tp: (rank.get(tp[0].priority, 3), tp[0].id),
    )
    for t, p in today:
        if len(actions) >= limit:
            break
        when = "due today" if t.due_date == brief_date else "starts today"
        prio = ", high priority" if t.high else ""
        actions.append(f"{project_title(p.name, 100)}: {_title(t, 100)} ({when}{prio})")
    return actions


def executive_summary(projects: Sequence[ProjectContext], more_projects: int = 0) -> str:
    """Counts across the projects (zero counts left out), the busiest ones, and how many were quiet.

    ``more_projects``: active projects left out of the brief (they count as active, not in the rest).
    """
    n = len(projects) + more_projects
    overdue = sum(p.total("overdue") for p in projects)
    high = sum(p.overdue_high for p in projects)
    today = sum(p.total("today") for p in projects)
    upcoming = sum(p.total("upcoming") for p in projects)
    done = sum(p.total("completed") for p in projects)
    quiet = sum(1 for p in projects if p.quiet)
    counts = list(_count_phrases(overdue, high, today, upcoming, done).values())
    head = f"Across your {_plural(n, 'active project')}"
    if counts:
        listed = counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + " and " + counts[-1]
        first = f"{head}: {listed}."
    else:
        first = f"{head}: nothing overdue, due soon or completed in the last 24 hours."
    busiest = sorted(
        (p for p in projects if p.overdue or p.today),
        key=lambda p: (-p.overdue_high, -p.total("overdue"), -p.total("today"), p.name.lower()),
    )[:3]
    parts = [first]
    if busiest:
        names = ", ".join(f"{project_title(p.name, 100)} ({counts_short(p)})" for p in busiest)
        parts.append(f"Needing attention most: {names}.")
    if quiet:
        parts.append(f"{_plural(quiet, 'project')} had a quiet day.")
    if more_projects:
        parts.append(f"{_plural(more_projects, 'quieter project')} {'is' if more_projects == 1 else 'are'} "
                     "not in this brief.")
    return " ".join(parts)


def counts_short(p: ProjectContext) -> str:
    bits = []
    if p.overdue:
        bits.append(f"{p.total('overdue')} overdue")
    if p.today:
        bits.append(f"{p.total('today')} today")
    return ", ".join(bits) or "quiet"


def empty_summary() -> str:
    return (
        "You have no active projects right now, so there is nothing to brief you on today. "
        "Create a project or reactivate a paused one and your next brief will cover it."
    )
