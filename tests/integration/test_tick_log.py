"""The tick log (``scheduler_ticks``): the daemon writes every tick, the log stays bounded, recent_ticks reads it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from briefs.db import Database
from briefs.settings import Settings
from scheduler import daemon as daemon_mod
from scheduler.daemon import SchedulerDaemon
from scheduler.report import TickReport, bounded, recent_ticks, record_tick
from scheduler.tick import LOCK_KEY, run_tick
from tests.conftest import SchedulerSeed, make_settings
from tests.polling import wait_for_async


@pytest.fixture
def tick_log(database_url: str) -> Iterator[str]:
    """An empty tick log; returns the database URL."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("TRUNCATE scheduler_ticks RESTART IDENTITY")
    yield database_url


def soon() -> str:
    return (datetime.now(UTC) + timedelta(minutes=10)).strftime("%H:%M")


async def recent(db: Database, limit: int = 20) -> list[dict[str, Any]]:
    async with db.raw() as conn:
        rows = await recent_ticks(conn, limit)
    json.dumps(rows)  # JSON-safe as they are
    return rows


async def record(db: Database, report: TickReport, **kw: Any) -> int | None:
    async with db.raw() as conn:
        return await record_tick(conn, report, **kw)


async def run_daemon_once(db: Database, database_url: str) -> SchedulerDaemon:
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=3600))
    await daemon.start()
    try:
        await wait_for_async(lambda: daemon.ticks, what="the tick at start")
    finally:
        await daemon.stop()
    return daemon


async def test_a_daemon_tick_is_logged_with_its_report(
    db: Database, database_url: str, sched_seed: SchedulerSeed, tick_log: str
) -> None:
    uid = sched_seed.user("UTC", soon())
    daemon = await run_daemon_once(db, database_url)
    assert daemon.last_report is not None
    [row] = await recent(db)
    assert row["ok"] is True and row["error"] is None and row["user_id"] is None
    assert row["tick_at"] == daemon.last_report.to_dict()["now"]
    assert row["finished_at"] is not None and row["duration_s"] is not None
    assert row["summary"] == daemon.last_report.summary()
    assert [e["user_id"] for e in row["report"]["enqueued"]] == [uid]
    assert row["report"]["counts"]["enqueued"] == 1 and row["report"]["truncated"] == []


