"""Forward-only SQL migrations from ``sql/NNNN_name.sql``.

Applied in order, each in its own transaction, recorded in ``schema_migrations``
with a checksum. A session advisory lock serializes concurrent migrators; an
applied migration whose file changed is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger(__name__)



def _sql_dir() -> Path:
    """The migrations folder: the top-level ``sql/`` of a source tree, or ``briefs/sql`` in an installed wheel.

    pyproject maps the package ``briefs.sql`` to ``sql/``, so both are one import away;
    the source tree's folder is the fallback when the package cannot be imported.
    """
    try:
        import briefs.sql as package
    except ImportError:
        package = None
    for entry in getattr(package, "__path__", ()):
        path = Path(entry)
        if any(path.glob("*.sql")):
            return path
    return Path(__file__).resolve().parent.parent / "sql"


SQL_DIR = _sql_dir()
MIGRATION_LOCK_KEY = 0x6272696566_01  # "brief" + 1: stable across processes
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a number")
    if not found:
        raise MigrationError(f"no migrations found in {sql_dir}")
    return found


async def migrate(
    conn: psycopg.AsyncConnection[Any],
    sql_dir: Path = SQL_DIR,
    on_step: Callable[[Migration, int, int], None] | None = None,
) -> list[Migration]:
    """Apply pending migrations on ``conn`` (autocommit is managed here). Returns what was applied."""
    migrations = load_migrations(sql_dir)
    await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        cur = await conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        applied = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        known = {m.version for m in migrations}
        for version, (name, _) in applied.items():
            if version not in known:
                log.warning("database has migration %s (%s) that this code does not know", version, name)
        for m in migrations:
            if m.version in applied and applied[m.version][1] != m.checksum:
                raise MigrationError(
                    f"migration {m.name} was changed after it was applied "
                    f"(checksum {applied[m.version][1][:12]} in the database, {m.checksum[:12]} on disk); "
                    "migrations are forward-only: add a new file instead"
                )
        pending = [m for m in migrations if m.version not in applied]
        for index, m in enumerate(pending, 1):
            async with conn.transaction():
                await conn.execute(m.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )
            log.info("applied migration %s", m.name)
            if on_step:
                on_step(m, index, len(pending))
        return pending
    finally:
        if not conn.closed:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


async def migrate_url(url: str, on_step: Callable[[Migration, int, int], None] | None = None) -> list[Migration]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await migrate(conn, on_step=on_step)


async def pending_migrations(conn: psycopg.AsyncConnection[Any], sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Migrations not yet applied (all of them on an empty database)."""
    migrations = load_migrations(sql_dir)
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return migrations
    cur = await conn.execute("SELECT version FROM schema_migrations")
    applied = {r[0] for r in await cur.fetchall()}
    return [m for m in migrations if m.version not in applied]


async def require_schema(conn: psycopg.AsyncConnection[Any]) -> None:
    """Refuse to run against a database that lacks migrations, with the fix in the message."""
    pending = await pending_migrations(conn)
    if pending:
        names = ", ".join(m.name for m in pending)
        raise MigrationError(f"the database is missing migrations ({names}): run `briefs migrate` first")
