"""The API's request and response bodies (pydantic), with the same rules the rest of briefs applies.

A timezone is valid exactly when :func:`briefs.contract.load_timezone` accepts it; an email address
exactly when :func:`briefs.email.check_recipient` does (email-validator, no DNS). A validator's
message names what is wrong, never echoes a long or hostile input whole.
"""

from __future__ import annotations

import datetime as dt
import re
from datetime import datetime, time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from briefs.contract import InvalidTimezone, load_timezone
from briefs.email import check_recipient
from briefs.errors import PermanentError

NAME_MAX = 200
_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?", re.ASCII)

Instant = datetime | str | None  # a value Python cannot hold ('infinity') comes as PostgreSQL's text


def no_nul(value: str) -> str:
    """Text PostgreSQL can take (a query parameter): no NUL character."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(no_nul)]


def check_timezone(value: Any) -> str:
    try:
        load_timezone(value)
    except InvalidTimezone as exc:
        raise ValueError(str(exc)) from None
    assert isinstance(value, str)
    return value


def check_email(value: Any) -> str:
    try:
        return check_recipient(value)
    except PermanentError as exc:
        raise ValueError(str(exc).replace("the user's email address", "the address")) from None


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= NAME_MAX:
        raise ValueError(f"name must be 1 to {NAME_MAX} characters")
    if not value.isprintable() or not value.strip():
        raise ValueError("name must be printable characters (no control characters or line breaks), not blank")
    return value


def parse_time_of_day(value: Any) -> time:
    """``HH:MM`` or ``HH:MM:SS``, 00:00 to 23:59:59 (24:00 is refused: it is the next day's 00:00)."""
    if isinstance(value, str) and (match := _TIME.fullmatch(value)):
        return time(int(match[1]), int(match[2]), int(match[3] or 0))
    raise ValueError("time_of_day must be HH:MM or HH:MM:SS, from 00:00 to 23:59:59")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _UserFields(_Body):
    """The checks of a user's fields, for creating and for changing one (an explicit null is refused)."""

    @field_validator("name", mode="before", check_fields=False)
    @classmethod
    def _name(cls, value: Any) -> Any:
        return check_name(value)

    @field_validator("email", mode="before", check_fields=False)
    @classmethod
    def _email(cls, value: Any) -> Any:
        return check_email(value)

    @field_validator("timezone", mode="before", check_fields=False)
    @classmethod
    def _timezone(cls, value: Any) -> Any:
        return check_timezone(value)


class UserCreate(_UserFields):
    name: str = Field(description=f"1 to {NAME_MAX} printable characters")
    email: str = Field(description="one address (email-validator's rules, no DNS lookup)")
    timezone: str = Field("UTC", description="an IANA tz database name, e.g. Europe/Paris (case-sensitive)")


class UserPatch(_UserFields):
    name: str | None = Field(None, description=f"1 to {NAME_MAX} printable characters")
    email: str | None = Field(None, description="one address")
    timezone: str | None = Field(None, description="an IANA tz database name")


class PreferencePut(_Body):
    frequency: Literal["daily", "weekly"]
    day_of_week: StrictInt | None = Field(None, ge=1, le=7, validate_default=True,
                                          description="ISO weekday 1 (Monday) .. 7, exactly for weekly")
    time_of_day: str = Field(description="local wall time HH:MM[:SS]", examples=["08:00"])
    is_active: StrictBool = True
    email_enabled: StrictBool = False

    @field_validator("day_of_week")
    @classmethod
    def _weekday_for_weekly(cls, value: int | None, info: ValidationInfo) -> int | None:
        frequency = info.data.get("frequency")
        if frequency == "weekly" and value is None:
            raise ValueError("day_of_week (1..7) is required for a weekly preference")
        if frequency == "daily" and value is not None:
            raise ValueError("day_of_week is only for a weekly preference")
        return value

    @field_validator("time_of_day", mode="before")
    @classmethod
    def _time(cls, value: Any) -> str:
        return parse_time_of_day(value).isoformat()


class BriefCreate(_Body):
    date: dt.date | None = Field(None, description="the brief date (default: the user's today)")
    force: StrictBool = Field(False, description="queue even if the brief exists or the date is out of range")
    resend_email: StrictBool = Field(False, description="with force: email the regenerated brief again")


# --------------------------------------------------------------------------- responses


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobSummary(_Out):
    id: int
    job_type: str
    status: str
    priority: int
    attempts: int
    max_attempts: int
    run_at: Instant
    user_id: int | None
    dedup_key: str | None
    locked_by: str | None
    last_error: str | None = Field(description="the first 500 characters")
    started_at: Instant
    finished_at: Instant
    created_at: Instant
    updated_at: Instant


class JobDetail(JobSummary):
    notify_at: Instant
    lease_expires_at: Instant
    heartbeat_at: Instant
    payload: Any
    result: Any
    progress: Any


class JobPage(_Out):
    items: list[JobSummary]
    next_cursor: str | None = Field(description="pass back as `cursor` for the next page; null at the end")


class RetryResult(_Out):
    retried: list[int]


class CancelResult(_Out):
    id: int
    status: str


class Preference(_Out):
    frequency: str | None
    day_of_week: int | None
    time_of_day: time | str | None
    is_active: bool | None
    email_enabled: bool | None
    updated_at: Instant


class User(_Out):
    id: int
    email: str
    name: str | None
    timezone: str
    last_visit_at: Instant
    created_at: Instant
    preference: Preference | None


class UserDetail(User):
    latest_brief: dict[str, Any] | None
    engagement: dict[str, Any]


class UserPage(_Out):
    items: list[User]
    next_cursor: str | None


class PreferenceResult(_Out):
    preference: Preference
    reconciliation: dict[str, Any] = Field(description="what the one-user tick did: moved, cancelled, enqueued")


class ScheduleEntry(_Out):
    brief_date: dt.date
    local_time: time
    notify_at: datetime
    utc_offset: str
    utc_offset_s: int
    dst: str | None
    shifted_by_s: int | None


class Schedule(_Out):
    user_id: int
    timezone: str
    days: int
    entries: list[ScheduleEntry]
    reason: str | None


class BriefQueued(_Out):
    job_id: int
    brief_date: dt.date
    job_url: str


class BriefSummary(_Out):
    brief_date: str
    status: str
    subject: str | None
    engagement_stage: str | None
    prompt_tokens: int
    completion_tokens: int
    completed_at: Instant
    email_sent_at: Instant


class BriefPage(_Out):
    items: list[BriefSummary]
    next_cursor: str | None


class BriefDetail(BriefSummary):
    summary_markdown: str | None
    executive_summary: str | None
    progress: Any
    priority_actions: Any
    error: str | None
    model: str | None
    sections: list[dict[str, Any]]


class ProblemDetails(BaseModel):
    """An error (RFC 9457), sent as ``application/problem+json``."""

    type: str = Field(description="a link to the problem type in /api/docs")
    title: str
    status: int
    detail: str
    instance: str
    errors: list[dict[str, str]] | None = Field(None, description="validation only: one {field, message} each")


_PROBLEM_WHEN = {
    401: "no admin token and no console session",
    403: "a console session without its CSRF token",
    404: "no such job, user or brief",
    409: "the state forbids it: `detail` says why",
    422: "an invalid field: `errors` names each",
    503: "unavailable for now",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problems a route may answer with."""
    schema = ProblemDetails.model_json_schema()
    return {
        code: {
            "description": _PROBLEM_WHEN.get(code, "a problem"),
            "content": {"application/problem+json": {"schema": schema}},  # the media type the API sends
        }
        for code in codes
    }
