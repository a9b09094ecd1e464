"""briefs.service (used by `briefs enqueue` and `briefs show`) and the CLI commands on top of it."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest

from briefs.errors import PermanentError
from briefs.jobs import settings_enqueue_hook as hook
from briefs.service import BadRequest, enqueue_all, load_brief_markdown, queue_brief


async def enqueue_brief(db: Any, settings: Any, *args: Any, **kw: Any) -> str:
    """What `briefs enqueue` prints (:func:`briefs.service.queue_brief`'s line)."""
    return (await queue_brief(db, settings, *args, enqueue=hook(settings), **kw)).line()

NOW = datetime(2026, 11, 23, 23, 30, tzinfo=UTC)  # already the 24th in Tokyo


async def test_enqueue_uses_the_users_local_today_and_dedups(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Aki", tz="Asia/Tokyo")
    line = await enqueue_brief(h.db, h.settings(), uid, None, force=False, now=NOW)
    [job] = await h.jobs()
    assert line == f"queued job {job['id']} for user {uid}, brief date 2026-11-24"
    assert job["dedup_key"] == f"brief:{uid}:2026-11-24" and job["user_id"] == uid
    assert job["payload"]["brief_date"] == "2026-11-24" and job["payload"]["force"] is False
    assert job["notify_at"] == NOW

    again = await enqueue_brief(h.db, h.settings(), uid, None, force=True, now=NOW)
    assert again == f"a brief job for user {uid}, brief date 2026-11-24 is already pending (job {job['id']}, pending)"
    assert len(await h.jobs()) == 1


async def test_enqueue_unknown_user_is_a_clear_error(briefs_harness: Any) -> None:
    with pytest.raises(PermanentError, match="no user with id 77"):
        await enqueue_brief(briefs_harness.db, briefs_harness.settings(), 77, None, force=False)


async def test_enqueue_then_show(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada")
    day = date(2026, 11, 20)
    brief_seed.busy_project(uid, "Atlas", day)
    assert await load_brief_markdown(h.db, uid, None) is None

    await enqueue_brief(h.db, h.settings(), uid, day, force=False, now=NOW)
    await h.run(h.settings(), services={})
    text = await load_brief_markdown(h.db, uid, day)
    assert text is not None and "### Atlas" in text and "Friday 20 November 2026" in text
    assert await load_brief_markdown(h.db, uid, None) == text
    assert await load_brief_markdown(h.db, uid, date(2026, 11, 21)) is None

    line = await enqueue_brief(h.db, h.settings(), uid, day, force=False, now=NOW)
    assert line == (
        f"the brief for user {uid}, brief date 2026-11-20 is already completed; pass --force to regenerate it"
    )
    line = await enqueue_brief(h.db, h.settings(), uid, day, force=True)
    assert line.startswith("queued job ") and line.endswith("(forced)")
    await h.run(h.settings(), services={})
    assert (await h.brief(uid))["metadata"]["revision"] == 2


async def test_enqueue_all_queues_each_users_local_today(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    tokyo = brief_seed.user("Aki", tz="Asia/Tokyo")
    utc = brief_seed.user("Ada")
    brief_seed.user("Off", preference=False)
    progress: list[tuple[int, int]] = []
    insert = hook(h.settings())
    report = await enqueue_all(h.db, force=False, enqueue=insert, now=NOW, on_progress=lambda *a: progress.append(a))
    assert (report.queued, report.already, report.skipped) == (2, 0, [])
    assert progress[-1] == (2, 2)
    keys = sorted(j["dedup_key"] for j in await h.jobs())
    assert keys == sorted([f"brief:{tokyo}:2026-11-24", f"brief:{utc}:2026-11-23"])
    again = await enqueue_all(h.db, force=False, enqueue=insert, now=NOW)
    assert (again.queued, again.already, again.skipped) == (0, 2, [])


@pytest.mark.parametrize(
    ("tz", "reason"),
    [
        # ZoneInfo raised OSError (file name too long), reported as 'database unavailable' for everyone
        # The scheduler's own reasons (briefs.contract.load_timezone), word for word.
        ("Z" * 60_000, "timezone 'ZZZZ"),
        ("../../../etc/passwd", "timezone '../../../etc/passwd' looks like a path"),
        ("Mars/Olympus_Mons", "timezone 'Mars/Olympus_Mons' is not in the tz database"),
        ("Factory", "timezone 'Factory' is not a real location zone"),  # in tzdata, but no user's zone
        ("", "timezone '' is empty"),
    ],
)
async def test_enqueue_all_skips_a_bad_timezone_and_queues_the_rest(
    briefs_harness: Any, brief_seed: Any, tz: str, reason: str
) -> None:
    h = briefs_harness
    before = brief_seed.user("Before", tz="Asia/Tokyo")
    bad = brief_seed.user("Bad", tz=tz)
    after = brief_seed.user("After")
    report = await enqueue_all(h.db, force=True, enqueue=hook(h.settings()), now=NOW)
    assert report.queued == 2 and report.already == 0
    [(uid, why)] = report.skipped
    assert uid == bad and why.startswith(reason) and len(why) < 120
    assert "(60,000 characters) is too long" in why if len(tz) > 64 else True
    assert sorted(j["user_id"] for j in await h.jobs()) == [before, after]
    assert f"user {bad}: {why}" in report.summary()


async def test_enqueue_one_user_with_a_bad_timezone_is_a_clear_error(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = brief_seed.user("Bad", tz="Q" * 60_000)
    with pytest.raises(BadRequest, match=f"user {uid}'s timezone is unusable"):
        await enqueue_brief(h.db, h.settings(), uid, None, force=False, now=NOW)
    line = await enqueue_brief(h.db, h.settings(), uid, date(2026, 11, 23), force=True, now=NOW)
    assert line.startswith("queued job ")  # an explicit date, forced: the timezone is not needed


def test_cli_enqueue_and_show(clean_db: str, capsys: Any, monkeypatch: Any) -> None:
    import logging

    from briefs.app.cli import main
    from tests.conftest import BriefSeed

    root = logging.getLogger()  # the CLI sets up logging; give the session its handlers back afterwards
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)

    seed = BriefSeed(clean_db)
    uid = seed.user("Cli")
    seed.close()
    monkeypatch.setenv("DATABASE_URL", clean_db)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir("/")  # no .env
    today = datetime.now(UTC).date().isoformat()
    assert main(["enqueue", str(uid), "--date", today]) == 0
    assert f"for user {uid}, brief date {today}" in capsys.readouterr().out
    assert main(["show", str(uid)]) == 1
    assert f"briefs: error: user {uid} has no brief yet" in capsys.readouterr().err
    assert main(["enqueue", "999"]) == 1
    assert "no user with id 999" in capsys.readouterr().err
