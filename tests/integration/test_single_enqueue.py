"""One enqueue is one statement (the insert and its NOTIFY together): one round trip, one commit.

Statements are counted from libpq's protocol trace of the connection: every statement psycopg
sends ends with a ``Sync`` message (extended protocol) or is a ``Query`` message (simple protocol).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg import pq

from briefs.db import Database
from worker import queue
from worker.queue import JobRejected, NewJob

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture
async def autocommit(db: Database) -> AsyncIterator[Conn]:
    async with await psycopg.AsyncConnection.connect(db.url, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def listener(db: Database) -> AsyncIterator[Conn]:
    async with await psycopg.AsyncConnection.connect(db.url, autocommit=True) as conn:
        await conn.execute(f"LISTEN {queue.NOTIFY_CHANNEL}")
        yield conn


async def statements_sent(conn: Conn, action: Callable[[], Awaitable[Any]]) -> tuple[Any, list[str]]:
    """Run ``action`` with the connection's protocol traced; its result and the statements the client sent."""
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            result = await action()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines = trace.read().splitlines()
    sent = [line.split("\t")[2].split()[0] for line in lines if line.startswith("F\t")]
    return result, [message for message in sent if message in ("Sync", "Query")]


async def notifications(conn: Conn) -> int:
    """The notifications the listener holds (all those committed before the call are delivered by then)."""
    return len([n async for n in conn.notifies(timeout=0.5)])


async def test_one_enqueue_is_one_statement_and_wakes_listeners(autocommit: Conn, listener: Conn) -> None:
    job_id, sent = await statements_sent(autocommit, lambda: queue.enqueue(autocommit, NewJob("noop", {"a": 1})))
    assert len(sent) == 1, sent
    assert isinstance(job_id, int)
    cur = await autocommit.execute("SELECT job_type, payload, status FROM queue_jobs WHERE id = %s", (job_id,))
    assert await cur.fetchone() == ("noop", {"a": 1}, "pending")
    assert await notifications(listener) == 1


async def test_every_enqueue_stays_one_statement_once_prepared(autocommit: Conn) -> None:
    for i in range(8):  # psycopg prepares a statement after a few executions: still one statement each
        await queue.enqueue(autocommit, NewJob("noop", {"i": i}))
    _, sent = await statements_sent(autocommit, lambda: queue.enqueue(autocommit, NewJob("noop")))
    assert len(sent) == 1, sent


async def test_a_duplicate_returns_none_and_wakes_nobody(autocommit: Conn, listener: Conn) -> None:
    first = await queue.enqueue(autocommit, NewJob("noop", dedup_key="brief:1"))
    assert first is not None
    assert await notifications(listener) == 1
    duplicate = NewJob("noop", dedup_key="brief:1")
    again, sent = await statements_sent(autocommit, lambda: queue.enqueue(autocommit, duplicate))
    assert again is None
    assert len(sent) == 1
    assert await notifications(listener) == 0
    cur = await autocommit.execute("SELECT count(*) FROM queue_jobs WHERE dedup_key = 'brief:1'")
    assert await cur.fetchone() == (1,)


async def test_all_fields_are_stored(autocommit: Conn) -> None:
    cur = await autocommit.execute("SELECT now() + interval '1 hour', now() + interval '2 hours'")
    row = await cur.fetchone()
    assert row is not None
    run_at, notify_at = row
    job_id = await queue.enqueue(autocommit, NewJob("noop", {"x": "é"}, priority=-3, run_at=run_at, max_attempts=9,
                                                    dedup_key="k", user_id=2**40, notify_at=notify_at),
                                 default_max_attempts=2)
    cur = await autocommit.execute(
        "SELECT payload, priority, run_at, max_attempts, dedup_key, user_id, notify_at FROM queue_jobs WHERE id = %s",
        (job_id,))
    assert await cur.fetchone() == ({"x": "é"}, -3, run_at, 9, "k", 2**40, notify_at)
    default = await queue.enqueue(autocommit, NewJob("noop"), default_max_attempts=2)
    cur = await autocommit.execute("SELECT max_attempts, run_at <= now() FROM queue_jobs WHERE id = %s", (default,))
    assert await cur.fetchone() == (2, True)


async def test_a_bad_job_is_refused_before_any_statement(autocommit: Conn, listener: Conn) -> None:
    async def bad() -> Any:
        with pytest.raises(JobRejected, match="over the limit"):
            await queue.enqueue(autocommit, NewJob("noop", {"x": "y" * 200}), max_payload_bytes=100)

    _, sent = await statements_sent(autocommit, bad)
    assert sent == []
    assert await notifications(listener) == 0


async def test_a_bulk_enqueue_is_one_statement_with_one_notify(autocommit: Conn, listener: Conn) -> None:
    jobs = [NewJob("noop"), NewJob("noop", dedup_key="d"), NewJob("noop", dedup_key="d"), NewJob("noop")]
    ids, sent = await statements_sent(autocommit, lambda: queue.enqueue_many(autocommit, jobs))
    assert len(sent) == 1, sent
    assert [i is None for i in ids] == [False, False, True, False]
    assert await notifications(listener) == 1
    again = await queue.enqueue_many(autocommit, [NewJob("noop", dedup_key="d")])
    assert list(again) == [None]
    assert await notifications(listener) == 0  # nothing went in: nobody is woken
    quiet = await queue.enqueue_many(autocommit, [NewJob("noop")], notify=False)
    assert quiet[0] is not None
    assert await notifications(listener) == 0
