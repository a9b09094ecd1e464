"""The brief domain's job handlers, plugged into the worker: ``generate_daily_brief`` and ``send_brief_email``.

The work is in ``briefs.generator`` and ``briefs.email``; this module adapts a
job to them and owns the queue side: the domain sits above the worker and uses its
handler interface (``worker.runner.Handler``, ``JobContext``) and ``worker.queue``;
the worker never imports the domain (the composition root hands these handlers to
it: ``briefs.app.services``). The
generator calls two hooks inside its own transactions, on its connection: one
publishes the job's progress (``worker.queue.set_progress`` with the job's
fencing token — what ``JobContext.progress()`` does, without a transaction of its
own), the other inserts the follow-up jobs with ``worker.queue.enqueue`` in the
brief's final transaction, so a brief is never marked done without its email job.

One ``LLMClient`` is shared by every job of the process (``services["llm"]``,
created on first use; the worker closes services with ``aclose`` when it stops),
so its process-wide limits apply across briefs.

While the client's LLM circuit is open (:mod:`briefs.circuit`), a brief whose ``notify_at`` is far
enough away — more than the brief's own time budget plus :data:`DEFER_MARGIN` — is deferred
(:func:`defer_delay`): the job raises :class:`~briefs.errors.Defer` (the worker gives its attempt back), to run
again when the circuit's next probe is due (or, for a circuit with no automatic probe, when the brief
must be written to be on time). A brief that would otherwise be late is written now, without the
LLM, and marked so (:mod:`briefs.generator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from briefs import email as brief_email
from briefs import generator
from briefs.circuit import CircuitState
from briefs.contract import BRIEF_JOB, EMAIL_JOB, BriefRequest, EmailRequest
from briefs.errors import Defer, is_permanent
from briefs.llm import LLMClient
from worker import queue
from worker.runner import Handler, JobContext

log = logging.getLogger(__name__)

# The SMTP exchange is cut at briefs.email.SEND_BUDGET (90 s); the claim and the record are short transactions.
EMAIL_TIMEOUT = 120.0
# The brief's own deadline ends this much before the job's (BRIEFS_JOB_TIMEOUT), so that a brief that runs
# out of time fails through the handler (which, on the last attempt, marks the brief failed with the reason)
# rather than by the worker's cancellation (which would leave it "processing" for ever).
GIVE_UP_MARGIN = 5.0  # seconds, at most a tenth of the job's timeout


ABANDON_CHECK_TIMEOUT = 5.0  # seconds for the check (and mark) when the job was stopped from outside
# While the LLM circuit is open, a brief is deferred only if, after the retry, there is still the brief's budget
# plus this margin before its notify_at; otherwise it is written now, without the LLM, to be on time.
DEFER_MARGIN = 60.0
MIN_DEFER = 5.0  # seconds: a shorter deferral is not worth a round trip through the queue

def brief_budget(job_timeout: float) -> float:
    return job_timeout - min(GIVE_UP_MARGIN, job_timeout / 10)


def warn_if_email_unusable(settings: Any) -> bool:
    """At startup: say once, as an error, when email is configured but its settings cannot work.

    Each ``send_brief_email`` job checks them again and fails permanently naming the setting;
    without this line the first sign of a typo in BRIEFS_SMTP_URL or BRIEFS_EMAIL_FROM was a
    day's worth of failed jobs. The worker still starts: briefs are made without email.
    Returns whether email is usable (or deliberately off).
    """
    if not (settings.smtp_url and settings.smtp_url.get_secret_value()):
        return True
    try:
        brief_email.EmailConfig.from_settings(settings)
    except Exception as exc:  # PermanentError naming the setting; anything else is as unusable
        log.error("email is configured but cannot work: %s. Every email job will fail until this is fixed "
                  "(then `briefs retry --failed`)", exc)
        return False
    return True


def llm_client(ctx: JobContext) -> LLMClient:
    client = ctx.services.get("llm")
    if client is None:
        client = ctx.services["llm"] = LLMClient(ctx.settings)
    return client


def defer_delay(state: CircuitState, notify_at: datetime | None, now: float, budget: float) -> float | None:
    """Seconds to defer a brief while its circuit is open, or None to write it now (deterministically).

    ``now`` is epoch seconds. The brief can wait while ``notify_at`` is more than ``budget`` (the time a
    brief may take) + :data:`DEFER_MARGIN` away; it waits until the circuit's next probe, or, when the
    circuit has none (401/403: open until reset), until it must be written to be on time.
    """
    if notify_at is None:
        return None
    spare = notify_at.timestamp() - now - budget - DEFER_MARGIN
    if spare < MIN_DEFER:
        return None
    wait = state.next_probe_at - now if state.next_probe_at is not None else spare
    return max(MIN_DEFER, min(wait, spare))


async def defer(ctx: JobContext, request: BriefRequest, llm: LLMClient) -> None:
    """Raise :class:`Defer` (the worker gives the attempt back) when the circuit is open and the brief can wait."""
    if llm.circuit is None:
        return
    state = await llm.circuit.refresh(ctx.db)
    if not llm.circuit.breaker.blocked():
        return
    delay = defer_delay(state, request.notify_at, time.time(), brief_budget(ctx.settings.job_timeout))
    if delay is None:
        return
    raise Defer(f"deferred {delay:.0f}s, attempt not spent: the LLM circuit is {state.describe()}", delay=delay)


def settings_enqueue_hook(settings: Any) -> generator.EnqueueHook:
    """:func:`enqueue_hook` with this process's ``BRIEFS_MAX_ATTEMPTS`` and ``BRIEFS_MAX_PAYLOAD_BYTES``."""
    return enqueue_hook(settings.max_attempts, settings.max_payload_bytes)


