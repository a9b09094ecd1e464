"""Signed unsubscribe tokens: what an email's "stop these emails" link carries instead of a user id.

Format (version ``u1``), ASCII and URL-safe (digits, letters, ``-``, ``_`` and ``.``; no escaping needed)::

    u1.<user id>.<issued at>.<address tag>.<signature>

- ``user id``: the decimal ``users.id`` (1 … 2**63-1, no leading zeros);
- ``issued at``: Unix seconds (decimal) when the email was built;
- ``address tag``: 12 bytes of HMAC-SHA256(key, address), base64url (16 characters): binds the token to the
  address the email went to, without revealing it (a plain hash could be confirmed by guessing addresses);
- ``signature``: HMAC-SHA256 (32 bytes, base64url without padding: 43 characters) over the purpose,
  the version and the three fields above.

The key is derived from ``BRIEFS_SECRET_KEY`` for this purpose only (HMAC of a fixed label), so a
token made for anything else under the same secret can never pass as an unsubscribe token. Fields
are checked strictly (one canonical spelling per token), the signature is compared in constant time
(:func:`hmac.compare_digest`), and :func:`verify` gives one clear status per outcome: ``malformed``,
``unsupported_version``, ``bad_signature`` (tampered, or signed with another key: the two cannot be
told apart, by design), ``expired`` (only when the caller passes ``max_age``) and ``address_changed``
(genuine, but the user's address is no longer the one the email went to).

No expiry by default: an unsubscribe link must keep working in an old email (RFC 8058 one-click and
the anti-spam rules expect it to work long after sending). The endpoint may pass ``max_age``. A user
who changes address gets new tokens with the next email; old emails' links stop working then, which
is what the binding is for: a token stays tied to the mailbox it was sent to.

Serving the endpoint is the web console's job: it reads the user id with :func:`claimed_user_id`
(unverified, only to look the user up), then calls :func:`verify` with that user's current address,
and acts only when the status is ``valid``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from urllib.parse import quote

from pydantic import SecretStr

VERSION = "u1"
PATH = "/u/"  # joined to BRIEFS_PUBLIC_URL, then the token: served by the web console (briefs.web.unsubscribe)
LEGACY_PATH = "/briefs/unsubscribe"  # links of emails sent before, with ?token=: still served
MIN_KEY_LENGTH = 16  # characters of BRIEFS_SECRET_KEY
MAX_TOKEN_LENGTH = 200  # anything longer is refused before any parsing
MAX_USER_ID = 2**63 - 1

_KEY_LABEL = b"briefs unsubscribe token key v1"
_PURPOSE = b"briefs/unsubscribe"
_TAG_BYTES = 12
_TOKEN = re.compile(
    r"u1\.([1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,10})\.([A-Za-z0-9_-]{16})\.([A-Za-z0-9_-]{43})", re.ASCII
)
_VERSIONED = re.compile(r"([a-z][0-9]{1,3})\.", re.ASCII)


class SecretKeyError(ValueError):
    """The secret key is missing or too weak to sign with."""


class Status(StrEnum):
    VALID = "valid"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    ADDRESS_CHANGED = "address_changed"


@dataclass(frozen=True)
class Verification:
    status: Status
    user_id: int | None = None  # set only when the signature is genuine
    issued_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.VALID


def _secret_bytes(secret: SecretStr | str | bytes | None) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if isinstance(secret, str):
        secret = secret.encode("utf-8", "surrogatepass")
    if not secret:
        raise SecretKeyError("BRIEFS_SECRET_KEY is not set")
    if len(secret) < MIN_KEY_LENGTH:
        raise SecretKeyError(f"BRIEFS_SECRET_KEY is too short (at least {MIN_KEY_LENGTH} characters of random)")
    return secret


def _key(secret: SecretStr | str | bytes | None) -> bytes:
    return hmac.new(_secret_bytes(secret), _KEY_LABEL, hashlib.sha256).digest()


def check_key(secret: SecretStr | str | bytes | None) -> None:
    """Raise :class:`SecretKeyError` (a ValueError) when ``secret`` cannot sign tokens."""
    _secret_bytes(secret)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _address_tag(key: bytes, email: str) -> str:
    normal = email.strip().lower().encode("utf-8", "surrogatepass")
    return _b64(hmac.new(key, b"address\x00" + normal, hashlib.sha256).digest()[:_TAG_BYTES])


def _signature(key: bytes, user_id: str, issued: str, tag: str) -> str:
    message = b"\x00".join((_PURPOSE, VERSION.encode(), user_id.encode(), issued.encode(), tag.encode()))
    return _b64(hmac.new(key, message, hashlib.sha256).digest())


def make_token(secret: SecretStr | str | bytes | None, user_id: int, email: str, *, now: datetime) -> str:
    """A token for ``user_id`` whose email goes to ``email``. Raises ValueError for a bad key or user id."""
    if isinstance(user_id, bool) or not isinstance(user_id, int) or not 1 <= user_id <= MAX_USER_ID:
        raise ValueError(f"user id out of range: {user_id!r}")
    key = _key(secret)
    uid, issued = str(user_id), str(max(0, int(now.timestamp())))
    tag = _address_tag(key, email)
    return f"{VERSION}.{uid}.{issued}.{tag}.{_signature(key, uid, issued, tag)}"


def claimed_user_id(token: object) -> int | None:
    """The user id a well-formed token *claims* (not verified: use it only to look the user up)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    uid = int(match.group(1))
    return uid if uid <= MAX_USER_ID else None


def verify(
    token: object,
    secret: SecretStr | str | bytes | None,
    *,
    email: str,
    now: datetime,
    max_age: float | None = None,
) -> Verification:
    """Check ``token`` against the key and the user's current ``email``; see the module docstring.

    Raises :class:`SecretKeyError` only when the key itself is unusable (a server misconfiguration, not a bad token).
    """
    key = _key(secret)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return Verification(Status.MALFORMED)
    match = _TOKEN.fullmatch(token)
    if match is None:
        versioned = _VERSIONED.match(token)
        if versioned is not None and versioned.group(1) != VERSION:
            return Verification(Status.UNSUPPORTED_VERSION)
        return Verification(Status.MALFORMED)
    uid, issued, tag, signature = match.groups()
    if not hmac.compare_digest(_signature(key, uid, issued, tag), signature):
        return Verification(Status.BAD_SIGNATURE)
    user_id = int(uid)
    if user_id > MAX_USER_ID:  # signed by us, so never happens; kept so a bad id can never reach a query
        return Verification(Status.MALFORMED)
    issued_at = datetime.fromtimestamp(int(issued), UTC)
    if max_age is not None and (now - issued_at).total_seconds() > max_age:
        return Verification(Status.EXPIRED, user_id, issued_at)
    if not hmac.compare_digest(_address_tag(key, email), tag):
        return Verification(Status.ADDRESS_CHANGED, user_id, issued_at)
    return Verification(Status.VALID, user_id, issued_at)


def unsubscribe_url(public_url: str, token: str) -> str:
    """The link for ``token`` under the (already validated) public base URL."""
    return f"{public_url.rstrip('/')}{PATH}{quote(token, safe='')}"
