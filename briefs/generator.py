"""Generating one user's brief for one local date: the ``generate_daily_brief`` job's work.

:func:`generate` does, in order:

1. **Load** the user's active projects, tasks and notes (:mod:`briefs.loading`) and
   **claim** the ``daily_briefs`` row (unique per user and date) as ``processing``
   with a fresh ``run_id`` in its metadata, in one transaction. A ``completed`` or
   ``partial`` brief is left alone unless ``force``. A brief found ``processing`` (a
   crashed or timed-out earlier run) or ``failed`` is *resumed*: project sections
   that the earlier run already got from the LLM are kept, everything else is redone.
   ``force`` redoes everything and bumps ``metadata.revision``; it clears
   ``email_sent_at`` (so the new content is mailed again, if email is wanted) only
   when the request also says ``resend_email``.
2. **Per project, concurrently** (at most ``settings.llm_brief_concurrency`` per
   brief; the LLM client also enforces the process-wide limit) and **isolated**:
   quiet projects and LLM-less setups get a deterministic section; otherwise the
   LLM writes it. Each section is written to ``project_daily_briefs`` as soon as
   it is ready, with progress in ``daily_briefs.progress`` and the job's
   ``queue_jobs.progress`` (throttled). Sections that finish together are written
   together: a finished section whose siblings are still at the LLM waits for them
   at most ``SECTION_BATCH_WINDOW`` (the last one to finish writes at once).
3. **Executive summary** over a compact line for *every* included project (and
   the count of those left out), and priority actions (LLM, or deterministic:
   overdue high-priority work first).
4. **Render** the Markdown brief and write the final row, fenced by ``run_id``.
   Follow-up jobs (the email) are handed to the caller's ``enqueue`` hook *inside
   that same transaction*, so a brief is never completed without its email job.

Limits (settings): ``brief_max_projects`` projects per brief, the most active
first (the rest are one "and N more" line), ``brief_max_tasks`` tasks per bucket,
``brief_max_text`` characters per name, title or note (all in SQL, see
:mod:`briefs.loading`); every prompt fits ``prompt_max_chars`` (instructions
included) and the stored Markdown ``brief_max_chars`` (:mod:`briefs.render`).

Hostile text. Everything written to the database goes through ``render.scrub``
(no NUL, no lone surrogate, no control character but newline and tab, no NaN);
the Markdown escapes every user and model string. A batch of sections that still
fails to save is saved one by one, and a section that cannot be saved becomes a
``failed`` fallback section with the error; never a failed brief.

Circuit breaker (:mod:`briefs.circuit`). The brief reads the circuit of its LLM client first (cached
per process). While it is open no call is made at all: every section and the summary are the
deterministic rendering (``error_kind`` ``circuit_open``), and the brief's metadata says so —
``llm_circuit`` (state, reason, since, next probe) and ``note`` ("the LLM provider is unavailable
(circuit open since …): this brief was written without AI"). The same happens to what is left of a
brief when the circuit opens during it. Whether to write such a brief now or later is the job's
decision (:mod:`briefs.jobs` defers a brief whose ``notify_at`` is far enough away). The breaker's
transitions are written to the shared ``llm_circuit`` row as soon as a section call returns.

Cost and the daily budget. A section's metadata has ``cost`` (its tokens priced by
``settings.llm_prices``: the model the API reported, else the one requested; None when neither has a
price: unknown, never 0), ``cost_model`` and ``currency``; the summary's has ``summary_cost``; the brief's
``daily_briefs.cost`` is their sum (None as soon as one part is unknown; 0 without LLM calls) and its
metadata ``cost_currency``. With ``settings.llm_daily_budget``, the brief first sums today's (UTC)
``daily_briefs.cost`` of finished briefs (``daily_briefs_completed``): when that has reached the budget, the
whole brief is deterministic (sections' ``reason`` and ``summary_reason`` "daily budget reached"), its
metadata has ``llm_budget`` and a ``note``, the brief and its email say so (``render.BUDGET_NOTICE``) and
one warning is logged. Checked once per brief, at its start: a brief under way is never cut short, and
briefs running at the same moment may together go past the budget by what they cost.

LLM health: a fallback section's metadata has ``error_kind`` (``LLMError.kind``,
or ``internal``/``save``) and ``http_status``; the brief's metadata has
``summary_error_kind`` when the summary fell back, ``llm_requests`` (HTTP requests
for this brief, retries included) and ``llm_failures`` (calls that ended in an error).

Statuses. A project row is ``completed`` when its section is what was intended
(from the LLM, or deterministic by design: quiet project, no API key) and
``failed`` when something went wrong — the LLM failed after its retries (or
rejected the request: 401/400…), its reply was malformed, or an unexpected error
— in which case ``error`` says why, the section is the deterministic rendering and
``metadata.source`` is ``"fallback"``. The brief is ``partial`` when any project
failed or the executive summary had to fall back, otherwise ``completed``; it is
never ``failed`` because of a project. A brief without an API key is
``completed`` (deterministic by design, and says so). ``failed`` is only written
by the job handler when the job itself gives up (its last attempt failed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from briefs import deterministic, metrics, render
from briefs.circuit import HALF_OPEN, CircuitState
from briefs.contract import DELIVERY_PRIORITY, EMAIL_JOB, BriefRequest, EmailRequest
from briefs.db import Database
from briefs.errors import PermanentError
from briefs.llm import (
    TOKENS_MAX,
    ExecutiveSummary,
    LLMClient,
    LLMError,
    LLMResult,
    ProjectBrief,
    call_cost,
    instructions,
    token_count,
)
from briefs.loading import BriefContext, Limits, ProjectContext, UserContext, load_brief_context
from briefs.render import BUDGET_NOTICE, BriefView, Section, clip, scrub

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[Any]
EnqueueHook = Callable[[Conn, Sequence["FollowUp"]], Awaitable[Any]]
ProgressHook = Callable[[Conn, dict[str, Any]], Awaitable[None]]

PROGRESS_INTERVAL = 1.0  # seconds between progress writes (first and last are always written)
# How long a finished section waits for its siblings still at the LLM, so they are written together.
SECTION_BATCH_WINDOW = 0.1

# Transactions per brief: one to load the data and claim the row (the first progress rides in the
# claim), one per batch of finished project sections (usually one: see SECTION_BATCH_WINDOW;
# throttled progress rides along), one to finish (with the last progress and the email job).
AUTH_STATUSES = frozenset({401, 403})  # after one of these, the rest of the brief skips the LLM


class BriefSuperseded(RuntimeError):
    """Another run took this brief over (our run_id is no longer the brief's); stop writing."""


# A statement refused for what it carries (psycopg.Error) or a value psycopg cannot send (ValueError:
# e.g. UnicodeEncodeError). A lost connection is not about the data: that one fails the run (retried).
_SAVE_ERRORS = (psycopg.Error, ValueError)


def _connection_lost(exc: BaseException) -> bool:
    """The database went away (no SQLSTATE, class 08, or a shutdown), as opposed to refusing a value."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        return not state or state.startswith(("08", "57P"))
    return False


def _unavailable(project: ProjectContext) -> Section:
    return Section(project.id, render.project_title(project.name),
                   "This project's section could not be prepared today.",
                   source="fallback")


# --------------------------------------------------------------------------- request and outcome


@dataclass(frozen=True)
class FollowUp:
    """A job to enqueue once the brief is written (the caller owns the queue)."""

    job_type: str
    payload: dict[str, Any]
    dedup_key: str
    user_id: int
    run_at: datetime | None  # None: now
    notify_at: datetime | None
    priority: int = 100  # the queue's default; lower runs first


@dataclass
class BriefOutcome:
    brief_id: int | None
    status: str
    skipped: bool = False
    reason: str | None = None
    llm: str = "disabled"
    projects_total: int = 0
    projects_ok: int = 0
    projects_failed: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = 0.0  # in settings.llm_currency; None: unknown (a model without a price)
    follow_ups: list[FollowUp] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "brief_id": self.brief_id,
            "status": self.status,
            "projects_ok": self.projects_ok,
            "projects_failed": self.projects_failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if not self.skipped:
            out["cost"] = self.cost
        if self.skipped:
            out["skipped"] = True
            out["reason"] = self.reason
        else:
            out["llm"] = self.llm
            out["sources"] = self.sources
        if self.follow_ups:
            out["enqueued"] = [f.job_type for f in self.follow_ups]
        return out


@dataclass
class _ProjectResult:
    project: ProjectContext
    section: Section
    status: str  # completed | failed
    error: str | None
    meta: dict[str, Any]

    @property
    def tokens(self) -> tuple[int, int]:
        return token_count(self.meta.get("prompt_tokens")), token_count(self.meta.get("completion_tokens"))


@dataclass(frozen=True)
class _Tally:
    """What a brief's sections and summary add up to: sections by source, tokens, the model named."""

    sources: dict[str, int]
    prompt: int
    completion: int
    model: str | None
    cost: float | None  # None: some tokens had no price (unknown, never counted as 0)

    @classmethod
    def of(cls, results: Sequence[_ProjectResult], summary_meta: dict[str, Any]) -> _Tally:
        sources: dict[str, int] = {}
        prompt = token_count(summary_meta.get("summary_prompt_tokens"))
        completion = token_count(summary_meta.get("summary_completion_tokens"))
        model = summary_meta.get("summary_model")
        costs = [_part_cost(prompt, completion, summary_meta.get("summary_cost"))]
        for r in results:
            src = str(r.meta.get("source"))
            sources[src] = sources.get(src, 0) + 1
            p, c = r.tokens
            prompt += p
            completion += c
            costs.append(_part_cost(p, c, r.meta.get("cost")))
            model = model or r.meta.get("model")
        if not isinstance(model, str):
            model = None  # a kept section's metadata may hold anything
        cost = None if None in costs else math.fsum(c for c in costs if c is not None)
        return cls(sources, min(prompt, TOKENS_MAX), min(completion, TOKENS_MAX), model, cost)


def _part_cost(prompt: int, completion: int, cost: Any) -> float | None:
    """The cost of a section's (or the summary's) tokens as stored in its metadata: 0 without tokens, None
    (unknown) when the tokens had no price or the value is not a cost (a kept section may hold anything)."""
    if not prompt and not completion:
        return 0.0
    if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost) and cost >= 0:
        return float(cost)
    return None


