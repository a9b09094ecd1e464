"""``/api/v1/users``: users, their brief preference and schedule.

A change of timezone or preference reconciles the user's pending scheduler jobs at once through
:meth:`briefs.web.state.WebState.after_preference_change` (the scheduler's own tick for that user:
one implementation of moving and cancelling).
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from briefs.contract import InvalidTimezone
from briefs.web import queries
from briefs.web.api_jobs import Cursor, Limit, bad_cursor
from briefs.web.problems import Problem
from briefs.web.schemas import (
    PreferencePut,
    PreferenceResult,
    Schedule,
    Text,
    UserCreate,
    UserDetail,
    UserPage,
    UserPatch,
    problems,
)
from briefs.web.state import web
from scheduler.plan import MAX_UPCOMING_DAYS, Preference, upcoming

router = APIRouter(tags=["users"], responses=problems(401, 403, 422))


async def user_or_404(request: Request, user_id: int) -> dict[str, Any]:
    user = await queries.get_user(web(request).db, user_id)
    if user is None:
        raise Problem(404, f"no user with id {user_id}")
    return user


@router.get("/users", summary="List users by id; `query` matches an id, or the start of an email or name",
            response_model=UserPage)
async def list_users(
    request: Request,
    query: Annotated[Text | None, Query(max_length=320)] = None,
    limit: Limit = queries.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    try:
        page = await queries.list_users(web(request).db, query=query, limit=limit, cursor=cursor)
    except queries.BadCursor as exc:
        raise bad_cursor(exc) from None
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.post("/users", summary="Create a user (201, Location: the user)", status_code=201,
             response_model=UserDetail, responses=problems(409))
async def create_user(request: Request, body: UserCreate) -> JSONResponse:
    try:
        async with web(request).db.raw() as conn:
            cur = await conn.execute(
                "INSERT INTO users (name, email, timezone) VALUES (%s, %s, %s) RETURNING id",
                (body.name, body.email, body.timezone),
            )
            row = await cur.fetchone()
    except psycopg.errors.UniqueViolation:
        raise Problem(409, "a user with this email already exists") from None
    assert row is not None
    (user_id,) = row
    user = UserDetail.model_validate(await user_or_404(request, user_id))
    return JSONResponse(user.model_dump(mode="json"), 201, headers={"Location": f"/api/v1/users/{user_id}"})


@router.get("/users/{user_id}", summary="One user: preference, engagement, latest brief, last visit",
            response_model=UserDetail, responses=problems(404))
async def get_user(request: Request, user_id: int) -> dict[str, Any]:
    return await user_or_404(request, user_id)


_PATCH = """
UPDATE users SET name = CASE WHEN %(set_name)s THEN %(name)s ELSE name END,
                 email = CASE WHEN %(set_email)s THEN %(email)s ELSE email END,
                 timezone = CASE WHEN %(set_timezone)s THEN %(timezone)s ELSE timezone END
WHERE id = %(id)s
RETURNING id
"""


@router.patch("/users/{user_id}", summary="Change a user's name, email or timezone (a timezone change "
              "reconciles their pending scheduled jobs)", response_model=UserDetail, responses=problems(404, 409))
async def patch_user(request: Request, user_id: int, body: UserPatch) -> dict[str, Any]:
    given = body.model_fields_set
    if not given:
        raise Problem(422, "give at least one of name, email, timezone", errors=[
            {"field": "body", "message": "give at least one of name, email, timezone"}])
    await user_or_404(request, user_id)
    params = {"id": user_id, **{f"set_{k}": k in given for k in ("name", "email", "timezone")},
              **body.model_dump()}
    try:
        async with web(request).db.raw() as conn:
            cur = await conn.execute(_PATCH, params)
            found = await cur.fetchone() is not None
    except psycopg.errors.UniqueViolation:
        raise Problem(409, "a user with this email already exists") from None
    if not found:
        raise Problem(404, f"no user with id {user_id}")
    reconciled = None
    if "timezone" in given:
        reconciled = await web(request).after_preference_change(user_id)
    user = await user_or_404(request, user_id)
    user["reconciliation"] = reconciled
    return user


_UPSERT = """
INSERT INTO brief_preferences AS p (user_id, frequency, day_of_week, time_of_day, is_active, email_enabled)
VALUES (%(user)s, %(frequency)s, %(day_of_week)s, %(time_of_day)s, %(is_active)s, %(email_enabled)s)
ON CONFLICT (user_id) DO UPDATE
SET frequency = EXCLUDED.frequency, day_of_week = EXCLUDED.day_of_week, time_of_day = EXCLUDED.time_of_day,
    is_active = EXCLUDED.is_active, email_enabled = EXCLUDED.email_enabled, updated_at = now()
"""


@router.put("/users/{user_id}/preference", summary="Set a user's brief preference; their pending scheduled "
            "jobs are moved, cancelled or enqueued to match at once", response_model=PreferenceResult,
            responses=problems(404))
async def put_preference(request: Request, user_id: int, body: PreferencePut) -> dict[str, Any]:
    await user_or_404(request, user_id)
    params = {"user": user_id, **body.model_dump(), "time_of_day": time.fromisoformat(body.time_of_day)}
    try:
        async with web(request).db.raw() as conn:
            await conn.execute(_UPSERT, params)
    except psycopg.errors.ForeignKeyViolation:
        raise Problem(404, f"no user with id {user_id}") from None
    reconciled = await web(request).after_preference_change(user_id)
    user = await user_or_404(request, user_id)
    return {"preference": user["preference"], "reconciliation": reconciled}


@router.get("/users/{user_id}/schedule", summary="A user's coming briefs: local and UTC times, and what DST "
            "did to each", response_model=Schedule, responses=problems(404, 409))
async def get_schedule(
    request: Request, user_id: int,
    days: Annotated[int, Query(ge=1, le=MAX_UPCOMING_DAYS, description="how many days ahead, 1..366")] = 7,
) -> dict[str, Any]:
    user = await queries.preference_of(web(request).db, user_id)
    if user is None:
        raise Problem(404, f"no user with id {user_id}")
    out: dict[str, Any] = {"user_id": user_id, "timezone": user["timezone"], "days": days, "entries": [],
                           "reason": None}
    pref = user["preference"]
    if pref is None:
        return {**out, "reason": "the user has no brief preference: no brief is scheduled"}
    if not pref["is_active"]:
        return {**out, "reason": "the user's brief preference is inactive: no brief is scheduled"}
    plan = Preference(user_id, user["timezone"], pref["frequency"], pref["day_of_week"], pref["time_of_day"])
    try:
        listed = upcoming(plan, datetime.now(UTC), days)
    except (InvalidTimezone, ValueError) as exc:
        raise Problem(409, f"user {user_id}'s schedule cannot be computed: {exc}") from None
    out["entries"] = [
        {"brief_date": u.brief_date, "local_time": u.local_time, "notify_at": u.notify_at,
         "utc_offset": _offset(u.utc_offset), "utc_offset_s": int(u.utc_offset.total_seconds()), "dst": u.dst,
         "shifted_by_s": int(u.shifted_by.total_seconds()) if u.shifted_by is not None else None}
        for u in listed
    ]
    return out


def _offset(offset: timedelta) -> str:
    """``+05:30``, ``-04:00``."""
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    return f"{sign}{hours:02d}:{rest // 60:02d}"
