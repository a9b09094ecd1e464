"""briefs.service's rules for queueing briefs by hand: which dates need --force, what --resend-email
carries, and which users `briefs enqueue --all` leaves out (the cases test_brief_service.py does not reach)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from briefs.jobs import settings_enqueue_hook
from briefs.service import BadRequest, enqueue_all, queue_brief

NOW = datetime(2026, 11, 23, 23, 30, tzinfo=UTC)  # the user's today is 2026-11-23 in UTC


async def enqueue_brief(h: Any, *args: Any, **kw: Any) -> str:
    """What `briefs enqueue` prints (:func:`briefs.service.queue_brief`'s line)."""
    queued = await queue_brief(h.db, h.settings(), *args, enqueue=settings_enqueue_hook(h.settings()), now=NOW, **kw)
    return queued.line()


async def test_a_date_beyond_a_week_back_or_tomorrow_needs_force(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada")
    for day in (date(2026, 11, 15), date(2026, 11, 25)):
        with pytest.raises(BadRequest) as refused:
            await enqueue_brief(h, uid, day, force=False)
        assert str(refused.value) == (
            f"brief date {day.isoformat()} is outside 2026-11-16 .. 2026-11-24 (user {uid}'s today - 7 days .. "
            "tomorrow); pass --force to queue it anyway"
        )
    assert await h.jobs() == []

    for day in (date(2026, 11, 16), date(2026, 11, 24)):  # the window's ends are inside it
        line = await enqueue_brief(h, uid, day, force=False)
        assert line.startswith("queued job ") and line.endswith(f"brief date {day.isoformat()}")
    line = await enqueue_brief(h, uid, date(2026, 11, 15), force=True)
    assert line.endswith(f"for user {uid}, brief date 2026-11-15 (forced)")
    assert sorted(j["dedup_key"] for j in await h.jobs()) == [
        f"brief:{uid}:2026-11-15", f"brief:{uid}:2026-11-16", f"brief:{uid}:2026-11-24"]


async def test_force_without_a_date_still_needs_the_users_timezone(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Bad", tz="Mars/Olympus_Mons")
    with pytest.raises(BadRequest, match=f"user {uid}'s timezone is unusable .*pass --date with --force"):
        await enqueue_brief(h, uid, None, force=True)
    assert await h.jobs() == []


async def test_resend_email_is_carried_and_said_only_when_forced(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada")
    line = await enqueue_brief(h, uid, date(2026, 11, 22), force=False, resend_email=True)
    assert line.endswith("brief date 2026-11-22")  # no note: without force there is nothing to resend
    line = await enqueue_brief(h, uid, date(2026, 11, 23), force=True, resend_email=True)
    assert line.endswith("brief date 2026-11-23 (forced; the email is sent again)")
    unforced, forced = await h.jobs()
    assert (unforced["payload"]["force"], unforced["payload"]["resend_email"]) == (False, False)
    assert (forced["payload"]["force"], forced["payload"]["resend_email"]) == (True, True)
    assert forced["priority"] == unforced["priority"] == 10  # by hand: ahead of the scheduler's


async def test_enqueue_all_leaves_out_finished_briefs_unless_forced(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    completed, partial, failed, none = (brief_seed.user(n) for n in ("Completed", "Partial", "Failed", "None"))
    for uid, status in ((completed, "completed"), (partial, "partial"), (failed, "failed")):
        await h.rows("INSERT INTO daily_briefs (user_id, brief_date, status) VALUES (%s, %s, %s) RETURNING id",
                     uid, date(2026, 11, 23), status)
    hook = settings_enqueue_hook(h.settings())

    report = await enqueue_all(h.db, force=False, enqueue=hook, now=NOW)
    assert (report.queued, report.already, report.skipped) == (2, 2, [])
    assert sorted(j["user_id"] for j in await h.jobs()) == sorted([failed, none])

    forced = await enqueue_all(h.db, force=True, enqueue=hook, now=NOW)
    assert (forced.queued, forced.already) == (2, 2)  # the finished ones now; the others are already pending
    assert sorted(j["user_id"] for j in await h.jobs()) == sorted([completed, partial, failed, none])
    assert {j["payload"]["force"] for j in await h.jobs() if j["user_id"] in (completed, partial)} == {True}