async def test_a_failing_tick_is_logged_with_its_error(
    db: Database, database_url: str, tick_log: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(db: Any, settings: Any, now: datetime, **kw: Any) -> TickReport:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(daemon_mod, "run_tick", broken)
    daemon = await run_daemon_once(db, database_url)
    assert daemon.last_error == "RuntimeError: database on fire"
    [row] = await recent(db)
    assert (row["ok"], row["error"], row["report"]) == (False, "RuntimeError: database on fire", None)
    assert "failed" in row["summary"] and row["tick_at"] is not None


async def test_a_skipped_tick_is_logged(db: Database, database_url: str, tick_log: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as holder:
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        await run_daemon_once(db, database_url)
    [row] = await recent(db)
    assert row["ok"] is True and row["report"]["skipped_locked"] is True


async def test_a_log_that_cannot_be_written_never_stops_the_daemon(
    db: Database, database_url: str, sched_seed: SchedulerSeed, tick_log: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unwritable(*args: Any, **kw: Any) -> None:
        raise psycopg.errors.UndefinedTable('relation "scheduler_ticks" does not exist')

    monkeypatch.setattr(daemon_mod, "record_tick", unwritable)
    uid = sched_seed.user("UTC", soon())
    daemon = SchedulerDaemon(db, make_settings(database_url, scheduler_interval=0.1))
    await daemon.start()
    try:
        await wait_for_async(lambda: daemon.ticks, what="two ticks", accept=lambda n: n >= 2)
    finally:
        await daemon.stop()
    assert daemon.last_error is None and daemon.last_report is not None
    assert len(sched_seed.jobs(uid)) == 1
    assert await recent(db) == []


async def test_one_user_ticks_are_logged_by_their_caller_and_dry_runs_never(
    db: Database, settings: Settings, sched_seed: SchedulerSeed, tick_log: str
) -> None:
    uid = sched_seed.user("UTC", "08:00")
    now = datetime(2026, 3, 10, 7, 30, tzinfo=UTC)
    dry = await run_tick(db, settings, now, dry_run=True)
    assert await record(db, dry) is None
    report = await run_tick(db, settings, now, user_id=uid)
    row_id = await record(db, report)
    [row] = await recent(db)
    assert (row["id"], row["user_id"], row["tick_at"]) == (row_id, uid, "2026-03-10T07:30:00Z")
    assert row["report"]["user_id"] == uid and row["summary"].startswith(f"tick for user {uid} at")


async def test_the_log_keeps_at_most_the_cap_newest_first(db: Database, tick_log: str) -> None:
    base = datetime(2026, 3, 10, 7, 0, tzinfo=UTC)
    ids = [await record(db, TickReport(now=base + timedelta(minutes=i)), keep_rows=3) for i in range(6)]
    rows = await recent(db)
    assert [r["id"] for r in rows] == ids[:2:-1]  # the last three, newest first
    assert [r["tick_at"] for r in rows] == ["2026-03-10T07:05:00Z", "2026-03-10T07:04:00Z", "2026-03-10T07:03:00Z"]
    assert [r["id"] for r in await recent(db, 2)] == ids[:3:-1]


async def test_the_log_keeps_a_week(db: Database, tick_log: str, sched_seed: SchedulerSeed) -> None:
    now = datetime(2026, 3, 10, 7, 0, tzinfo=UTC)
    old = await record(db, TickReport(now=now))
    recent_enough = await record(db, TickReport(now=now))
    sched_seed.execute("UPDATE scheduler_ticks SET finished_at = now() - interval '8 days' WHERE id = %s", (old,))
    sched_seed.execute("UPDATE scheduler_ticks SET finished_at = now() - interval '6 days' WHERE id = %s",
                       (recent_enough,))
    new = await record(db, TickReport(now=now))
    assert [r["id"] for r in await recent(db)] == [new, recent_enough]


async def test_a_big_report_is_logged_bounded(db: Database, tick_log: str) -> None:
    report = TickReport(now=datetime(2026, 3, 10, 7, 0, tzinfo=UTC))
    for uid in range(1, 251):
        report.skip(uid, "engagement: nul \x00 inside")
    await record(db, report, list_cap=100)
    [row] = await recent(db)
    logged = row["report"]
    assert len(logged["skipped"]) == 100 and logged["counts"]["skipped"] == 250
    assert logged["truncated"] == ["skipped"] and logged["skipped_by_kind"] == {"engagement": 250}
    assert logged["skipped"][0] == {"user_id": 1, "reason": "engagement: nul \ufffd inside"}
    assert bounded(report.to_dict(), 0)["counts"]["skipped"] == 250


async def test_recent_ticks_survives_hostile_rows(db: Database, tick_log: str, sched_seed: SchedulerSeed) -> None:
    sched_seed.execute(
        """INSERT INTO scheduler_ticks (tick_at, finished_at, duration_s, ok, report)
           VALUES ('infinity', '-infinity', 'NaN', true, '[1, 2]'), ('2026-03-10 07:00+00', now(), 1.5, true, NULL)"""
    )
    rows = await recent(db)
    assert [(r["tick_at"], r["duration_s"], r["report"]) for r in rows] == [
        ("2026-03-10T07:00:00Z", 1.5, None), (None, None, None)]


@pytest.mark.parametrize("limit", [0, 1001, True, "5"])
async def test_recent_ticks_checks_its_limit(db: Database, limit: object) -> None:
    with pytest.raises(ValueError, match="limit must be an integer"):
        await recent(db, limit)  # type: ignore[arg-type]
