"""``/api/v1/stats``: the overview's numbers from known rows, and one computation shared by every
concurrent request."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx

from briefs import metrics
from briefs.db import Database
from briefs.web.stats import StatsCache, compute
from tests.polling import wait_for_async
from tests.web.conftest import Data


async def test_the_numbers_of_known_rows(client: httpx.AsyncClient, data: Data) -> None:
    now = datetime.now(UTC)
    for seconds in (2, 4):
        await data.job("a", status="completed", run_at=now - timedelta(seconds=10), locked_by="w-1",
                       started_at=now - timedelta(seconds=10 - seconds), finished_at=now)
    await data.job("b", status="failed", locked_by=None, started_at=now, finished_at=now)
    await data.job("a", status="processing", locked_by="w-2", heartbeat_at=now)
    await data.job("b", run_at="-infinity")
    uid = await data.user()
    await data.brief(uid, now.date(), prompt_tokens=100, completion_tokens=20, completed_at=now)
    body = (await client.get("/api/v1/stats")).json()
    jobs = body["jobs"]
    assert jobs["by_status"] == {"pending": 1, "processing": 1, "completed": 2, "failed": 1, "cancelled": 0}
    assert jobs["by_type"] == {"a": {"completed": 2, "processing": 1}, "b": {"failed": 1, "pending": 1}}
    assert jobs["oldest_pending_age_s"] is None and jobs["oldest_pending_overdue_forever"] is True
    tp = body["throughput"]
    assert (tp["completed_last_hour"], tp["failed_last_hour"], tp["success_rate_last_hour"]) == (2, 1, 0.6667)
    assert len(tp["per_minute"]) == 60 and len(tp["per_hour"]) == 24
    assert sum(m["completed"] for m in tp["per_minute"]) == 2 == sum(h["completed"] for h in tp["per_hour"])
    assert body["durations_last_hour"]["run"]["p50_s"] is not None
    assert {w["id"]: w["running"] for w in body["workers"]} == {"w-1": 0, "w-2": 1}
    assert body["llm"]["tokens_today"]["prompt_tokens"] == 100 and body["llm"]["tokens_today"]["total_tokens"] == 120
    assert set(body["scheduler"]) == {"last_tick", "last_user_tick"}


async def test_concurrent_requests_share_one_computation(db: Database) -> None:
    cache = StatsCache(db, max_age=60.0)
    snapshots = await asyncio.gather(*(cache.get() for _ in range(20)))
    assert cache.computations == 1 and all(s is snapshots[0] for s in snapshots)
    assert await cache.get() is snapshots[0]
    stale = StatsCache(db, max_age=0.0)
    await stale.get()
    await stale.get()
    assert stale.computations == 2


async def test_a_request_that_goes_away_does_not_cancel_the_others(db: Database) -> None:
    cache = StatsCache(db, max_age=60.0)
    leaving = asyncio.ensure_future(cache.get())
    staying = asyncio.ensure_future(cache.get())
    await asyncio.sleep(0)
    leaving.cancel()
    snapshot = await staying
    assert snapshot["jobs"]["total"] == 0 and cache.computations == 1


async def test_finished_counts_see_new_jobs_at_once_and_old_changes_at_the_recount(
    db: Database, data: Data
) -> None:
    """Finished jobs are most of the table: counted in one pass up to a cut (recounted in the background),
    plus those finished since the cut through the index, so a completion shows in the next snapshot."""
    now = datetime.now(UTC)
    old = await data.job("a", status="completed", finished_at=now - timedelta(hours=2))
    await data.job("a", status="completed", finished_at=now - timedelta(seconds=5))
    await data.job("a", status="completed", finished_at=None)  # hostile: completed without an instant
    cache = StatsCache(db, max_age=0.0)
    assert (await cache.get())["jobs"]["by_status"]["completed"] == 3
    await data.job("a", status="completed", finished_at=now)
    await data.job("b", status="completed", finished_at=now)
    snapshot = await cache.get()
    assert snapshot["jobs"]["by_type"] == {"a": {"completed": 4}, "b": {"completed": 1}}
    assert cache.base.recounts == 1  # the new ones came from the index, not a second pass
    async with db.raw() as conn:  # an old completed job retried: pending now
        await conn.execute("UPDATE queue_jobs SET status = 'pending', finished_at = NULL WHERE id = %s", (old,))
    cache.base.max_age = 0.0  # the next snapshot starts a recount in the background, served after it

    async def counts() -> tuple[int, int]:
        by_status = (await cache.get())["jobs"]["by_status"]
        return by_status["completed"], by_status["pending"]

    await wait_for_async(counts, what="the recount", accept=lambda found: found == (4, 1))


async def test_series_join_the_base_and_what_finished_since_its_cut(db: Database, data: Data) -> None:
    """A job finished ten minutes ago is in the base (the cut is five minutes back), one finished now is
    not: both are in the counts and in their minute and hour, once; a hostile instant is in no minute."""
    now = datetime.now(UTC)
    await data.job("a", status="completed", finished_at=now - timedelta(minutes=10))
    await data.job("a", status="failed", finished_at=now - timedelta(minutes=10))
    await data.job("a", status="completed", finished_at=now)
    await data.job("a", status="completed", finished_at="infinity")
    await data.job("a", status="cancelled", finished_at=now - timedelta(days=3))  # counted, outside the charts
    snapshot = await StatsCache(db).get()
    assert snapshot["jobs"]["by_status"] == {
        "pending": 0, "processing": 0, "completed": 3, "failed": 1, "cancelled": 1}
    minutes = {m["at"]: m for m in snapshot["throughput"]["per_minute"] if m["completed"] or m["failed"]}
    ten_ago = (now - timedelta(minutes=10)).replace(second=0, microsecond=0).isoformat()
    this_one = now.replace(second=0, microsecond=0).isoformat()
    assert minutes == {ten_ago: {"at": ten_ago, "completed": 1, "failed": 1, "cancelled": 0},
                       this_one: {"at": this_one, "completed": 1, "failed": 0, "cancelled": 0}}
    hours = snapshot["throughput"]["per_hour"]
    assert sum(h["completed"] for h in hours) == 2 and sum(h["failed"] for h in hours) == 1
    assert sum(h["cancelled"] for h in hours) == 0


async def test_todays_and_this_months_llm_cost(db: Database, data: Data) -> None:
    now = datetime.now(UTC)
    uid = await data.user()
    await data.brief(uid, now.date(), prompt_tokens=100, completion_tokens=20, completed_at=now, cost=Decimal("0.5"))
    llm = (await compute(db))["llm"]
    cost = llm["cost"]
    assert cost["currency"] == "USD" and cost["daily_budget"] is None and cost["budget_display"] == "none"
    assert (cost["today"]["prompt_tokens"], cost["today"]["cost"], cost["today"]["display"]) == (100, 0.5, "0.5000 USD")
    assert cost["month"]["cost"] == 0.5 and cost["month"]["display"] == "0.5000 USD"
    assert metrics.LLM_SPEND_TODAY._value.get() == 0.5

    # Tokens of a model without a price: the cost is unknown, never 0.
    await data.brief(await data.user(), now.date(), prompt_tokens=7, completion_tokens=3, completed_at=now)
    today = (await compute(db))["llm"]["cost"]["today"]
    assert today["cost"] is None and today["prompt_tokens"] == 107
    assert today["display"] == "unknown (1 unpriced brief(s); 0.5000 USD priced)"
