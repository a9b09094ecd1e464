"""The connection pool behind ``Database.raw()`` (psycopg_pool), against the real server.

Broken connections are discarded, errors roll back, an exhausted pool makes checkouts wait
(and a timeout says why), the worker's lease statements never wait for the pool, and the
pool's statistics reach /metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY, generate_latest
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

import briefs.db
from briefs.db import Database, DatabaseUnavailable, is_connection_error
from tests.conftest import make_settings, rescue_continuously
from worker import queue
from worker.handlers import builtin_handlers
from worker.queue import NewJob
from worker.runner import Worker


@asynccontextmanager
async def pool_of(database_url: str, size: int) -> AsyncIterator[Database]:
    """A Database of its own with ``BRIEFS_DB_POOL_SIZE`` = ``size`` (at most 2 × size connections)."""
    db = Database(make_settings(database_url), database_url, pool_size=size)
    try:
        yield db
    finally:
        await db.dispose()


async def backend_pid(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT pg_backend_pid() AS pid")
    (pid,) = await cur.fetchone()  # type: ignore[misc]
    return int(pid)


async def pids_of(db: Database, count: int) -> list[int]:
    """Check out ``count`` connections at once (the pool grows to hold them); their backend pids."""
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(db.raw()) for _ in range(count)]
        return [await backend_pid(conn) for conn in conns]


def terminate(database_url: str, pids: list[int]) -> None:
    """Kill these backends from another connection and wait until the server has let them go."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone():
            admin.execute("SELECT pg_sleep(0.01)")