def enqueue_hook(max_attempts: int, max_payload_bytes: int = queue.DEFAULT_MAX_PAYLOAD_BYTES) -> generator.EnqueueHook:
    """The generator's (and the CLI's) enqueue hook: follow-up jobs in one bulk insert, on the caller's
    connection and so in the caller's transaction. Pass ``settings.max_payload_bytes``: a follow-up over it
    is refused by the queue (and logged there), the others go in."""

    async def enqueue(conn: queue.Conn, follow_ups: Sequence[generator.FollowUp]) -> list[int | None]:
        ids = await queue.enqueue_many(
            conn,
            [
                queue.NewJob(
                    job_type=f.job_type,
                    payload=f.payload,
                    priority=f.priority,
                    run_at=f.run_at,
                    dedup_key=f.dedup_key,
                    user_id=f.user_id,
                    notify_at=f.notify_at,
                )
                for f in follow_ups
            ],
            default_max_attempts=max_attempts,
            max_payload_bytes=max_payload_bytes,
        )
        for f, new_id in zip(follow_ups, ids, strict=True):
            log.info("enqueued %s for user %s: %s", f.job_type, f.user_id,
                     f"job {new_id}" if new_id else "already pending")
        return ids

    return enqueue


async def generate_daily_brief(ctx: JobContext) -> dict[str, Any]:
    job = ctx.job
    request = BriefRequest.from_payload(job.payload, user_id=job.user_id, notify_at=job.notify_at)

    enqueue = settings_enqueue_hook(ctx.settings)

    async def progress(conn: queue.Conn, data: dict[str, Any]) -> None:
        # What ctx.progress() does, inside the generator's own transaction (no extra round trip).
        await queue.set_progress(conn, job.id, job.token, data)

    budget = brief_budget(ctx.settings.job_timeout)
    llm = llm_client(ctx) if ctx.settings.llm_enabled else None
    if llm is not None:
        await defer(ctx, request, llm)
    try:
        try:
            async with asyncio.timeout(budget):
                outcome = await generator.generate(
                    ctx.db,
                    ctx.settings,
                    request,
                    llm=llm,
                    progress=progress,
                    enqueue=enqueue,
                )
        except TimeoutError:
            limit = ctx.settings.job_timeout
            raise TimeoutError(f"the brief took longer than {budget:g}s "
                               f"(BRIEFS_JOB_TIMEOUT {limit:g}s less a margin to record it)") from None
    except asyncio.CancelledError:
        # Stopped from outside: shutdown (the job goes back to pending: the brief is resumed), a lost lease
        # (rescued: retried, or failed when its attempts are used up) or `briefs cancel`. When the job
        # will not run again, say so on the brief instead of leaving it "processing" for ever.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(_fail_if_abandoned(ctx, request))
        raise
    except Exception as exc:
        if is_permanent(exc) or job.attempts >= job.max_attempts:
            # The job gives up: say so on the brief instead of leaving it "processing" forever.
            try:
                await generator.mark_failed(ctx.db, request, f"{type(exc).__name__}: {exc}")
            except Exception:
                log.warning("could not mark the brief failed", exc_info=True)
        raise
    return outcome.result()


async def _fail_if_abandoned(ctx: JobContext, request: BriefRequest) -> None:
    """Mark the brief failed when its job, stopped from outside, is finished for good (cancelled or failed)."""
    async with asyncio.timeout(ABANDON_CHECK_TIMEOUT):
        async with ctx.db.raw() as conn:
            row = await queue.outcome(conn, ctx.job.id)
        if row is not None and row[0] in ("cancelled", "failed"):
            await generator.mark_failed(ctx.db, request, f"job {ctx.job.id} {row[0]}: {row[1] or 'no reason given'}")


async def send_brief_email(ctx: JobContext) -> dict[str, Any]:
    # A payload that is not an object, an id out of range or a bad date fails once, permanently (PermanentError).
    request = EmailRequest.from_payload(ctx.job.payload, user_id=ctx.job.user_id)
    return await brief_email.send_brief_email(ctx.db, ctx.settings, request, now=datetime.now(UTC))


HANDLERS: dict[str, Handler] = {
    BRIEF_JOB: Handler(generate_daily_brief),
    EMAIL_JOB: Handler(send_brief_email, timeout=EMAIL_TIMEOUT),
}
