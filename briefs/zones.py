"""A user's timezone: the one definition of a usable zone name, and of how a hostile value is shown.

The scheduler (which skips a user whose zone is unusable) and the brief domain (``briefs enqueue``,
``enqueue --all``) both check names here, so they never disagree on which users can be planned.
"""

from __future__ import annotations

import functools
import zoneinfo

__all__ = ["MAX_TIMEZONE_CHARS", "SHOWN_CHARS", "InvalidTimezone", "load_timezone", "shown"]

# In the tz database's file listing, but not zones a user may pick: "Factory" is the placeholder zone
# ("-00"), "localtime" is the host's /etc/localtime and "posixrules" a compiler default.
_NOT_USER_ZONES = frozenset({"Factory", "localtime", "posixrules"})
# The longest tz database name has 32 characters; anything much longer is not looked up at all.
MAX_TIMEZONE_CHARS = 64
# How much of a hostile value a message or log line shows (see :func:`shown`).
SHOWN_CHARS = 100


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


class InvalidTimezone(ValueError):
    """The name is not a usable IANA timezone; the message says which name and why."""


@functools.cache
def _known_zones() -> frozenset[str]:
    # available_timezones() opens hundreds of files: do it once per process.
    return frozenset(zoneinfo.available_timezones()) - _NOT_USER_ZONES


@functools.lru_cache(maxsize=2048)
def load_timezone(name: str) -> zoneinfo.ZoneInfo:
    """Return the ZoneInfo for an exact, case-sensitive IANA name, or raise InvalidTimezone."""
    if not isinstance(name, str):
        raise InvalidTimezone(f"timezone of type {type(name).__name__} is not a string")
    if not name.strip():
        raise InvalidTimezone(f"timezone {shown(name)} is empty")
    if len(name) > MAX_TIMEZONE_CHARS:
        raise InvalidTimezone(f"timezone {shown(name, 40)} is too long for a tz database name")
    if name.startswith("/") or ".." in name or "\\" in name or "\x00" in name:
        raise InvalidTimezone(f"timezone {shown(name)} looks like a path, not a tz database name")
    if name in _NOT_USER_ZONES:
        raise InvalidTimezone(f"timezone {shown(name)} is not a real location zone")
    if name not in _known_zones():
        raise InvalidTimezone(f"timezone {shown(name)} is not in the tz database (names are case-sensitive)")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidTimezone(f"timezone {shown(name)} could not be loaded: {shown(str(exc))}") from exc