def _partial_error(
    results: Sequence[_ProjectResult], failed: Sequence[_ProjectResult], summary_meta: dict[str, Any]
) -> str:
    """Why a brief is partial: the first failed projects' errors, and the summary's."""
    bits = [f"project {r.project.id} ({render.project_title(r.project.name, 80)}): {r.error}" for r in failed[:5]]
    if len(failed) > 5:
        bits.append(f"and {len(failed) - 5} more")
    if summary_meta.get("summary_source") == "fallback":
        bits.append(f"executive summary: {summary_meta.get('summary_error')}")
    return clip(f"{len(failed)} of {len(results)} project(s) fell back to the plain rendering; " + "; ".join(bits),
                4000)


# --------------------------------------------------------------------------- SQL

_SQL = {
    "insert": """
        INSERT INTO daily_briefs (user_id, brief_date, status, engagement_stage, notify_at, started_at,
                                  metadata, progress)
        VALUES (%(user)s, %(day)s, 'processing', %(stage)s, %(notify)s, now(), %(meta)s, %(progress)s)
        ON CONFLICT (user_id, brief_date) DO NOTHING
        RETURNING id
    """,
    "lock": """
        SELECT id, status, email_sent_at IS NOT NULL AS emailed, metadata FROM daily_briefs
        WHERE user_id = %s AND brief_date = %s FOR UPDATE
    """,
    "restart": """
        UPDATE daily_briefs
        SET status = 'processing', engagement_stage = %(stage)s, notify_at = coalesce(%(notify)s, notify_at),
            started_at = now(), completed_at = NULL, error = NULL, progress = %(progress)s,
            -- The email record (a send done, or one in flight) belongs with email_sent_at: kept unless resending.
            metadata = CASE WHEN NOT %(resend)s AND jsonb_typeof(metadata->'email') = 'object'
                            THEN %(meta)s || jsonb_build_object('email', metadata->'email') ELSE %(meta)s END,
            email_sent_at = CASE WHEN %(resend)s THEN NULL ELSE email_sent_at END, updated_at = now()
        WHERE id = %(id)s
    """,
    "drop_all_sections": "DELETE FROM project_daily_briefs WHERE daily_brief_id = %s",
    # Keep what an earlier run got from the LLM for a project of this run; redo everything else. A section
    # of a project this run leaves out (no longer active, beyond the limit, moved to another user) goes.
    "drop_redo_sections": """
        DELETE FROM project_daily_briefs
        WHERE daily_brief_id = %s AND NOT (status = 'completed' AND metadata->>'source' = 'llm'
                                           AND metadata ? 'section' AND project_id = ANY(%s))
    """,
    "kept_sections": "SELECT project_id, metadata FROM project_daily_briefs WHERE daily_brief_id = %s",
    # A batch of sections in one statement, written only while this run still owns the brief (the
    # fence: FOR SHARE holds that until commit). No row back means another run took the brief over.
    # The rows travel as one JSON array: one json.dumps, where five array parameters cost 4× the CPU.
    "save_sections": """
        INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, content_markdown, error, metadata)
        SELECT fence.id, s.project, s.status, s.content, s.error, s.meta
        FROM (SELECT id FROM daily_briefs
              WHERE id = %(brief)s AND status = 'processing' AND metadata->>'run_id' = %(run)s
              FOR SHARE) AS fence,
             jsonb_to_recordset(%(rows)s) AS s(project bigint, status text, content text, error text, meta jsonb)
        ON CONFLICT (daily_brief_id, project_id) DO UPDATE
        SET status = excluded.status, content_markdown = excluded.content_markdown, error = excluded.error,
            metadata = excluded.metadata, updated_at = now()
        RETURNING project_id
    """,
    "progress": """
        UPDATE daily_briefs SET progress = %(progress)s, updated_at = now()
        WHERE id = %(brief)s AND status = 'processing' AND metadata->>'run_id' = %(run)s
    """,
    "finish": """
        UPDATE daily_briefs
        SET status = %(status)s, subject = %(subject)s, summary_markdown = %(markdown)s,
            executive_summary = %(summary)s, priority_actions = %(actions)s, model = %(model)s,
            prompt_tokens = %(prompt)s, completion_tokens = %(completion)s, cost = %(cost)s, error = %(error)s,
            metadata = metadata || %(meta)s, progress = %(progress)s, completed_at = now(), updated_at = now()
        WHERE id = %(brief)s AND status = 'processing' AND metadata->>'run_id' = %(run)s
        RETURNING email_sent_at IS NOT NULL AS emailed  -- only whether: the instant may be one Python cannot hold
    """,
    # Today's spend (the daily budget): briefs finished in this UTC day, through daily_briefs_completed.
    "spent": """
        SELECT coalesce(sum(cost), 0)::float8 AS spent FROM daily_briefs
        WHERE completed_at >= %(start)s AND completed_at < %(end)s AND completed_at IS NOT NULL
    """,
    "mark_failed": """
        UPDATE daily_briefs SET status = 'failed', error = %s, completed_at = now(), updated_at = now()
        WHERE user_id = %s AND brief_date = %s AND status = 'processing'
    """,
}


