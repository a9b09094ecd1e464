"""Migrations: idempotent, safe when two run at once, forward-only, and producing the declared schema."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from briefs.contract import BRIEF_JOB, EMAIL_JOB
from briefs.migrate import SQL_DIR, MigrationError, load_migrations, migrate, migrate_url, require_schema

# --------------------------------------------------------------------------- the declared schema (DESIGN §3)
# "column type [null]": what operators' SQL and the code rely on. A migration that changes any of
# it must change this declaration too (deliberately, with a README note).

NN, NULL = "not null", "null"
TS = "timestamp with time zone"

EXPECTED_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "queue_jobs": [
        ("id", "bigint", NN), ("job_type", "text", NN), ("payload", "jsonb", NN), ("status", "text", NN),
        ("priority", "smallint", NN), ("run_at", TS, NN), ("attempts", "integer", NN),
        ("max_attempts", "integer", NN), ("dedup_key", "text", NULL), ("user_id", "bigint", NULL),
        ("notify_at", TS, NULL), ("locked_by", "text", NULL), ("lease_expires_at", TS, NULL),
        ("processing_token", "uuid", NULL), ("heartbeat_at", TS, NULL), ("started_at", TS, NULL),
        ("finished_at", TS, NULL), ("last_error", "text", NULL), ("result", "jsonb", NULL),
        ("progress", "jsonb", NULL), ("created_at", TS, NN), ("updated_at", TS, NN),
    ],
    "users": [
        ("id", "bigint", NN), ("email", "text", NN), ("name", "text", NULL), ("timezone", "text", NN),
        ("last_visit_at", TS, NULL), ("created_at", TS, NN),
    ],
    "projects": [
        ("id", "bigint", NN), ("user_id", "bigint", NN), ("name", "text", NN), ("description", "text", NULL),
        ("status", "text", NN), ("created_at", TS, NN), ("updated_at", TS, NN),
    ],
    "tasks": [
        ("id", "bigint", NN), ("project_id", "bigint", NN), ("user_id", "bigint", NN), ("title", "text", NN),
        ("description", "text", NULL), ("status", "text", NN), ("priority", "text", NN),
        ("start_date", "date", NULL), ("due_date", "date", NULL), ("completed_at", TS, NULL),
        ("created_at", TS, NN), ("updated_at", TS, NN), ("deleted_at", TS, NULL),
    ],
    "notes": [
        ("id", "bigint", NN), ("project_id", "bigint", NN), ("user_id", "bigint", NN), ("title", "text", NN),
        ("content", "text", NN), ("created_at", TS, NN), ("updated_at", TS, NN),
    ],
    "brief_preferences": [
        ("user_id", "bigint", NN), ("frequency", "text", NN), ("day_of_week", "smallint", NULL),
        ("time_of_day", "time without time zone", NN), ("is_active", "boolean", NN),
        ("email_enabled", "boolean", NN), ("updated_at", TS, NN), ("next_due_at", TS, NULL),
    ],
    "daily_briefs": [
        ("id", "bigint", NN), ("user_id", "bigint", NN), ("brief_date", "date", NN), ("status", "text", NN),
        ("subject", "text", NULL), ("summary_markdown", "text", NULL), ("executive_summary", "text", NULL),
        ("priority_actions", "jsonb", NULL), ("engagement_stage", "text", NULL), ("progress", "jsonb", NULL),
        ("error", "text", NULL), ("model", "text", NULL), ("prompt_tokens", "integer", NN),
        ("completion_tokens", "integer", NN), ("metadata", "jsonb", NN), ("notify_at", TS, NULL),
        ("email_sent_at", TS, NULL), ("started_at", TS, NULL), ("completed_at", TS, NULL),
        ("created_at", TS, NN), ("updated_at", TS, NN), ("cost", "numeric", NULL),
    ],
    "project_daily_briefs": [
        ("id", "bigint", NN), ("daily_brief_id", "bigint", NN), ("project_id", "bigint", NN),
        ("status", "text", NN), ("content_markdown", "text", NULL), ("error", "text", NULL),
        ("metadata", "jsonb", NN), ("created_at", TS, NN), ("updated_at", TS, NN),
    ],
    "scheduler_ticks": [
        ("id", "bigint", NN), ("tick_at", TS, NN), ("finished_at", TS, NN), ("duration_s", "double precision", NULL),
        ("ok", "boolean", NN), ("user_id", "bigint", NULL), ("summary", "text", NULL), ("report", "jsonb", NULL),
        ("error", "text", NULL),
    ],
    "scheduler_tzdata": [("only_row", "boolean", NN), ("version", "text", NN), ("changed_at", TS, NN)],
    # Views for humans (their columns are always nullable in information_schema).
    "queue_stats": [
        ("job_type", "text", NULL), ("status", "text", NULL), ("jobs", "bigint", NULL),
        ("oldest_pending_age", "interval", NULL), ("next_run_at", TS, NULL), ("max_attempts_used", "integer", NULL),
    ],
    "queue_failures": [
        ("id", "bigint", NULL), ("job_type", "text", NULL), ("user_id", "bigint", NULL), ("dedup_key", "text", NULL),
        ("attempts", "integer", NULL), ("max_attempts", "integer", NULL), ("last_error", "text", NULL),
        ("payload", "jsonb", NULL), ("created_at", TS, NULL), ("started_at", TS, NULL), ("finished_at", TS, NULL),
    ],
}
VIEWS = {"queue_stats", "queue_failures"}
TABLES = set(EXPECTED_COLUMNS) - VIEWS

# (table, index) → definition after "USING btree ".
EXPECTED_INDEXES: dict[tuple[str, str], str] = {
    ("queue_jobs", "queue_jobs_pkey"): "UNIQUE (id)",
    ("queue_jobs", "queue_jobs_claim"): "(priority, run_at, id) WHERE (status = 'pending'::text)",
    ("queue_jobs", "queue_jobs_claim_deadline"): "(priority, COALESCE(notify_at, run_at), id, run_at) "
                                                 "WHERE (status = 'pending'::text)",
    ("queue_jobs", "queue_jobs_dedup_live"): "UNIQUE (dedup_key) WHERE ((dedup_key IS NOT NULL) AND "
                                             "(status = ANY (ARRAY['pending'::text, 'processing'::text])))",
    ("queue_jobs", "queue_jobs_dedup_key"): "(dedup_key) WHERE (dedup_key IS NOT NULL)",
    ("queue_jobs", "queue_jobs_lease"): "(lease_expires_at) WHERE (status = 'processing'::text)",
    ("queue_jobs", "queue_jobs_finished"): "(finished_at) WHERE (status = ANY "
                                           "(ARRAY['completed'::text, 'failed'::text, 'cancelled'::text]))",
    ("queue_jobs", "queue_jobs_user"): "(user_id, job_type) WHERE (user_id IS NOT NULL)",
    ("queue_jobs", "queue_jobs_failed"): "(id) WHERE (status = ANY (ARRAY['failed'::text, 'cancelled'::text]))",
    # left out: the contract's two job types (renaming one fails here: the index would then cover it)
    ("queue_jobs", "queue_jobs_other_types"): "(job_type, id) WHERE (job_type <> ALL "
                                              f"(ARRAY['{BRIEF_JOB}'::text, '{EMAIL_JOB}'::text]))",
    ("users", "users_pkey"): "UNIQUE (id)",
    ("users", "users_email_key"): "UNIQUE (email)",
    ("users", "users_email_prefix"): "(\"left\"(lower(email), 200) text_pattern_ops)",
    ("users", "users_name_prefix"): "(\"left\"(lower(name), 200) text_pattern_ops)",
    ("projects", "projects_pkey"): "UNIQUE (id)",
    ("projects", "projects_user_active"): "(user_id) WHERE (status = 'active'::text)",
    ("tasks", "tasks_pkey"): "UNIQUE (id)",
    ("tasks", "tasks_project_live"): "(project_id) WHERE (deleted_at IS NULL)",
    ("notes", "notes_pkey"): "UNIQUE (id)",
    ("notes", "notes_project_recent"): "(project_id, updated_at DESC)",
    ("brief_preferences", "brief_preferences_pkey"): "UNIQUE (user_id)",
    ("brief_preferences", "brief_preferences_active"): "(user_id) WHERE is_active",
    ("brief_preferences", "brief_preferences_next_due"): "(next_due_at) WHERE is_active",
    ("daily_briefs", "daily_briefs_pkey"): "UNIQUE (id)",
    ("daily_briefs", "daily_briefs_user_date"): "UNIQUE (user_id, brief_date)",
    ("daily_briefs", "daily_briefs_user_latest"): "(user_id, brief_date DESC)",
    ("daily_briefs", "daily_briefs_completed"): "(completed_at) WHERE (completed_at IS NOT NULL)",
    ("daily_briefs", "daily_briefs_processing"): "(user_id, brief_date) WHERE (status = 'processing'::text)",
    ("project_daily_briefs", "project_daily_briefs_pkey"): "UNIQUE (id)",
    ("project_daily_briefs", "project_daily_briefs_unique"): "UNIQUE (daily_brief_id, project_id)",
    ("scheduler_ticks", "scheduler_ticks_pkey"): "UNIQUE (id)",
    ("scheduler_ticks", "scheduler_ticks_finished"): "(finished_at DESC, id DESC)",
    ("scheduler_tzdata", "scheduler_tzdata_pkey"): "UNIQUE (only_row)",
}

# The enumerations of DESIGN §3, enforced by CHECK constraints.
EXPECTED_VALUES: dict[tuple[str, str], set[str]] = {
    ("queue_jobs", "status"): {"pending", "processing", "completed", "failed", "cancelled"},
    ("projects", "status"): {"active", "paused", "completed", "archived"},
    ("tasks", "status"): {"backlog", "in_progress", "done", "blocked", "cancelled"},
    ("tasks", "priority"): {"low", "medium", "high"},
    ("brief_preferences", "frequency"): {"daily", "weekly"},
    ("daily_briefs", "status"): {"processing", "completed", "partial", "failed", "skipped"},
    ("project_daily_briefs", "status"): {"processing", "completed", "failed", "skipped"},
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def fresh_db(pg_server_url: str) -> Iterator[str]:
    """An empty database of this test's own."""
    name = f"briefs_migrate_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(pg_server_url)._replace(path="/" + name))
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def applied(url: str) -> list[tuple[int, str, str]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


# --------------------------------------------------------------------------- tests


async def test_migrating_twice_is_a_no_op(fresh_db: str) -> None:
    first = await migrate_url(fresh_db)
    assert [m.name for m in first] == [m.name for m in load_migrations()]
    before = await applied(fresh_db)
    assert await migrate_url(fresh_db) == []
    assert await applied(fresh_db) == before
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        await require_schema(conn)


async def test_a_database_without_migrations_is_refused_with_the_fix(fresh_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        with pytest.raises(MigrationError, match="run `briefs migrate` first"):
            await require_schema(conn)


async def test_two_concurrent_migrations_on_a_fresh_database_are_safe(fresh_db: str) -> None:
    results = await asyncio.gather(migrate_url(fresh_db), migrate_url(fresh_db), migrate_url(fresh_db))
    counts = sorted(len(r) for r in results)
    assert counts == [0, 0, len(load_migrations())]  # one applied everything, the others waited and found none
    assert [v for v, _, _ in await applied(fresh_db)] == [m.version for m in load_migrations()]


def copy_migrations(to: Path) -> Path:
    for path in SQL_DIR.glob("*.sql"):
        shutil.copy(path, to / path.name)
    return sorted(to.glob("*.sql"))[0]


def append(path: Path, text: str) -> None:
    path.write_text((path.read_text() if path.exists() else "") + text)


async def test_an_edited_applied_migration_is_refused(fresh_db: str, tmp_path: Path) -> None:
    first = copy_migrations(tmp_path)
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        await migrate(conn, tmp_path)
    append(first, "\n-- an innocent-looking edit\n")
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        with pytest.raises(MigrationError, match=rf"migration {first.stem} was changed after it was applied"):
            await migrate(conn, tmp_path)
    # Forward-only: the original file back plus a new file, and the new one applies.
    copy_migrations(tmp_path)
    append(tmp_path / "9999_forward.sql", "CREATE TABLE forward_only (id int);")
    async with await psycopg.AsyncConnection.connect(fresh_db) as conn:
        assert [m.name for m in await migrate(conn, tmp_path)] == ["9999_forward"]


async def test_the_migrated_schema_is_the_declared_one(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            """SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns
               WHERE table_schema = 'public' AND table_name = ANY(%s) ORDER BY table_name, ordinal_position""",
            (list(EXPECTED_COLUMNS),),
        )
        columns: dict[str, list[tuple[str, str, str]]] = {}
        for table, column, type_, nullable in await cur.fetchall():
            columns.setdefault(table, []).append((column, type_, NULL if nullable == "YES" else NN))
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.views WHERE table_schema = 'public' AND table_name = ANY(%s)",
            (list(VIEWS),),
        )
        views = {r[0] for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(%s)",
            (list(TABLES),),
        )
        indexes = {}
        for table, name, definition in await cur.fetchall():
            unique = "UNIQUE " if definition.startswith("CREATE UNIQUE") else ""
            indexes[(table, name)] = unique + definition.split(" USING btree ", 1)[-1]
        cur = await conn.execute(
            """SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint
               WHERE contype = 'c' AND connamespace = 'public'::regnamespace"""
        )
        checks = await cur.fetchall()

    for table, expected in EXPECTED_COLUMNS.items():
        assert columns.get(table) == expected, f"{table}: columns differ from the declaration"
    assert views == VIEWS
    assert indexes == EXPECTED_INDEXES
    for (table, column), values in EXPECTED_VALUES.items():
        found = [set(re.findall(r"'(\w+)'::text", d)) for t, d in checks
                 if t == table and re.match(rf"CHECK \(\(?\(?{column} = ANY", d)]
        assert found == [values], f"{table}.{column}: allowed values {found} != {values}"


async def test_queue_stats_survives_infinite_instants(database_url: str) -> None:
    """Operators' SELECT * FROM queue_stats must not fail because one row holds an infinite run_at."""
    from tests.conftest import truncate_all

    truncate_all(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO queue_jobs (job_type, run_at) VALUES
               ('noop', '-infinity'), ('noop', 'infinity'), ('noop', now() - interval '1 minute')"""
        )
        cur = await conn.execute("SELECT jobs, oldest_pending_age FROM queue_stats WHERE job_type = 'noop'")
        jobs, age = await cur.fetchone()  # type: ignore[misc]
    truncate_all(database_url)
    assert jobs == 3
    assert 50 <= age.total_seconds() < 3600
