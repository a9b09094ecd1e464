"""The brief-job contract: job types, payload schemas, dedup keys, brief dates and time zones.

Everything that makes, reads, deduplicates or inspects a brief job takes its names from here —
the scheduler's tick, ``briefs enqueue``, the generator's follow-up email job, the handlers that
run them, the engagement history query and the metrics — so they cannot drift apart:

* job types :data:`BRIEF_JOB` and :data:`EMAIL_JOB`;
* payloads: :class:`BriefPayload` and :class:`EmailPayload` (pydantic, strict: a wrong type is
  refused, never coerced), read into :class:`BriefRequest` / :class:`EmailRequest`; a payload
  that does not validate is a :class:`~briefs.errors.PermanentError` naming the field;
* dedup keys ``brief:<user_id>:<YYYY-MM-DD>`` and ``email:<user_id>:<YYYY-MM-DD>`` (the table
  contract operators rely on), built, parsed and written as SQL only here;
* the dates a brief can cover, and the one definition of a usable time zone
  (:func:`load_timezone`): the scheduler skips a user whose zone fails it, and ``briefs enqueue``
  and the generator refuse the same users, so no brief is ever written in a zone the scheduler
  would not plan.

Zones come from the pinned ``tzdata`` package, read explicitly here — never from the host's
``/usr/share/zoneinfo``, and without changing the process-wide ``zoneinfo`` search path — so
every machine plans the same instants.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, ValidationError

from briefs.errors import PermanentError

__all__ = [
    "BRIEF_JOB",
    "DELIVERY_PRIORITY",
    "DORMANT",
    "EMAIL_JOB",
    "FIRST_BRIEF_DATE",
    "ISO_DATE_SQL_PATTERN",
    "JOB_TYPES",
    "LAST_BRIEF_DATE",
    "MAX_TIMEZONE_CHARS",
    "MAX_USER_ID",
    "REENGAGE",
    "REENGAGE_LATE",
    "SHOWN_CHARS",
    "STAGES",
    "STANDARD",
    "BriefPayload",
    "BriefRequest",
    "EmailPayload",
    "EmailRequest",
    "InvalidTimezone",
    "brief_date_of_key",
    "brief_dedup_key",
    "brief_key_sql",
    "check_brief_date",
    "email_dedup_key",
    "iso_instant",
    "load_timezone",
    "parse_iso_date",
    "shown",
]

log = logging.getLogger(__name__)

BRIEF_JOB = "generate_daily_brief"
EMAIL_JOB = "send_brief_email"
# The queue priority of the brief jobs the scheduler makes and of every brief's email: one priority, so the
# claim orders them by deadline (their notify_at) alone, and an email due now is never kept waiting behind
# a brief started early for a later time (lower runs first; briefs queued by hand run at 10).
DELIVERY_PRIORITY = 50
JOB_TYPES = (BRIEF_JOB, EMAIL_JOB)

# Engagement stages a brief job's payload may name (``briefs.engagement`` decides which one applies).
STANDARD = "standard"
REENGAGE = "re_engagement"
REENGAGE_LATE = "re_engagement_late"
DORMANT = "dormant_check_in"
STAGES = (STANDARD, REENGAGE, REENGAGE_LATE, DORMANT)

MAX_USER_ID = 2**63 - 1  # users.id is a bigint

# --------------------------------------------------------------------------- shown values


SHOWN_CHARS = 100  # how much of a hostile value a message or log line shows (see shown())


def shown(value: str, limit: int = SHOWN_CHARS, *, length: int | None = None) -> str:
    """A value as a message or log line shows it: repr (one line, control characters escaped), clipped.

    A value longer than ``limit`` characters shows its first ``limit`` and its length, so a 60 KB
    string never reaches a log line or a report reason whole; a repr made long by escapes is clipped too.
    ``length`` is the length of the whole value when ``value`` is only its beginning.
    """
    total = len(value) if length is None else length
    text = repr(value[:limit])
    if len(text) > limit + 2:
        text = text[: limit + 1] + text[0]  # close with the opening quote
    elif total <= limit:
        return text
    return f"{text}… ({total:,} characters)"


def _short(value: Any) -> str:
    return shown(value, 80) if isinstance(value, str) else shown(repr(value), 80)[1:-1]


# --------------------------------------------------------------------------- brief dates


# The dates a brief can cover: its windows reach 7 days back (notes) and 8 days ahead (upcoming tasks, the
# end of the local day) in any timezone; past these, date arithmetic overflows Python's years 1 .. 9999.
FIRST_BRIEF_DATE = date.min + timedelta(days=10)
LAST_BRIEF_DATE = date.max - timedelta(days=10)


def check_brief_date(day: date, what: str = "brief_date") -> None:
    """:class:`PermanentError` (a short reason) for a date no brief can cover."""
    if not FIRST_BRIEF_DATE <= day <= LAST_BRIEF_DATE:
        raise PermanentError(f"{what} {day.isoformat()} is outside the dates a brief can cover "
                             f"({FIRST_BRIEF_DATE.isoformat()} .. {LAST_BRIEF_DATE.isoformat()})")


def parse_iso_date(text: str) -> date | None:
    """The date of exactly ``YYYY-MM-DD`` (ASCII digits, dashes in place), else None.

    ``date.fromisoformat`` alone also reads '20260310' and '2026-W11-2'; the length and dash
    checks leave it only the one form keys and payloads are written in.
    """
    if len(text) != 10 or text[4] != "-" or text[7] != "-" or not text.replace("-", "").isascii():
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def iso_instant(when: datetime) -> str:
    """An instant as payloads carry it: ISO 8601 in UTC with a ``Z`` ("2026-03-10T08:00:00Z")."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- dedup keys


