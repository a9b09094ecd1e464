"""The worker's dedicated database connections, and which of their failures are worth retrying.

Outside the pool on purpose: a pooled connection is checked out with a ping and
handed back with a reset, and its transactions cost a BEGIN and a COMMIT round
trip each; a single autocommit statement is its own transaction (one round trip,
one commit). Handlers use the pool, and a handler that holds every pool connection
must not starve the worker's own bookkeeping (heartbeats, completions) of one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from briefs.db import Database, is_connection_error
from worker import queue

log = logging.getLogger(__name__)

# Lock conflicts between the worker's own statements (a heartbeat and a completion batch touch the
# same rows in different orders: the deadlock detector aborts one) are retried like an outage.
_CONFLICT = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable)


def retryable(exc: BaseException) -> bool:
    """An outage or a lock conflict: the same statement may well succeed when tried again."""
    return isinstance(exc, _CONFLICT) or is_connection_error(exc)


def first_line(exc: BaseException) -> str:
    """The first line of an error's text, for a log line (its type when it has no text)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class DedicatedConnection:
    """A dedicated autocommit connection for one hot loop, replaced when it breaks.

    With ``hot`` (the claim and completion loops) its session settings
    (``queue.HOT_PATH_OPTIONS``) suit only the queue's hot statements, so it is never
    shared; the lease connection (not hot) is shared by the worker's bookkeeping tasks,
    whose statements psycopg runs one at a time.
    """

    def __init__(self, db: Database, application_name: str, *, hot: bool = True) -> None:
        self.db = db
        self.application_name = application_name
        self.hot = hot
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._cursor: psycopg.AsyncCursor[Any] | None = None
        self._connecting = asyncio.Lock()

    async def get(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        async with self._connecting:  # several tasks may find it broken at once: one reconnects
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                await self.close()
                conn = await self._connect()
                self._conn, self._cursor = conn, conn.cursor()
        return conn

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        given = conninfo_to_dict(self.db.url)
        extra: dict[str, Any] = {}
        if self.hot:
            extra["options"] = f"{given.get('options') or ''} {queue.HOT_PATH_OPTIONS}".strip()
        if "connect_timeout" not in given:
            extra["connect_timeout"] = 10  # a stop must not wait minutes on an unreachable host
        conn = await psycopg.AsyncConnection.connect(
            self.db.url, autocommit=True, application_name=self.application_name, **extra
        )
        if self.hot:
            queue.prepare_hot_connection(conn)
        return conn

    async def cursor(self) -> psycopg.AsyncCursor[Any]:
        """The connection's one cursor, reused by every statement (cheaper than a cursor per execute)."""
        conn = await self.get()
        assert self._cursor is not None and self._cursor.connection is conn
        return self._cursor

    async def close(self) -> None:
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # a dead connection may fail to close
                log.debug("closing a broken connection failed", exc_info=True)