# --------------------------------------------------------------------------- the run


async def generate(
    db: Database,
    settings: Any,
    request: BriefRequest,
    *,
    llm: LLMClient | None = None,
    progress: ProgressHook | None = None,
    enqueue: EnqueueHook | None = None,
) -> BriefOutcome:
    """Generate (or resume, or skip) one brief; see the module docstring.

    ``llm``: the shared client (None: one is made for this call when an API key is
    configured). ``progress``: called with a connection and the progress dict
    whenever progress is written to ``daily_briefs`` — inside that transaction, so
    the job's ``queue_jobs.progress`` costs no extra round trip. ``enqueue``: called
    inside the final transaction with the follow-up jobs; without it they are only
    returned in the outcome.
    Raises :class:`PermanentError` for a missing user.
    """
    own_llm = llm is None and settings.llm_enabled
    if own_llm:
        llm = LLMClient(settings)
    try:
        return await _Run(db, settings, request, llm, progress, enqueue).run()
    finally:
        if own_llm and llm is not None:
            await llm.aclose()


async def mark_failed(db: Database, request: BriefRequest, error: str) -> None:
    """The job gave up: a brief left ``processing`` becomes ``failed`` with the error (a later job may redo it)."""
    async with db.raw() as conn:
        await conn.execute(_SQL["mark_failed"], (clip(render.clean(error), 4000), request.user_id, request.brief_date))