def brief_dedup_key(user_id: int, brief_date: date) -> str:
    """The brief job's key: one live brief job per user and local brief date."""
    return f"brief:{user_id}:{brief_date.isoformat()}"


def email_dedup_key(user_id: int, brief_date: date) -> str:
    return f"email:{user_id}:{brief_date.isoformat()}"


def brief_date_of_key(key: str, user_id: int) -> date | None:
    """The brief date of a key exactly as :func:`brief_dedup_key` writes it for this user, else None."""
    prefix = f"brief:{user_id}:"
    if not key.startswith(prefix):
        return None
    return parse_iso_date(key[len(prefix):])


def brief_key_sql(user_id: str, brief_date: str) -> str:
    """:func:`brief_dedup_key` as a SQL expression over a user id and a date expression."""
    return f"('brief:' || ({user_id}) || ':' || to_char(({brief_date}), 'YYYY-MM-DD'))"


# A payload brief_date a query may compare as text (ISO dates of four-digit years sort like the dates).
ISO_DATE_SQL_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


# --------------------------------------------------------------------------- time zones


# In the tz database's file listing, but not zones a user may pick: "Factory" is the placeholder zone
# ("-00"), "localtime" is the host's /etc/localtime and "posixrules" a compiler default.
_NOT_USER_ZONES = frozenset({"Factory", "localtime", "posixrules"})
# The longest tz database name has 32 characters; anything much longer is not looked up at all.
MAX_TIMEZONE_CHARS = 64


class InvalidTimezone(ValueError):
    """The name is not a usable IANA timezone; the message says which name and why."""


@functools.cache
def _known_zones() -> frozenset[str]:
    """Every zone the tzdata package lists, read once per process from its ``zones`` file."""
    listing = importlib.resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in listing.splitlines() if line.strip()) - _NOT_USER_ZONES


def _refusal(name: object, length: int | None) -> str | None:
    """Why ``name`` is not a zone to look up at all, or None."""
    if not isinstance(name, str):
        return f"timezone of type {type(name).__name__} is not a string"
    if not name.strip():
        return f"timezone {shown(name)} is empty"
    if max(len(name), length or 0) > MAX_TIMEZONE_CHARS:
        return f"timezone {shown(name, 40, length=length)} is too long for a tz database name"
    if name.startswith("/") or ".." in name or "\\" in name or "\x00" in name:
        return f"timezone {shown(name)} looks like a path, not a tz database name"
    if name in _NOT_USER_ZONES:
        return f"timezone {shown(name)} is not a real location zone"
    if name not in _known_zones():
        return f"timezone {shown(name)} is not in the tz database (names are case-sensitive)"
    return None


@functools.lru_cache(maxsize=2048)
def _load(name: str) -> zoneinfo.ZoneInfo:
    resource = importlib.resources.files("tzdata.zoneinfo").joinpath(*name.split("/"))
    with resource.open("rb") as data:
        return zoneinfo.ZoneInfo.from_file(data, key=name)


def load_timezone(name: object, *, length: int | None = None) -> zoneinfo.ZoneInfo:
    """The zone of an exact, case-sensitive IANA name, from the tzdata package; else :class:`InvalidTimezone`.

    One object per name per process, so datetimes of one zone share their ``tzinfo``. ``length`` is
    the stored value's length when ``name`` is only its beginning (a query clipped it).
    """
    problem = _refusal(name, length)
    if problem:
        raise InvalidTimezone(problem)
    assert isinstance(name, str)
    try:
        return _load(name)
    except (OSError, ValueError) as exc:
        raise InvalidTimezone(f"timezone {shown(name)} could not be loaded: {shown(str(exc))}") from exc


# --------------------------------------------------------------------------- payloads


def _positive_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_USER_ID:
        raise ValueError(f"must be a positive integer, got {_short(value)}")
    return value


def _brief_date(value: Any) -> date:
    day = parse_iso_date(value) if isinstance(value, str) else None
    if day is None:
        raise ValueError(f"must be YYYY-MM-DD, got {_short(value)}")
    return day


def _instant(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 string, got {_short(value)}")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"is not ISO 8601: {_short(value)}") from None
    if when.tzinfo is None:
        raise ValueError(f"has no UTC offset: {_short(value)}")
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"is out of range: {_short(value)}") from None


def _stage(value: Any) -> str:
    if value in STAGES:
        return str(value)
    if value:
        log.warning("unknown engagement stage %s; using %r", _short(value), STANDARD)
    return STANDARD


