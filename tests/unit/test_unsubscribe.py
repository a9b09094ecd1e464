"""Signed unsubscribe tokens: format, verification, and every way a token can be wrong."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from briefs import unsubscribe
from briefs.unsubscribe import Status

KEY = SecretStr("a-long-random-secret-for-tests-0123456789")
OTHER_KEY = "another-long-random-secret-for-tests-987654"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ADDRESS = "ada@example.com"


def token(user_id: int = 42, email: str = ADDRESS, *, key: object = KEY, now: datetime = NOW) -> str:
    return unsubscribe.make_token(key, user_id, email, now=now)  # type: ignore[arg-type]


def test_a_token_is_versioned_url_safe_and_verifies() -> None:
    t = token()
    assert t.startswith("u1.42.") and re.fullmatch(r"[A-Za-z0-9._-]+", t) and len(t) <= unsubscribe.MAX_TOKEN_LENGTH
    check = unsubscribe.verify(t, KEY, email=ADDRESS, now=NOW + timedelta(days=400))
    assert check.ok and check.status is Status.VALID
    assert check.user_id == 42 and check.issued_at == NOW
    assert unsubscribe.claimed_user_id(t) == 42
    # The address is bound, not carried: it cannot be read from the link.
    assert "ada" not in t and "example" not in t
    # Case and surrounding spaces of the address do not matter.
    assert unsubscribe.verify(t, KEY, email=" ADA@Example.com ", now=NOW).ok
    assert unsubscribe.unsubscribe_url("https://b.example.com/", t) == f"https://b.example.com/u/{t}"


def test_the_old_guessable_link_and_other_users_ids_do_not_pass() -> None:
    t = token(42)
    forged = t.replace("u1.42.", "u1.43.", 1)
    assert unsubscribe.verify(forged, KEY, email=ADDRESS, now=NOW).status is Status.BAD_SIGNATURE
    assert unsubscribe.verify("42", KEY, email=ADDRESS, now=NOW).status is Status.MALFORMED


@pytest.mark.parametrize("position", range(0, len(token()), 3))
def test_any_changed_character_is_refused(position: int) -> None:
    t = token()
    swapped = "A" if t[position] != "A" else "B"
    tampered = t[:position] + swapped + t[position + 1:]
    status = unsubscribe.verify(tampered, KEY, email=ADDRESS, now=NOW).status
    assert status in (Status.BAD_SIGNATURE, Status.MALFORMED, Status.UNSUPPORTED_VERSION)


def test_wrong_key_expiry_and_address_change_have_their_own_status() -> None:
    t = token()
    assert unsubscribe.verify(t, OTHER_KEY, email=ADDRESS, now=NOW).status is Status.BAD_SIGNATURE
    assert unsubscribe.verify(t, KEY, email=ADDRESS, now=NOW + timedelta(days=31), max_age=30 * 86400).status \
        is Status.EXPIRED
    assert unsubscribe.verify(t, KEY, email=ADDRESS, now=NOW + timedelta(days=29), max_age=30 * 86400).ok
    changed = unsubscribe.verify(t, KEY, email="ada@new.example.com", now=NOW)
    assert changed.status is Status.ADDRESS_CHANGED and changed.user_id == 42 and not changed.ok


@pytest.mark.parametrize(
    "bad",
    [None, 42, b"u1.1.1.x.y", "", "u1", "u1....", "u1.0.1.AAAAAAAAAAAAAAAA." + "A" * 43,
     "u1.01.1.AAAAAAAAAAAAAAAA." + "A" * 43, "u1.-1.1.AAAAAAAAAAAAAAAA." + "A" * 43,
     "u1.99999999999999999999.1.AAAAAAAAAAAAAAAA." + "A" * 43, "u1.1.1.AAAAAAAAAAAAAAAA." + "A" * 42,
     "u1.1.1.AAAAAAAAAAAAAAAA." + "A" * 43 + "=", "u1.1.1.AAAAAAAAAAAAAAAA." + "A" * 43 + "\n",
     " u1.1.1.AAAAAAAAAAAAAAAA." + "A" * 43, "u1.1.1.AAAAAAAAAAAAAAAA/" + "A" * 43,
     "u1.1.1.AAAAAAAAAAAAAAA%" + "A" * 43,
     "x" * 10_000_000, "u1.١.1.AAAAAAAAAAAAAAAA." + "A" * 43],
)
def test_malformed_tokens_are_refused_without_error(bad: object) -> None:
    check = unsubscribe.verify(bad, KEY, email=ADDRESS, now=NOW)
    assert check.status is Status.MALFORMED and check.user_id is None
    assert unsubscribe.claimed_user_id(bad) is None


def test_a_future_version_is_named() -> None:
    assert unsubscribe.verify("u2.1.1.abc.def", KEY, email=ADDRESS, now=NOW).status is Status.UNSUPPORTED_VERSION


def test_the_key_is_required_and_must_not_be_trivial() -> None:
    for weak in (None, "", SecretStr(""), "short"):
        with pytest.raises(unsubscribe.SecretKeyError, match="BRIEFS_SECRET_KEY"):
            token(key=weak)
        with pytest.raises(unsubscribe.SecretKeyError):
            unsubscribe.verify("u1.x", weak, email=ADDRESS, now=NOW)  # type: ignore[arg-type]
    for bad_id in (0, -1, 2**63, True, "42"):
        with pytest.raises(ValueError, match="user id"):
            token(bad_id)  # type: ignore[arg-type]


def test_tokens_are_not_confused_across_users_or_addresses() -> None:
    a, b = token(1, "a@example.com"), token(2, "b@example.com")
    assert a != b
    # Splicing one token's signature onto another's fields fails.
    spliced = ".".join(a.split(".")[:4] + b.split(".")[4:])
    assert unsubscribe.verify(spliced, KEY, email="a@example.com", now=NOW).status is Status.BAD_SIGNATURE