class _Run:
    def __init__(
        self,
        db: Database,
        settings: Any,
        request: BriefRequest,
        llm: LLMClient | None,
        progress: ProgressHook | None,
        enqueue: EnqueueHook | None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.req = request
        self.llm = llm if llm is not None and llm.enabled else None
        self.progress_hook = progress
        self.enqueue_hook = enqueue
        self.run_id = uuid.uuid4().hex
        self.brief_id = 0
        self.revision = 1
        self.kept: dict[int, dict[str, Any]] = {}
        self.llm_broken: LLMError | None = None  # set after an auth error: skip the LLM for the rest
        self.circuit = self.llm.circuit if self.llm is not None else None
        self.circuit_note: CircuitState | None = None  # the open circuit that kept (part of) the brief from the LLM
        self.budget_note: dict[str, Any] | None = None  # the daily budget was reached: the whole brief without AI
        self.limits = Limits.of(settings)
        self.llm_requests = 0  # HTTP requests for this brief, retries included
        self.llm_failures = 0  # complete() calls that ended in LLMError
        self.total = 0
        self.done = 0
        self.failed = 0
        self.phase = "loading"
        self._last_progress = 0.0
        self._unsaved: list[_ProjectResult] = []
        self._save_lock = asyncio.Lock()
        self._at_llm = 0  # project calls in flight
        self._llm_idle = asyncio.Event()  # set whenever no project call is in flight
        self._llm_idle.set()

    # ------------------------------------------------------------------ steps

    async def run(self) -> BriefOutcome:
        req = self.req
        await self._check_circuit()
        async with self.db.raw() as conn:
            await self._check_budget(conn)
            # Loaded before the claim so the claim carries the first progress (projects_total): one
            # statement less. Nothing is visible before the commit, so the order is not observable.
            ctx = await load_brief_context(conn, req.user_id, req.brief_date, req.notify_at, self.limits)
            if ctx is None:
                raise PermanentError(f"user {req.user_id} does not exist")
            self.total = len(ctx.projects)
            self.phase = "projects"
            skipped = await self._claim(conn, ctx.user, ctx.projects)
            if skipped is not None:
                return skipped
            await self._publish_progress(conn, self._progress_value())

        results = await self._projects(ctx) if ctx.projects else []

        self.phase = "summary"
        await self._report()
        summary, actions, summary_meta = await self._summary(ctx, results)
        await self._publish_circuit()
        return await self._finish(ctx, results, summary, actions, summary_meta)

    async def _check_circuit(self) -> None:
        """While the LLM circuit is open, the whole brief is written without a single call (and says so)."""
        if self.circuit is None:
            return
        try:
            state = await self.circuit.refresh(self.db)
        except Exception as exc:  # the shared row unreadable: this process's own breaker still decides
            log.warning("could not read the LLM circuit's state: %s", clip(render.clean(str(exc)), 200))
            state = self.circuit.breaker.snapshot()
        if self.circuit.breaker.blocked():
            self._circuit_opened(LLMError(f"the LLM provider is unavailable (circuit {state.describe()})",
                                          kind="circuit_open"))

    async def _check_budget(self, conn: Conn) -> None:
        """Once, before the brief: when today's spend (UTC) has reached ``llm_daily_budget``, the whole brief
        is written without AI (and says so). A brief under way is never stopped by the budget; the next UTC
        day's briefs use the LLM again."""
        budget = self.settings.llm_daily_budget
        if self.llm is None or budget is None:
            return
        start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        cur = await conn.execute(_SQL["spent"], {"start": start, "end": start + timedelta(days=1)})
        cur.row_factory = namedtuple_row
        row = await cur.fetchone()
        spent = float(row.spent) if row is not None else 0.0
        if spent < budget:
            return
        currency = self.settings.llm_currency
        self.budget_note = {"budget": budget, "spent": round(spent, 6), "currency": currency,
                            "day": start.date().isoformat()}
        log.warning("brief for user %s on %s: today's LLM spend (%g %s) has reached the daily budget (%g %s): "
                    "written without AI; the LLM is used again from the next UTC day", self.req.user_id,
                    self.req.brief_date, spent, currency, budget, currency)

    def _circuit_opened(self, exc: LLMError) -> None:
        """The circuit refused a call: the brief is marked, and while the circuit is open (not merely
        half-open, its probe in flight: that may close it) the rest of the brief skips the LLM."""
        if self.circuit is None:
            self.llm_broken = exc
            return
        self.circuit_note = self.circuit.breaker.snapshot()
        if self.circuit.breaker.state != HALF_OPEN:
            self.llm_broken = exc

    async def _publish_circuit(self) -> None:
        """The breaker's transitions into the shared row, for the other processes (never sinks the brief)."""
        if self.circuit is None:
            return
        try:
            await self.circuit.publish(self.db)
        except Exception as exc:
            log.warning("could not record the LLM circuit's state: %s", clip(render.clean(str(exc)), 200))

    async def _claim(self, conn: Conn, user: UserContext, projects: Sequence[ProjectContext]) -> BriefOutcome | None:
        """Take the brief row for this run; an outcome when there is nothing to do."""
        req = self.req
        meta = {"run_id": self.run_id, "revision": 1}
        progress = self._progress_value()
        cur = await conn.execute(
            _SQL["insert"],
            {
                "user": req.user_id,
                "day": req.brief_date,
                "stage": req.engagement_stage,
                "notify": req.notify_at,
                "meta": Jsonb(meta),
                "progress": Jsonb(progress),
            },
        )
        cur.row_factory = namedtuple_row
        inserted = await cur.fetchone()
        if inserted is not None:
            self.brief_id = inserted.id
            return None
        cur = await conn.execute(_SQL["lock"], (req.user_id, req.brief_date))
        cur.row_factory = namedtuple_row
        found = await cur.fetchone()
        assert found is not None  # the insert conflicted, so the row exists (and rows are not deleted here)
        self.brief_id = found.id
        if found.status in ("completed", "partial") and not req.force:
            return await self._already_finished(conn, user, found.status, emailed=found.emailed)
        old_meta = found.metadata if isinstance(found.metadata, dict) else {}  # an earlier run's row may hold any JSON
        self.revision = min(max(token_count(old_meta.get("revision")), 1), TOKENS_MAX - 1) + (1 if req.force else 0)
        meta["revision"] = self.revision
        await self._restart(conn, meta, progress)
        if not req.force and found.status in ("processing", "failed"):
            await self._resume(conn, found.status, projects)
        else:
            await conn.execute(_SQL["drop_all_sections"], (self.brief_id,))
        return None

    async def _already_finished(self, conn: Conn, user: UserContext, status: str, *, emailed: bool) -> BriefOutcome:
        """The brief is finished and not forced: nothing to generate; only its email job, if still due."""
        req = self.req
        follow = []
        if (req.email or user.wants_email) and not emailed:
            follow = [self._email_follow_up()]
            if self.enqueue_hook is not None:
                await self.enqueue_hook(conn, follow)
        log.info("brief %s for user %s on %s is already %s; not regenerating (no force)",
                 self.brief_id, req.user_id, req.brief_date, status)
        return BriefOutcome(self.brief_id, status, skipped=True, reason=f"already {status}", follow_ups=follow)

    async def _restart(self, conn: Conn, meta: dict[str, Any], progress: dict[str, Any]) -> None:
        """The existing row back to ``processing`` for this run (its email record kept unless resending)."""
        req = self.req
        await conn.execute(
            _SQL["restart"],
            {
                "id": self.brief_id,
                "stage": req.engagement_stage,
                "notify": req.notify_at,
                "meta": Jsonb(meta),
                "progress": Jsonb(progress),
                "resend": req.force and req.resend_email,
            },
        )

    async def _resume(self, conn: Conn, status: str, projects: Sequence[ProjectContext]) -> None:
        """Keep the sections an earlier run got from the LLM for this run's projects; drop the others."""
        await conn.execute(_SQL["drop_redo_sections"], (self.brief_id, [p.id for p in projects]))
        cur = await conn.execute(_SQL["kept_sections"], (self.brief_id,))
        cur.row_factory = namedtuple_row
        self.kept = {row.project_id: row.metadata for row in await cur.fetchall() if isinstance(row.metadata, dict)}
        log.info("resuming brief %s (was %s): %d project section(s) kept", self.brief_id, status, len(self.kept))

    async def _projects(self, ctx: BriefContext) -> list[_ProjectResult]:
        limit = asyncio.Semaphore(self.settings.llm_brief_concurrency)
        results: dict[int, _ProjectResult] = {}

        async def one(project: ProjectContext) -> None:
            kept = self.kept.get(project.id)
            section = None
            if kept is not None:
                try:
                    section = Section.from_dict(kept.get("section"))
                    if section.project_id != project.id:
                        raise ValueError(f"it belongs to project {section.project_id}")
                except (TypeError, ValueError) as exc:
                    log.warning("project %s: the kept section is unreadable (%s); redoing it", project.id,
                                clip(render.clean(str(exc)), 200))
                    section = None
            if kept is not None and section is not None:
                result = _ProjectResult(project, section, "completed", None, kept)
                self._count([result])
            else:
                result = await self._project(ctx, project, limit)
                await self._publish_circuit()
                self._unsaved.append(result)
                if self._at_llm:  # siblings still at the LLM: give them a moment to join this batch
                    try:
                        async with asyncio.timeout(SECTION_BATCH_WINDOW):
                            await self._llm_idle.wait()
                    except TimeoutError:
                        pass
                else:  # siblings finishing in this same loop iteration (deterministic ones) join too
                    await asyncio.sleep(0)
                await self._save_pending()
            results[project.id] = result

        try:
            async with asyncio.TaskGroup() as tg:
                for project in ctx.projects:
                    tg.create_task(one(project))
        except BaseExceptionGroup as group:
            # Only infrastructure errors get here (a project's own errors are caught in _project).
            raise group.exceptions[0] from None
        return [results[p.id] for p in ctx.projects]

    def _prompt_budget(self, schema: type[BaseModel]) -> int:
        """Characters left for our messages once the client appends the schema's JSON instructions."""
        limit: int = self.settings.prompt_max_chars
        return max(1000, limit - len(instructions(schema)) - 2)

    def _note_llm(self, attempts: int, *, failed: bool) -> None:
        self.llm_requests += attempts
        self.llm_failures += 1 if failed else 0

    async def _project(self, ctx: BriefContext, project: ProjectContext, limit: asyncio.Semaphore) -> _ProjectResult:
        """One project's section. Never raises (except cancellation): failures become fallback sections."""
        try:
            plain = self._plain(project)
            if plain is not None:
                return plain
            assert self.llm is not None  # _plain writes the sections of an LLM-less brief
            if self.llm_broken is not None:
                return self._broken_fallback(project)
            messages = render.project_messages(
                project, ctx.brief_date, self.req.engagement_stage, max_text=self.limits.text,
                max_chars=self._prompt_budget(ProjectBrief),
            )
            async with limit:
                if self.llm_broken is not None:
                    return self._broken_fallback(project)
                self._at_llm += 1
                self._llm_idle.clear()
                try:
                    reply = await self.llm.complete(messages, ProjectBrief, purpose="project_brief")
                except LLMError as exc:
                    self._note_llm(exc.attempts, failed=True)
                    if exc.permanent and exc.status in AUTH_STATUSES:
                        self.llm_broken = exc
                    elif exc.kind == "circuit_open":
                        self._circuit_opened(exc)
                    log.warning("project %s: LLM failed, using the deterministic section: %s", project.id, exc)
                    return self._llm_fallback(project, exc)
                finally:
                    self._at_llm -= 1
                    if not self._at_llm:
                        self._llm_idle.set()
            self._note_llm(reply.attempts, failed=False)
            section = render.section_from_llm(project.id, project.name, reply.value, max_text=self.limits.text)
            meta = {
                "source": "llm",
                "model": reply.model,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "attempts": reply.attempts,
                "latency": round(reply.latency, 3),
                "request_seconds": round(reply.request_seconds, 3),
                **self._priced(reply, ""),
            }
            return _ProjectResult(project, section, "completed", None, meta)
        except Exception as exc:  # isolation: one project's bug never sinks the brief
            log.exception("project %s: unexpected error; using the deterministic section", project.id)
            return self._fallback(project, f"{type(exc).__name__}: {exc}", permanent=False, kind="internal")

    def _plain(self, project: ProjectContext) -> _ProjectResult | None:
        """The deterministic section of a project that goes without the LLM by design (quiet, no API key,
        the daily budget reached), or None: the LLM writes it."""
        if project.quiet:
            reason = "quiet"
        elif self.llm is None:
            reason = "llm disabled"
        elif self.budget_note is not None:
            reason = "daily budget reached"
        else:
            return None
        section = deterministic.project_section(project)
        return _ProjectResult(project, section, "completed", None, {"source": "deterministic", "reason": reason})

    def _priced(self, reply: LLMResult[Any], prefix: str) -> dict[str, Any]:
        """A call's cost by ``settings.llm_prices`` (the reported model's price, else the requested one's) for
        its metadata (``cost``: None when unknown), counted in ``briefs_llm_cost_total``."""
        prices = self.settings.llm_prices
        model, cost = call_cost(prices, [reply.model, self.settings.model], reply.prompt_tokens,
                                reply.completion_tokens)
        if model is None or cost is None:
            metrics.LLM_UNPRICED.inc()
        else:
            metrics.LLM_COST.labels(model).inc(cost)
        return {f"{prefix}cost": cost, f"{prefix}cost_model": model, f"{prefix}currency": self.settings.llm_currency}

    def _broken_fallback(self, project: ProjectContext, purpose: str = "project_brief") -> _ProjectResult:
        """The section of a project whose call is skipped: the LLM is known broken for this brief."""
        assert self.llm_broken is not None
        self._refused(purpose)
        return self._llm_fallback(project, self.llm_broken)

    def _refused(self, purpose: str) -> None:
        """A call not made because the circuit is open counts in ``briefs_llm_circuit_refused_total``."""
        if self.llm_broken is not None and self.llm_broken.kind == "circuit_open":
            metrics.LLM_CIRCUIT_REFUSED.labels(purpose).inc()

    def _llm_fallback(self, project: ProjectContext, exc: LLMError) -> _ProjectResult:
        return self._fallback(project, str(exc), permanent=exc.permanent, kind=exc.kind, http_status=exc.status)

    def _fallback(
        self, project: ProjectContext, error: str, *, permanent: bool, kind: str, http_status: int | None = None
    ) -> _ProjectResult:
        error = clip(render.clean(error), 2000)
        meta: dict[str, Any] = {"source": "fallback", "error": error, "permanent": permanent, "error_kind": kind,
                                "http_status": http_status}
        try:
            section = deterministic.project_section(project, source="fallback", note=deterministic.NOTE_FALLBACK)
        except Exception as exc:  # even the plain rendering failed: one line keeps the brief whole
            log.exception("project %s: deterministic section failed too", project.id)
            meta["render_error"] = clip(render.clean(f"{type(exc).__name__}: {exc}"), 500)
            section = _unavailable(project)
        return _ProjectResult(project, section, "failed", error, meta)

    def _count(self, batch: Sequence[_ProjectResult]) -> None:
        self.done += len(batch)
        self.failed += sum(1 for r in batch if r.status == "failed")

    def _row(self, r: _ProjectResult) -> dict[str, Any]:
        """The stored form of a section: scrubbed (nothing PostgreSQL refuses), Markdown within the limit."""
        r.meta = {**r.meta, "section": r.section.to_dict()}
        row: dict[str, Any] = scrub({
            "project": r.project.id, "status": r.status, "error": r.error, "meta": r.meta,
            "content": render.section_markdown(r.section, self.settings.brief_max_chars),
        })
        return row

    async def _write_rows(self, rows: list[dict[str, Any]], *, progress: bool) -> None:
        async with self.db.raw() as conn:
            cur = await conn.execute(_SQL["save_sections"], {"brief": self.brief_id, "run": self.run_id,
                                                             "rows": Jsonb(rows)})
            if not await cur.fetchall():
                raise await self._superseded(conn)
            if progress and self._progress_due():
                await self._write_progress(conn)

    async def _superseded(self, conn: Conn) -> Exception:
        """Why this run may no longer write its brief: another run took it over (transient: that run
        finishes it), or the row is gone — the user was deleted meanwhile (permanent: nothing to redo)."""
        cur = await conn.execute("SELECT status FROM daily_briefs WHERE id = %s", (self.brief_id,))
        cur.row_factory = namedtuple_row
        row = await cur.fetchone()
        if row is None:
            return PermanentError(f"brief {self.brief_id} was deleted during the run "
                                  f"(user {self.req.user_id} deleted?); nothing to finish")
        return BriefSuperseded(f"brief {self.brief_id} was taken over by another run (now {row.status})")

    async def _save_pending(self) -> None:
        """Write every finished, unsaved section in one statement (with progress when it is due).

        If the batch is refused (a value PostgreSQL will not take, a project deleted meanwhile…),
        the sections are saved one by one, and one that still fails is saved as a failed fallback
        section carrying the error — then as a bare line — then left out: never the whole brief.
        """
        async with self._save_lock:
            batch, self._unsaved = self._unsaved, []
            if not batch:
                return  # an earlier flush took ours
            try:
                await self._write_rows([self._row(r) for r in batch], progress=True)
            except _SAVE_ERRORS as exc:
                if _connection_lost(exc):
                    raise
                log.warning("brief %s: saving %d section(s) together failed (%s); saving them one by one",
                            self.brief_id, len(batch), exc)
                for r in batch:
                    await self._save_one(r)
            self._count(batch)

    async def _save_one(self, r: _ProjectResult) -> None:
        try:
            await self._write_rows([self._row(r)], progress=False)
            return
        except _SAVE_ERRORS as exc:
            if _connection_lost(exc):
                raise
            problem = clip(render.clean(f"could not save the section: {type(exc).__name__}: {exc}"), 2000)
        log.warning("brief %s, project %s: %s", self.brief_id, r.project.id, problem)
        failed = self._fallback(r.project, problem, permanent=False, kind="save")
        r.status, r.error, r.meta, r.section = failed.status, failed.error, failed.meta, failed.section
        try:
            await self._write_rows([self._row(r)], progress=False)
            return
        except _SAVE_ERRORS as exc:
            if _connection_lost(exc):
                raise
        r.section = _unavailable(r.project)
        r.meta = {"source": "fallback", "error": problem, "permanent": False, "error_kind": "save",
                  "http_status": None}
        bare = {"project": r.project.id, "status": "failed", "error": problem.encode("ascii", "replace").decode(),
                "meta": {"source": "fallback", "error_kind": "save"}, "content": r.section.summary + "\n"}
        try:
            await self._write_rows([bare], progress=False)
        except _SAVE_ERRORS as exc:
            if _connection_lost(exc):
                raise
            log.error("brief %s, project %s: the section could not be saved at all: %s",
                      self.brief_id, r.project.id, exc)

    async def _summary(
        self, ctx: BriefContext, results: list[_ProjectResult]
    ) -> tuple[str, list[str], dict[str, Any]]:
        if not ctx.projects:
            return deterministic.empty_summary(), [], {"summary_source": "deterministic"}
        actions = deterministic.priority_actions(ctx.projects, ctx.brief_date)
        plain = deterministic.executive_summary(ctx.projects, ctx.more_projects)
        if self.llm is None:
            return plain, actions, {"summary_source": "deterministic"}
        if all(p.quiet for p in ctx.projects):
            return plain, actions, {"summary_source": "deterministic", "summary_reason": "all projects quiet"}
        if self.budget_note is not None:
            return plain, actions, {"summary_source": "deterministic", "summary_reason": "daily budget reached"}
        if self.llm_broken is not None:
            self._refused("executive_summary")
            return plain, actions, {"summary_source": "fallback", "summary_error": clip(str(self.llm_broken), 2000),
                                    "summary_error_kind": self.llm_broken.kind}
        try:
            lines = [deterministic.compact_line(r.project, r.section) for r in results]
            messages = render.summary_messages(
                lines, ctx.brief_date, self.req.engagement_stage, ctx.user.display_name,
                more_projects=ctx.more_projects, max_chars=self._prompt_budget(ExecutiveSummary),
            )
            reply = await self.llm.complete(messages, ExecutiveSummary, purpose="executive_summary")
            self._note_llm(reply.attempts, failed=False)
            llm_actions = list(render.clean_lines(reply.value.priority_actions, self.limits.text))
            summary = "\n\n".join(render.paragraphs(reply.value.summary))
        except LLMError as exc:
            self._note_llm(exc.attempts, failed=True)
            if exc.kind == "circuit_open":
                self._circuit_opened(exc)
            log.warning("executive summary: LLM failed, using the deterministic summary: %s", exc)
            return plain, actions, {"summary_source": "fallback", "summary_error": clip(str(exc), 2000),
                                    "summary_error_kind": exc.kind}
        except Exception as exc:  # isolation: the summary's bug never sinks the brief either
            log.exception("executive summary: unexpected error; using the deterministic summary")
            return plain, actions, {"summary_source": "fallback", "summary_error_kind": "internal",
                                    "summary_error": clip(render.clean(f"{type(exc).__name__}: {exc}"), 2000)}
        meta = {
            "summary_source": "llm",
            "summary_model": reply.model,
            "summary_prompt_tokens": reply.prompt_tokens,
            "summary_completion_tokens": reply.completion_tokens,
            **self._priced(reply, "summary_"),
        }
        return summary or plain, llm_actions or actions, meta

    async def _finish(
        self,
        ctx: BriefContext,
        results: list[_ProjectResult],
        summary: str,
        actions: list[str],
        summary_meta: dict[str, Any],
    ) -> BriefOutcome:
        """Render the brief and write the final row (with the email job and the last progress)."""
        req = self.req
        tally = _Tally.of(results, summary_meta)
        failed = [r for r in results if r.status == "failed"]
        partial = bool(failed) or summary_meta.get("summary_source") == "fallback"
        status = "partial" if partial else "completed"
        error = _partial_error(results, failed, summary_meta) if partial else None
        subject = render.subject(req.engagement_stage, req.brief_date, ctx.user.display_name)
        markdown = self._markdown(ctx, results, subject, summary, actions, status, summary_meta)
        self.phase = "done"
        progress = self._progress_value()
        meta = self._final_meta(ctx, results, len(failed), tally.sources, summary_meta)
        follow = [self._email_follow_up()] if req.email or ctx.user.wants_email else []
        final = {
            "status": status,
            "subject": render.clean(subject),
            "markdown": render.clean(markdown),
            "summary": render.clean(summary),
            "actions": Jsonb(scrub(actions)),
            "model": render.clean(tally.model) if tally.model is not None else None,
            "prompt": tally.prompt,
            "completion": tally.completion,
            "cost": tally.cost,
            "error": render.clean(error) if error is not None else None,
            "meta": Jsonb(scrub(meta)),
            "progress": Jsonb(progress),
        }
        follow = await self._write_final(final, follow, progress)
        return self._finished(status, len(results), len(failed), tally, follow)

    def _finished(self, status: str, total: int, failed: int, tally: _Tally, follow: list[FollowUp]) -> BriefOutcome:
        """The outcome of a brief written to the end (and its log line)."""
        req = self.req
        log.info(
            "brief %s for user %s on %s: %s (%d project(s): %s; %d+%d tokens)",
            self.brief_id, req.user_id, req.brief_date, status, total,
            ", ".join(f"{k} {v}" for k, v in sorted(tally.sources.items())) or "none", tally.prompt, tally.completion,
        )
        return BriefOutcome(
            brief_id=self.brief_id,
            status=status,
            llm="enabled" if self.llm is not None else "disabled",
            projects_total=total,
            projects_ok=total - failed,
            projects_failed=failed,
            sources=tally.sources,
            prompt_tokens=tally.prompt,
            completion_tokens=tally.completion,
            cost=tally.cost,
            follow_ups=follow,
        )

    def _markdown(
        self,
        ctx: BriefContext,
        results: list[_ProjectResult],
        subject: str,
        summary: str,
        actions: list[str],
        status: str,
        summary_meta: dict[str, Any],
    ) -> str:
        """The brief's Markdown, within ``brief_max_chars``."""
        req = self.req
        view = BriefView(
            user_name=ctx.user.display_name,
            brief_date=req.brief_date,
            stage=req.engagement_stage,
            subject=subject,
            llm_enabled=self.llm is not None,
            llm_off_reason=BUDGET_NOTICE if self.budget_note is not None else None,
            executive_summary=summary,
            priority_actions=tuple(actions),
            sections=tuple(r.section for r in results),
            status=status,
            summary_source=str(summary_meta.get("summary_source")),
            catch_up=req.catch_up,
            more_projects=ctx.more_projects,
            more_names=ctx.more_names,
        )
        return render.brief_markdown(view, self.settings.brief_max_chars)

    def _final_meta(
        self,
        ctx: BriefContext,
        results: list[_ProjectResult],
        failed: int,
        sources: dict[str, int],
        summary_meta: dict[str, Any],
    ) -> dict[str, Any]:
        """What the finished brief's metadata gains: the run, its projects, the LLM's use and the summary's."""
        meta = {
            "llm": "enabled" if self.llm is not None else "disabled",
            "mode": "llm" if self.llm is not None else "deterministic",
            "run_id": self.run_id,
            "revision": self.revision,
            "projects": {"total": len(results), "failed": failed, "more": ctx.more_projects, **sources},
            "resumed_sections": len(self.kept),
            "llm_requests": self.llm_requests,
            "llm_failures": self.llm_failures,
            "catch_up": self.req.catch_up,
            "anchor": ctx.anchor.isoformat(),
            "cost_currency": self.settings.llm_currency,
            **summary_meta,
        }
        if self.llm is None:
            meta["note"] = "generated without an LLM (no API key): deterministic brief"
        elif self.budget_note is not None:
            meta.update(self._budget_meta())
        elif self.circuit_note is not None:
            meta.update(self._circuit_meta(sources))
        return meta

    def _budget_meta(self) -> dict[str, Any]:
        """The marker of a brief written without the LLM because the day's budget was spent."""
        note = self.budget_note
        assert note is not None
        return {"llm_budget": note, "mode": "deterministic", "note": self._budget_notice()}

    def _budget_notice(self) -> str:
        note = self.budget_note or {}
        return (f"the daily LLM budget ({note.get('budget'):g} {note.get('currency')}) was reached: this brief was "
                "written without AI; AI-written briefs resume on the next UTC day")

    def _circuit_meta(self, sources: dict[str, int]) -> dict[str, Any]:
        """The marker of a brief (partly) written without the LLM because its circuit was open."""
        assert self.circuit_note is not None
        note = self.circuit_note
        since = note.to_dict()["since"] or "?"
        what = "parts of this brief were" if sources.get("llm") else "this brief was"
        return {"llm_circuit": note.to_dict(), "mode": "deterministic" if not sources.get("llm") else "llm",
                "note": f"the LLM provider is unavailable (circuit open since {since}): {what} written without AI"}

    async def _write_final(
        self, final: dict[str, Any], follow: list[FollowUp], progress: dict[str, Any]
    ) -> list[FollowUp]:
        """Write the finished brief (fenced by run_id) with its follow-up jobs and the last progress, in one
        transaction; the follow-ups actually due (none when the brief was already mailed)."""
        async with self.db.raw() as conn:
            cur = await conn.execute(_SQL["finish"], {**final, "brief": self.brief_id, "run": self.run_id})
            cur.row_factory = namedtuple_row
            row = await cur.fetchone()
            if row is None:
                raise await self._superseded(conn)
            if row.emailed:
                follow = []  # already mailed (a resumed run after the email went out)
            if follow and self.enqueue_hook is not None:
                await self.enqueue_hook(conn, follow)
            if self.progress_hook is not None:
                await self.progress_hook(conn, progress)
        return follow

    def _email_follow_up(self) -> FollowUp:
        req = self.req
        email = EmailRequest(req.user_id, req.brief_date, self.brief_id)
        return FollowUp(
            job_type=EMAIL_JOB,
            payload=email.to_payload(),
            dedup_key=email.dedup_key,
            user_id=req.user_id,
            run_at=req.notify_at,
            notify_at=req.notify_at,
            priority=DELIVERY_PRIORITY,  # ordered with the briefs by deadline: due now, it goes first
        )

    # ------------------------------------------------------------------ progress

    def _progress_value(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "projects_total": self.total,
            "projects_done": self.done,
            "projects_failed": self.failed,
        }

    def _progress_due(self) -> bool:
        return time.monotonic() - self._last_progress >= PROGRESS_INTERVAL

    async def _write_progress(self, conn: Conn) -> None:
        """Progress into ``daily_briefs`` and (through the hook) ``queue_jobs``, in the caller's transaction."""
        value = self._progress_value()
        await conn.execute(_SQL["progress"], {"progress": Jsonb(value), "brief": self.brief_id, "run": self.run_id})
        await self._publish_progress(conn, value)

    async def _publish_progress(self, conn: Conn, value: dict[str, Any]) -> None:
        """The job's progress (through the hook), once ``daily_briefs.progress`` holds ``value``."""
        self._last_progress = time.monotonic()
        if self.progress_hook is not None:
            await self.progress_hook(conn, value)

    async def _report(self) -> None:
        """A progress write of its own, when one is due (a phase change on a long brief)."""
        if not self._progress_due():
            return
        async with self.db.raw() as conn:
            await self._write_progress(conn)