UserId = Annotated[int, BeforeValidator(_positive_id)]
BriefDate = Annotated[date, BeforeValidator(_brief_date)]
Instant = Annotated[datetime | None, BeforeValidator(_instant)]
Stage = Annotated[str, BeforeValidator(_stage)]


class BriefPayload(BaseModel):
    """A ``generate_daily_brief`` job's payload as stored (unknown keys are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    user_id: UserId
    brief_date: BriefDate
    notify_at: Instant = None
    engagement_stage: Stage = STANDARD
    email: StrictBool = False
    catch_up: StrictBool = False
    force: StrictBool = False
    resend_email: StrictBool = False  # with force: mail the regenerated brief even if today's was sent
    source: str | None = None  # "scheduler" on the jobs the scheduler made (the only ones it moves or cancels)


class EmailPayload(BaseModel):
    """A ``send_brief_email`` job's payload as stored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    user_id: UserId
    brief_date: BriefDate
    brief_id: Annotated[int | None, BeforeValidator(lambda v: None if v is None else _positive_id(v))] = None


def _validate(schema: type[BaseModel], job_type: str, payload: Any) -> Any:
    """``payload`` validated by ``schema``; :class:`PermanentError` naming the first bad field."""
    if not isinstance(payload, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
        name = "null" if payload is None else kind.get(type(payload), type(payload).__name__)
        raise PermanentError(f"{job_type}: payload must be a JSON object, got {name}")
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "payload"
        cause = error.get("ctx", {}).get("error")
        reason = str(cause) if cause is not None else error["msg"].lower()
        if error["type"] == "missing":
            reason = "is missing"
        elif error["type"] == "bool_type":
            reason = f"must be true or false, got {_short(payload.get(field))}"
        raise PermanentError(f"{job_type}: {field} {reason}") from None


def _with_job_user(payload: Any, user_id: int | None, job_type: str) -> Any:
    """The payload's user id, filled from (and checked against) the job row's."""
    if not isinstance(payload, dict) or user_id is None:
        return payload
    uid = payload.get("user_id", user_id)
    if uid != user_id and isinstance(uid, int) and not isinstance(uid, bool):
        raise PermanentError(f"{job_type}: the payload's user_id {_short(uid)} is not the job's ({user_id})")
    return {**payload, "user_id": uid}


@dataclass(frozen=True)
class BriefRequest:
    """What one brief job asks for: a user's brief for one local date."""

    user_id: int
    brief_date: date
    notify_at: datetime | None = None
    engagement_stage: str = STANDARD
    email: bool = False
    catch_up: bool = False
    force: bool = False
    resend_email: bool = False

    @classmethod
    def from_payload(
        cls, payload: Any, *, user_id: int | None = None, notify_at: datetime | None = None
    ) -> BriefRequest:
        """Validate a job payload (the job row's user_id / notify_at fill gaps). Bad input is permanent."""
        checked: BriefPayload = _validate(BriefPayload, BRIEF_JOB, _with_job_user(payload, user_id, BRIEF_JOB))
        when = checked.notify_at or (notify_at.astimezone(UTC) if notify_at is not None else None)
        check_brief_date(checked.brief_date, f"{BRIEF_JOB}: brief_date")
        if when is not None:
            check_brief_date(when.date(), f"{BRIEF_JOB}: notify_at")
        return cls(checked.user_id, checked.brief_date, when, checked.engagement_stage, checked.email,
                   checked.catch_up, checked.force, checked.resend_email)

    def to_payload(self, *, source: str | None = None) -> dict[str, Any]:
        """The job payload (JSON-ready) that :meth:`from_payload` reads back into this request."""
        payload: dict[str, Any] = {
            "user_id": self.user_id,
            "brief_date": self.brief_date.isoformat(),
            "notify_at": iso_instant(self.notify_at) if self.notify_at else None,
            "engagement_stage": self.engagement_stage,
            "email": self.email,
            "catch_up": self.catch_up,
            "force": self.force,
            "resend_email": self.resend_email,
        }
        if source is not None:
            payload["source"] = source
        return payload

    @property
    def dedup_key(self) -> str:
        return brief_dedup_key(self.user_id, self.brief_date)


@dataclass(frozen=True)
class EmailRequest:
    """What one email job asks for: send a user's finished brief of one date."""

    user_id: int
    brief_date: date
    brief_id: int | None = None

    @classmethod
    def from_payload(cls, payload: Any, *, user_id: int | None = None) -> EmailRequest:
        """The job's payload, checked: anything malformed is a :class:`PermanentError` (retrying cannot help)."""
        checked: EmailPayload = _validate(EmailPayload, EMAIL_JOB, _with_job_user(payload, user_id, EMAIL_JOB))
        return cls(checked.user_id, checked.brief_date, checked.brief_id)

    def to_payload(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "brief_date": self.brief_date.isoformat(), "brief_id": self.brief_id}

    @property
    def dedup_key(self) -> str:
        return email_dedup_key(self.user_id, self.brief_date)