async def count_jobs(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        row = await (await conn.execute("SELECT count(*) AS n FROM queue_jobs")).fetchone()
        assert row is not None
        return int(row["n"])


# --------------------------------------------------------------------------- broken connections


async def test_a_connection_killed_mid_transaction_is_never_handed_out_again(clean_db: str) -> None:
    async with pool_of(clean_db, 1) as db:
        with pytest.raises(psycopg.OperationalError) as caught:
            async with db.raw() as conn:
                killed = await backend_pid(conn)
                terminate(clean_db, [killed])
                await conn.execute("SELECT 1")
        assert is_connection_error(caught.value)
        assert db.pool_stats()["returns_bad"] == 1
        seen = [pid for _ in range(5) for pid in await pids_of(db, 2)]
        assert killed not in seen


async def test_idle_connections_killed_together_cost_one_failed_transaction(clean_db: str) -> None:
    """As after a server restart: the first transaction on a dead connection fails; the idle ones
    that were killed with it are pinged before their next use and replaced, not handed out."""
    async with pool_of(clean_db, 2) as db:
        killed = await pids_of(db, 3)
        assert db.pool_stats()["pool_available"] == 3
        terminate(clean_db, killed)
        with pytest.raises(psycopg.OperationalError):
            async with db.raw() as conn:
                await conn.execute("SELECT 1")
        for _ in range(5):
            async with db.raw() as conn:
                assert await backend_pid(conn) not in killed
        stats = db.pool_stats()
        assert stats["returns_bad"] == 1  # the one transaction that failed
        assert stats["connections_lost"] == 2  # the other two, found dead by the ping at checkout


async def test_a_checkout_sends_no_ping_while_nothing_broke(clean_db: str) -> None:
    """The pool's check runs on every checkout; it pings only after a connection was found broken."""
    pings: list[int] = []
    real = briefs.db.AsyncConnectionPool.check_connection

    async def counting(conn: psycopg.AsyncConnection[Any]) -> None:
        pings.append(1)
        await real(conn)

    async with pool_of(clean_db, 1) as db:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(briefs.db.AsyncConnectionPool, "check_connection", staticmethod(counting))
            await pids_of(db, 2)
            for _ in range(10):
                async with db.raw() as conn:
                    await conn.execute("SELECT 1")
            assert pings == []
            with pytest.raises(psycopg.OperationalError):
                async with db.raw() as conn:
                    terminate(clean_db, [await backend_pid(conn)])
                    await conn.execute("SELECT 1")
            for _ in range(10):
                async with db.raw() as conn:
                    await conn.execute("SELECT 1")
            assert pings == [1]  # the one connection that sat idle meanwhile, once


# --------------------------------------------------------------------------- errors roll back


async def test_an_error_in_the_block_rolls_back_and_the_connection_is_reused(clean_db: str) -> None:
    async with pool_of(clean_db, 1) as db:
        with pytest.raises(RuntimeError, match="handler failed"):
            async with db.raw() as conn:
                first = await backend_pid(conn)
                await queue.enqueue(conn, NewJob("noop"))
                raise RuntimeError("handler failed")
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with db.raw() as conn:
                assert await backend_pid(conn) == first
                await queue.enqueue(conn, NewJob("noop"))
                await conn.execute("SELECT 1 / 0")
        async with db.raw() as conn:
            assert await backend_pid(conn) == first
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert await count_jobs(clean_db) == 0
        async with db.raw() as conn:
            await queue.enqueue(conn, NewJob("noop"))
        assert await count_jobs(clean_db) == 1
        assert db.pool_stats()["returns_bad"] == 0


async def test_a_cancelled_block_leaves_no_transaction_behind(clean_db: str) -> None:
    async with pool_of(clean_db, 1) as db:
        started = asyncio.Event()

        async def stuck() -> None:
            async with db.raw() as conn:
                await queue.enqueue(conn, NewJob("noop"))
                started.set()
                await conn.execute("SELECT pg_sleep(60)")

        task = asyncio.create_task(stuck())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with db.raw() as conn:
            await conn.execute("SELECT 1")
        assert await count_jobs(clean_db) == 0


# --------------------------------------------------------------------------- exhaustion


async def test_an_exhausted_pool_makes_the_next_checkout_wait_for_a_free_connection(clean_db: str) -> None:
    async with pool_of(clean_db, 1) as db, AsyncExitStack() as held:
        first = db.raw()
        first_pid = await backend_pid(await first.__aenter__())
        await held.enter_async_context(db.raw())
        assert db.pool_stats()["pool_size"] == db.max_size == 2
        queued = db.pool_stats()["requests_queued"]  # the checkouts that waited for the pool to grow

        async def third() -> int:
            async with db.raw() as conn:
                return await backend_pid(conn)

        waiting = asyncio.create_task(third())
        while db.pool_stats()["requests_waiting"] == 0:  # noqa: ASYNC110 - the pool signals no event for it
            await asyncio.sleep(0.01)
        assert not waiting.done()
        await first.__aexit__(None, None, None)  # gives one back: the waiting checkout gets it
        assert await waiting == first_pid
        stats = db.pool_stats()
        assert (stats["requests_queued"], stats["requests_errors"], stats["pool_size"]) == (queued + 1, 0, 2)


async def test_a_checkout_that_times_out_says_the_pool_is_exhausted(clean_db: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(briefs.db, "POOL_TIMEOUT", 0.2)
    async with pool_of(clean_db, 1) as db, AsyncExitStack() as held:
        for _ in range(db.max_size):
            await held.enter_async_context(db.raw())
        with pytest.raises(PoolTimeout) as caught:
            async with db.raw():
                pass
        message = str(caught.value)
        assert message.startswith("no pooled database connection free after 0.2 s: 2 of at most 2 in use"), message
        assert "BRIEFS_DB_POOL_SIZE" in message
        assert is_connection_error(caught.value)  # handlers retry it; the scheduler logs it as an outage
        assert db.pool_stats()["requests_errors"] == 1


async def test_an_unreachable_server_is_reported_at_once_with_its_reason() -> None:
    url = "postgresql://nobody@127.0.0.1:1/none"
    db = Database(make_settings(url), url)
    try:
        with pytest.raises(DatabaseUnavailable, match=r"^database unreachable \(postgresql://nobody@127.0.0.1:1/none\)"):
            await db.check()
        assert db.pool_stats()["requests_num"] == 0  # found out before the pool waited for anything
    finally:
        await db.dispose()


async def test_a_disposed_database_opens_a_new_pool_when_used_again(clean_db: str) -> None:
    async with pool_of(clean_db, 1) as db:
        await pids_of(db, 2)
        await db.dispose()
        assert db.pool_stats()["pool_size"] == 0
        await db.check()
        assert db.pool_stats()["requests_num"] == 1


# --------------------------------------------------------------------------- the worker's own connections


async def test_lease_statements_run_while_every_pooled_connection_is_held(clean_db: str) -> None:
    """The worker's claims, heartbeats and completions use connections of their own (worker/runner.py):
    with the pool held empty from outside, a job that runs for three lease periods keeps its lease
    (nothing rescues it) and completes once."""
    async with pool_of(clean_db, 1) as db, AsyncExitStack() as held:
        lease = 0.5
        async with db.raw() as conn:
            job_id = await queue.enqueue(conn, NewJob("noop", {"sleep_ms": int(lease * 3000)}))
        for _ in range(db.max_size):
            await held.enter_async_context(db.raw())
        assert db.pool_stats()["pool_available"] == 0
        asked = db.pool_stats()["requests_num"]
        async with await psycopg.AsyncConnection.connect(db.url) as direct:  # a connection outside the pool
            assert (await (await direct.execute("SELECT 1 AS one")).fetchone()) == (1,)
        worker = Worker(db, make_settings(db.url, lease_seconds=lease, poll_interval=0.1), builtin_handlers(),
                        concurrency=2, burst=True)
        rescued: list[Any] = []

        watcher = asyncio.create_task(rescue_continuously(db.url, rescued))  # takes over any expired lease
        try:
            async with asyncio.timeout(30):  # a hang guard: the worker would wait for the pool forever
                stats = await worker.run()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        assert db.pool_stats()["pool_available"] == 0  # the pool was still held throughout
        assert db.pool_stats()["requests_num"] == asked  # and nobody asked it for a connection
    assert rescued == []
    assert (stats.completed, stats.lost) == (1, 0)
    with psycopg.connect(clean_db, row_factory=dict_row) as conn:
        row = conn.execute("SELECT status, attempts FROM queue_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == {"status": "completed", "attempts": 1}


# --------------------------------------------------------------------------- metrics


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, name
    return value


async def test_pool_statistics_are_exported_once_for_all_pools(clean_db: str) -> None:
    before = {name: sample(name) for name in (
        "briefs_db_pool_requests_total", "briefs_db_pool_connections_opened_total",
        "briefs_db_pool_max_connections", "briefs_db_pool_connections", "briefs_db_pool_bad_returns_total")}
    async with pool_of(clean_db, 2) as db, pool_of(clean_db, 3) as other:
        await pids_of(db, 2)
        for _ in range(3):
            async with db.raw() as conn:
                await conn.execute("SELECT 1")
        async with other.raw() as conn:
            await conn.execute("SELECT 1")
        text = generate_latest().decode()
        assert text.count("# TYPE briefs_db_pool_connections gauge") == 1
        for name in ("briefs_db_pool_idle_connections", "briefs_db_pool_waiting_requests",
                     "briefs_db_pool_wait_seconds_total", "briefs_db_pool_request_errors_total",
                     "briefs_db_pool_connection_errors_total", "briefs_db_pool_connections_lost_total"):
            assert f"\n{name} " in text, name
        assert sample("briefs_db_pool_requests_total") == before["briefs_db_pool_requests_total"] + 2 + 3 + 1
        assert sample("briefs_db_pool_max_connections") == before["briefs_db_pool_max_connections"] + 4 + 6
        assert sample("briefs_db_pool_connections") == before["briefs_db_pool_connections"] + 2 + 1
        assert sample("briefs_db_pool_idle_connections") >= 3
        assert sample("briefs_db_pool_waiting_requests") == 0
        opened = sample("briefs_db_pool_connections_opened_total")
        assert opened == before["briefs_db_pool_connections_opened_total"] + 3
        with pytest.raises(psycopg.OperationalError):
            async with db.raw() as conn:
                terminate(clean_db, [await backend_pid(conn)])
                await conn.execute("SELECT 1")
        assert sample("briefs_db_pool_bad_returns_total") == before["briefs_db_pool_bad_returns_total"] + 1
    # Disposed: the gauges drop back, the counters keep what the pools counted.
    assert sample("briefs_db_pool_max_connections") == before["briefs_db_pool_max_connections"]
    assert sample("briefs_db_pool_connections") == before["briefs_db_pool_connections"]
    assert sample("briefs_db_pool_requests_total") == before["briefs_db_pool_requests_total"] + 7
    assert sample("briefs_db_pool_bad_returns_total") == before["briefs_db_pool_bad_returns_total"] + 1
