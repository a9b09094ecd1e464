"""``/api/v1/users/{id}/briefs``: queue a brief (the rules of ``briefs enqueue``, one implementation:
:func:`briefs.service.queue_brief`), list a user's briefs, read one, and its email exactly as sent
(built by :mod:`briefs.email` as the email job builds it)."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, date, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import SecretStr

from briefs import email as mail
from briefs.errors import PermanentError
from briefs.jobs import settings_enqueue_hook
from briefs.service import BadRequest, NotFound, load_brief_markdown, queue_brief
from briefs.smtp import SmtpTarget
from briefs.web import queries
from briefs.web.api_jobs import Cursor, Limit, bad_cursor
from briefs.web.problems import Problem
from briefs.web.schemas import BriefCreate, BriefDetail, BriefPage, BriefQueued, problems
from briefs.web.security import EMAIL_CSP
from briefs.web.state import web

router = APIRouter(tags=["briefs"], responses=problems(401, 403, 422))


def brief_url(user_id: int, day: date | str) -> str:
    return f"/api/v1/users/{user_id}/briefs/{day.isoformat() if isinstance(day, date) else day}"


@router.post("/users/{user_id}/briefs", summary="Queue a brief now (202, Location: the job); 409 when it "
             "exists (brief_url) or is already queued (job_id)", status_code=202, response_model=BriefQueued,
             responses=problems(404, 409))
async def create_brief(request: Request, user_id: int, body: BriefCreate | None = None) -> JSONResponse:
    body = body or BriefCreate.model_validate({})
    state = web(request)
    if not queries.is_bigint(user_id):
        raise Problem(404, f"no user with id {user_id}")
    try:
        done = await queue_brief(state.db, state.settings, user_id, body.date, force=body.force,
                                 enqueue=settings_enqueue_hook(state.settings), resend_email=body.resend_email)
    except NotFound as exc:
        raise Problem(404, str(exc)) from None
    except BadRequest as exc:
        raise Problem(422, str(exc), errors=[{"field": "body.date", "message": str(exc)}]) from None
    if done.existing_status is not None:
        raise Problem(409, f"{done.line()}", brief_url=brief_url(user_id, done.brief_date),
                      brief_status=done.existing_status)
    if done.duplicate:
        raise Problem(409, done.line(), job_id=done.live_job_id, job_status=done.live_job_status,
                      job_url=f"/api/v1/jobs/{done.live_job_id}" if done.live_job_id is not None else None)
    assert done.job_id is not None
    job_url = f"/api/v1/jobs/{done.job_id}"
    body_out = {"job_id": done.job_id, "brief_date": done.brief_date.isoformat(), "job_url": job_url,
                "brief_url": brief_url(user_id, done.brief_date)}
    return JSONResponse(body_out, 202, headers={"Location": job_url})


@router.get("/users/{user_id}/briefs", summary="A user's briefs, newest first (keyset on the date)",
            response_model=BriefPage, responses=problems(404))
async def list_briefs(request: Request, user_id: int, limit: Limit = queries.DEFAULT_LIMIT,
                      cursor: Cursor = None) -> dict[str, Any]:
    db = web(request).db
    try:
        queries.decode_cursor(cursor)
        if not await queries.user_exists(db, user_id):
            raise Problem(404, f"no user with id {user_id}")
        page = await queries.list_briefs(db, user_id, limit=limit, cursor=cursor)
    except queries.BadCursor as exc:
        raise bad_cursor(exc) from None
    return {"items": page.items, "next_cursor": page.next_cursor}


async def _brief_or_404(request: Request, user_id: int, day: date) -> dict[str, Any]:
    db = web(request).db
    brief = await queries.get_brief(db, user_id, day)
    if brief is None:
        if not await queries.user_exists(db, user_id):
            raise Problem(404, f"no user with id {user_id}")
        raise Problem(404, f"user {user_id} has no brief for {day.isoformat()}")
    return brief


@router.get("/users/{user_id}/briefs/{brief_date}", summary="One brief: status, progress, subject, summary "
            "Markdown, per-project sections, tokens, model, timestamps", response_model=BriefDetail,
            responses=problems(404))
async def get_brief(request: Request, user_id: int, brief_date: date) -> dict[str, Any]:
    brief = await _brief_or_404(request, user_id, brief_date)
    brief["summary_markdown"] = await load_brief_markdown(web(request).db, user_id, brief_date)
    brief.pop("has_markdown", None)
    return brief


_PREVIEW_KEY = SecretStr(secrets.token_urlsafe(32))  # without BRIEFS_SECRET_KEY: links signed, never valid


def preview_config(settings: Any) -> mail.EmailConfig:
    """The email job's configuration; when email is not configured (no SMTP URL or secret key), the same
    rendering with what is set: the message is built as it would be, nothing can be sent from it."""
    try:
        return mail.EmailConfig.from_settings(settings)
    except PermanentError:
        pass
    try:
        sender = mail.check_sender(settings.email_from)
    except PermanentError:
        sender = mail.check_sender("briefs@localhost")
    try:
        public_url = mail.check_public_url(settings.public_url)
    except PermanentError:
        public_url = None
    return mail.EmailConfig(SmtpTarget("localhost", 25, None), sender, settings.secret_key or _PREVIEW_KEY,
                            public_url, mail.Limits.from_settings(settings))


async def _email(request: Request, user_id: int, day: date) -> mail.Email:
    """The brief's email as the email job builds it (:func:`briefs.email.load`, ``load_sections``,
    ``build_email``); 404 without the brief, 409 while it is written or when it has nothing to send."""
    state = web(request)
    config = preview_config(state.settings)
    async with state.db.raw() as conn:
        brief = await mail.load(conn, user_id, day, lock=False, sections=False) if queries.is_bigint(user_id) \
            else None
        if brief is not None and brief.status in ("completed", "partial"):
            brief = await mail.load_sections(conn, brief, config.limits)
    if brief is None:
        await _brief_or_404(request, user_id, day)
        raise Problem(404, f"user {user_id} has no brief for {day.isoformat()}")
    if brief.status == "processing":
        raise Problem(409, f"the brief for {day.isoformat()} is still being written; try again when it is done")
    if brief.status not in ("completed", "partial"):
        raise Problem(409, f"the brief for {day.isoformat()} is {brief.status}: it has no email")
    try:
        return await asyncio.to_thread(mail.build_email, config, brief, datetime.now(UTC))
    except PermanentError as exc:
        raise Problem(409, f"this brief's email cannot be built: {exc}") from None


_FRAMED = {"Content-Security-Policy": EMAIL_CSP, "X-Frame-Options": "SAMEORIGIN"}


@router.get("/users/{user_id}/briefs/{brief_date}/email.html", summary="The brief's email, its HTML part "
            "exactly as sent (sandboxed: framed by the console only)", response_class=HTMLResponse,
            responses=problems(404, 409))
async def email_html(request: Request, user_id: int, brief_date: date) -> Response:
    built = await _email(request, user_id, brief_date)
    return HTMLResponse(built.html, headers=dict(_FRAMED))


@router.get("/users/{user_id}/briefs/{brief_date}/email.txt", summary="The brief's email, its text part "
            "exactly as sent", response_class=PlainTextResponse, responses=problems(404, 409))
async def email_text(request: Request, user_id: int, brief_date: date) -> Response:
    built = await _email(request, user_id, brief_date)
    return PlainTextResponse(built.text, headers=dict(_FRAMED))


