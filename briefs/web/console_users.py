"""The console's users: search and keyset pages, one user's page (preference form, coming briefs, their
briefs), saving the preference and making a brief now.

Every change goes through the API's own route functions (:mod:`briefs.web.api_users`,
:mod:`briefs.web.api_briefs`) and schemas (:mod:`briefs.web.schemas`): one set of rules and one
implementation for the API and the console. A form that breaks a rule is drawn again, 422, with each
error next to its field and what was typed kept.
"""

from __future__ import annotations

from datetime import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from briefs.web import api_briefs, api_users, queries
from briefs.web.console_common import page_href, redirect, render
from briefs.web.problems import Problem
from briefs.web.schemas import BriefCreate, PreferencePut, UserPatch
from briefs.web.session import require_form, require_page
from briefs.web.state import web
from scheduler.plan import FOLD_FIRST, GAP_SHIFTED

router = APIRouter(include_in_schema=False)

WEEKDAYS = tuple(enumerate(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"), 1))
FORM_FIELDS = ("timezone", "frequency", "day_of_week", "time_of_day")


def time_text(value: object) -> str:
    """A wall time as ``HH:MM`` (``HH:MM:SS`` when it has seconds); anything else as its text."""
    if isinstance(value, time):
        return value.strftime("%H:%M:%S" if value.second else "%H:%M")
    return "-" if value is None else str(value)[:20]


def dst_note(entry: dict[str, Any]) -> str:
    if entry.get("dst") == GAP_SHIFTED:
        minutes = (entry.get("shifted_by_s") or 0) // 60
        return f"the time falls in the spring-forward gap that day: moved {minutes} minutes later"
    if entry.get("dst") == FOLD_FIRST:
        return "the time happens twice that day (clocks go back): the first one"
    return ""


@router.get("/users", dependencies=[Depends(require_page)])
async def users_page(request: Request, query: str = "", cursor: str = "") -> Response:
    query, error = query.strip()[:320], None
    try:
        page = await queries.list_users(web(request).db, query=query or None, cursor=cursor or None)
    except queries.BadCursor as exc:
        page, error, cursor = queries.Page(), str(exc), ""
    next_href = page_href("/users", {"query": query, "cursor": page.next_cursor}) if page.next_cursor else None
    return render(request, "users.html", page=page, query=query, cursor=cursor, error=error, next_href=next_href,
                  first_href=page_href("/users", {"query": query}), time_text=time_text)


def _form_of(user: dict[str, Any]) -> dict[str, Any]:
    """The preference form as stored (the defaults a new preference gets when there is none)."""
    pref = user.get("preference") or {}
    day = pref.get("day_of_week")
    return {
        "timezone": str(user.get("timezone") or ""),
        "frequency": pref.get("frequency") or "daily",
        "day_of_week": "" if day is None else str(day),
        "time_of_day": time_text(pref.get("time_of_day") or time(8, 0)),
        "is_active": bool(pref.get("is_active", True)),
        "email_enabled": bool(pref.get("email_enabled", False)),
    }


async def _schedule(request: Request, user: dict[str, Any]) -> dict[str, Any]:
    try:
        return await api_users.get_schedule(request, int(user["id"]), days=7)
    except Problem as exc:
        return {"timezone": user.get("timezone"), "entries": [], "reason": exc.detail}


async def _user_page(request: Request, user: dict[str, Any], status: int = 200, *, form: dict[str, Any] | None = None,
                     errors: dict[str, str] | None = None, error: str | None = None) -> Response:
    uid = int(user["id"])
    cursor = request.query_params.get("briefs_cursor") or None
    try:
        briefs = await queries.list_briefs(web(request).db, uid, limit=30, cursor=cursor)
    except queries.BadCursor:
        briefs = await queries.list_briefs(web(request).db, uid, limit=30)
    next_href = page_href(f"/users/{uid}", {"briefs_cursor": briefs.next_cursor}) if briefs.next_cursor else None
    return render(request, "user.html", status, user=user, form=form or _form_of(user), errors=errors or {},
                  error=error, schedule=await _schedule(request, user), briefs=briefs, briefs_next_href=next_href,
                  weekdays=WEEKDAYS, time_text=time_text, dst_note=dst_note)


@router.get("/users/{user_id}", dependencies=[Depends(require_page)])
async def user_page(request: Request, user_id: int) -> Response:
    return await _user_page(request, await api_users.user_or_404(request, user_id))


def _submitted(form: FormData) -> dict[str, Any]:
    values: dict[str, Any] = {name: str(form.get(name) or "")[:200] for name in FORM_FIELDS}
    values["is_active"] = form.get("is_active") == "true"
    values["email_enabled"] = form.get("email_enabled") == "true"
    return values


def _errors_of(model: type[BaseModel], data: dict[str, Any]) -> dict[str, str]:
    """The model's rules applied to ``data``: {field: the first message}, empty when valid."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        errors: dict[str, str] = {}
        for item in exc.errors():
            field = str(item["loc"][0]) if item.get("loc") else "form"
            errors.setdefault(field if field in FORM_FIELDS else "form", item["msg"].removeprefix("Value error, "))
        return errors
    return {}


def _preference_body(values: dict[str, Any]) -> dict[str, Any]:
    day = values["day_of_week"]
    return {"frequency": values["frequency"], "day_of_week": int(day) if day.isdigit() else (day or None),
            "time_of_day": values["time_of_day"], "is_active": values["is_active"],
            "email_enabled": values["email_enabled"]}


@router.post("/users/{user_id}/preference", dependencies=[Depends(require_form)])
async def save_preference(request: Request, user_id: int) -> Response:
    user = await api_users.user_or_404(request, user_id)
    values = _submitted(await request.form())
    body = _preference_body(values)
    errors = {**_errors_of(UserPatch, {"timezone": values["timezone"]}), **_errors_of(PreferencePut, body)}
    if errors:
        return await _user_page(request, user, 422, form=values, errors=errors)
    if values["timezone"] != user["timezone"]:
        await api_users.patch_user(request, user_id, UserPatch.model_validate({"timezone": values["timezone"]}))
    await api_users.put_preference(request, user_id, PreferencePut.model_validate(body))
    return redirect(f"/users/{user_id}", "saved")


@router.post("/users/{user_id}/briefs", dependencies=[Depends(require_form)])
async def make_brief(request: Request, user_id: int) -> Response:
    user = await api_users.user_or_404(request, user_id)
    try:
        await api_briefs.create_brief(request, user_id, BriefCreate.model_validate({}))
    except Problem as exc:
        if exc.status not in (409, 422):
            raise
        return await _user_page(request, user, exc.status, error=exc.detail)
    return redirect(f"/users/{user_id}", "brief_queued")
