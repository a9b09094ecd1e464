"""The unsubscribe link of every email: ``GET /u/<token>`` asks, ``POST /u/<token>`` does it.

No login: the signed token (:mod:`briefs.unsubscribe`) is the permission. The user id it claims is
read only to look the user up; the token is then verified against ``BRIEFS_SECRET_KEY`` and the
user's current address, and anything but a valid token (forged, altered, another key, an address
that changed since, no key configured) gets 404 and changes nothing. ``POST`` is also RFC 8058's
one-click unsubscribe (a mail provider posts ``List-Unsubscribe=One-Click`` with no session and
no page view): it answers 200 whatever the body. Links of emails sent before the console existed,
``/briefs/unsubscribe?token=…``, are served the same.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from briefs import unsubscribe
from briefs.web.problems import Problem
from briefs.web.state import web

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

NOT_FOUND = "this unsubscribe link is not valid (it may have been altered, or the address has changed since)"


def mask(address: str) -> str:
    """``grace@example.com`` → ``gr***@example.com``: enough to recognise, not to harvest."""
    local, _, domain = address.rpartition("@")
    return f"{local[:2]}***@{domain}" if local else "***"


async def _verified_user(request: Request, token: str) -> tuple[int, str]:
    """(user id, address) for a valid token; 404 for anything else."""
    state = web(request)
    uid = unsubscribe.claimed_user_id(token)
    if uid is None or state.settings.secret_key is None:
        raise Problem(404, NOT_FOUND)
    async with state.db.raw() as conn:
        cur = await conn.execute("SELECT email FROM users WHERE id = %s", (uid,))
        row = await cur.fetchone()
    if row is None:
        raise Problem(404, NOT_FOUND)
    (address,) = row
    try:
        check = unsubscribe.verify(token, state.settings.secret_key, email=str(address), now=datetime.now(UTC))
    except unsubscribe.SecretKeyError:
        log.error("BRIEFS_SECRET_KEY is unusable: unsubscribe links cannot be checked")
        raise Problem(404, NOT_FOUND) from None
    if not check.ok:
        raise Problem(404, NOT_FOUND)
    return uid, str(address)


async def _confirm(request: Request, token: str, action: str) -> Response:
    _, address = await _verified_user(request, token)
    return web(request).pages.render(request, "unsubscribe.html", done=False, masked_email=mask(address),
                                     action=action)


async def _unsubscribe(request: Request, token: str) -> Response:
    state = web(request)
    uid, address = await _verified_user(request, token)
    async with state.db.raw() as conn:
        cur = await conn.execute(
            """UPDATE brief_preferences SET email_enabled = false, updated_at = now()
               WHERE user_id = %s AND email_enabled RETURNING user_id""",
            (uid,),
        )
        changed = await cur.fetchone() is not None
    if changed:
        log.info("user %s unsubscribed from brief emails", uid)
        await state.after_preference_change(uid)
    return state.pages.render(request, "unsubscribe.html", done=True, masked_email=mask(address), action="")


@router.get("/u/{token}")
async def confirm_page(request: Request, token: str) -> Response:
    return await _confirm(request, token, f"/u/{token}")


@router.post("/u/{token}")
async def unsubscribe_now(request: Request, token: str) -> Response:
    return await _unsubscribe(request, token)


@router.get(unsubscribe.LEGACY_PATH)
async def legacy_confirm_page(request: Request, token: str = "") -> Response:
    return await _confirm(request, token, f"/u/{token}")


@router.post(unsubscribe.LEGACY_PATH)
async def legacy_unsubscribe(request: Request, token: str = "") -> Response:
    return await _unsubscribe(request, token)
