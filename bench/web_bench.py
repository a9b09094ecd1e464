"""Console and API benchmark at production size (run by hand; results go to bench/README-web.md).

    .venv/bin/python bench/web_bench.py seed    --url postgresql://postgres@127.0.0.1:5432/briefs_webbench
    .venv/bin/python bench/web_bench.py latency --url …   [--repeat 20] [--port 0] [--only jobs]
    .venv/bin/python bench/web_bench.py load    --url …   [--rps 200] [--seconds 30] [--connections 64]
    .venv/bin/python bench/web_bench.py explain --url …   [--only users] [-v]

``--url`` defaults to ``postgresql://postgres@127.0.0.1:5432/briefs_webbench``.

``seed`` drops and creates the database named in ``--url`` (its name must contain ``bench``; no other
database is touched), migrates it with ``briefs migrate`` and fills it with SQL only (``generate_series``),
then VACUUM ANALYZE (about 30 s):

* 100,000 users (names, emails, 47 real IANA zones), every one with brief preferences (a tenth weekly);
* every 10th user has 1–5 projects with tasks and notes, and 20 days of daily briefs (each with a
  project brief per active project); users 10, 20 and 30 have 400 days of briefs;
* 1,000,000 queue jobs in id order over the last 7 days, denser towards now (7.5 % finished in the
  last hour, 38 % in the last day): 96 % completed, 2.5 % failed, 1 % cancelled, 200 processing (4
  workers), 5,000 pending (2,000 due later); 60 % brief and 30 % email jobs with the contract's dedup
  keys, the rest four other types, and one type (import_contacts) only among the oldest 30,000.

``latency`` starts ``briefs web`` over the database (BRIEFS_ADMIN_TOKEN set, a free port), logs in for
the console's cookie, and requests every API route and page ``--repeat`` times after two warm-ups, one at
a time on one keep-alive connection, reading the ``Server-Timing: app;dur=`` header (server time) and the
client's wall time; routes over 200 ms server time are marked. The stats snapshot is measured twice:
as served from its cache, and with a pause that lets it expire before each request.

``load`` starts the server the same way and drives the API from this (separate) process at a fixed
arrival rate (open loop: request i leaves at start + i/rps whatever the earlier ones did, and its latency
counts from that instant, so a stalled server cannot hide its queue), over ``--connections`` keep-alive
connections of a minimal HTTP/1.1 client (a tenth of httpx's CPU). It prints the achieved rate, errors,
latency percentiles overall and per kind of request, and the CPU the server, the generator and the whole
machine used: the generator shares the machine's cores with the server and PostgreSQL.

``explain`` runs EXPLAIN (ANALYZE, BUFFERS) of the queries behind the routes (imported from
briefs.web.queries, briefs.web.stats, worker.queue, briefs.health) with the parameters the routes pass.

``--server-repo DIR`` runs the server from another source tree (with this virtualenv), to measure a
change side by side with the code as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from briefs.contract import BRIEF_JOB, EMAIL_JOB  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/briefs_webbench"
TOKEN = "web-bench-admin-token-0123456789abcdef"
USERS = 100_000
JOBS = 1_000_000
PENDING = 5_000
PENDING_LATER = 2_000
PROCESSING = 200
BRIEF_USERS_EVERY = 10  # every 10th user has projects and briefs
BRIEF_DAYS = 20
HEAVY_USERS = (10, 20, 30)  # 400 days of briefs each
HEAVY_DAYS = 400
SLOW_MS = 200.0
OTHER_JOBS = ("sync_calendar", "send_weekly_digest", "prune_history", "deliver_webhook")
RETIRED_JOB = "import_contacts"  # only in the oldest history (a type no longer made)

# fmt: off
ZONES = [  # real IANA zones; the first ones appear more often (see _zone_sql)
    "America/New_York", "Europe/London", "America/Los_Angeles", "Europe/Berlin", "Asia/Kolkata", "America/Chicago",
    "Europe/Paris", "Asia/Tokyo", "Australia/Sydney", "America/Sao_Paulo", "Europe/Madrid", "Asia/Singapore",
    "America/Denver", "Europe/Amsterdam", "Asia/Shanghai", "America/Toronto", "Europe/Stockholm", "Asia/Dubai",
    "America/Mexico_City", "Europe/Warsaw", "Africa/Lagos", "Asia/Seoul", "Europe/Istanbul", "America/Phoenix",
    "Pacific/Auckland", "Africa/Johannesburg", "Asia/Jakarta", "Europe/Helsinki", "America/Bogota", "UTC",
    "Asia/Kathmandu", "Australia/Adelaide", "America/St_Johns", "Asia/Tehran", "Pacific/Chatham", "Europe/Dublin",
    "America/Argentina/Buenos_Aires", "Asia/Manila", "Africa/Cairo", "America/Anchorage", "Pacific/Honolulu",
    "Europe/Lisbon", "Asia/Karachi", "Asia/Bangkok", "Europe/Zurich", "Atlantic/Azores", "Australia/Lord_Howe",
]
FIRST = [
    "Emma", "Liam", "Olivia", "Noah", "Ava", "Lucas", "Sofia", "Mateo", "Mia", "Leon", "Hana", "Yuki", "Aarav",
    "Priya", "Chen", "Wei", "Fatima", "Omar", "Amara", "Kwame", "Ingrid", "Lars", "Chloé", "Élodie", "João",
    "María", "José", "Zoë", "Mohammed", "Aisha", "Dmitri", "Olga", "Sven", "Freya", "Kenji", "Sakura", "Ravi",
    "Ananya", "Tomás", "Lucía", "Gabriel", "Isabella", "Jack", "Grace", "Finn", "Nora", "Arjun", "Meera",
]
LAST = [
    "Smith", "Johnson", "García", "Müller", "Rossi", "Dubois", "Kowalski", "Nguyen", "Kim", "Tanaka", "Sato",
    "Patel", "Sharma", "Singh", "Wang", "Li", "Zhang", "Okafor", "Mensah", "Andersson", "Nielsen", "Silva",
    "Santos", "Fernández", "López", "Martin", "Bernard", "Novak", "Horvat", "Ivanova", "Petrov", "Haddad",
    "Cohen", "O'Brien", "Murphy", "Walsh", "Brown", "Taylor", "Wilson", "Clarke", "Schmidt", "Fischer", "Weber",
]
DOMAINS = ["gmail.com", "outlook.com", "yahoo.com", "proton.me", "icloud.com", "acme.io", "example.org", "fastmail.com"]
PROJECTS = [
    "Website relaunch", "Q3 planning", "Mobile app", "Hiring", "Onboarding flow", "Data warehouse", "Book club",
    "Kitchen renovation", "Thesis", "Marathon training", "Billing migration", "Customer interviews", "Newsletter",
]
ERRORS = [
    "LLMError: upstream returned 503 Service Unavailable after 3 tries",
    "SMTPRecipientsRefused: 550 5.1.1 mailbox unavailable",
    "TimeoutError: the job ran past its 300 s limit",
    "PermanentError: user 4711 has no usable timezone 'Mars/Olympus'",
    "ConnectionResetError: [Errno 104] Connection reset by peer",
]
# fmt: on


def _with_dbname(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _dbname(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    if not re.fullmatch(r"[a-z0-9_]+", name) or "bench" not in name:
        raise SystemExit(f"refusing database {name!r}: its name must be [a-z0-9_]+ and contain 'bench'")
    return name


# --------------------------------------------------------------------------- seed


def recreate(url: str) -> None:
    name = _dbname(url)
    with psycopg.connect(_with_dbname(url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([str(REPO / ".venv/bin/briefs"), "migrate"], check=True, env=env, cwd=REPO)


SEED_USERS = """
INSERT INTO users (id, email, name, timezone, last_visit_at, created_at)
SELECT g,
       translate(lower(f.name || '.' || l.name), 'áéíóúüçãë'' ', 'aeiouucae') || g
       || '@' || (%(domains)s::text[])[1 + (g * 7) %% cardinality(%(domains)s::text[])],
       CASE WHEN g %% 50 = 0 THEN NULL ELSE f.name || ' ' || l.name END,
       (%(zones)s::text[])[1 + floor(power(random(), 2) * cardinality(%(zones)s::text[]))::int],
       CASE WHEN g %% 10 < 6 THEN %(now)s - random() * interval '2 days'
            WHEN g %% 10 < 8 THEN NULL
            ELSE %(now)s - random() * interval '60 days' END,
       %(now)s - interval '400 days' + (g::float / %(n)s) * interval '390 days'
FROM generate_series(1, %(n)s) g
JOIN LATERAL (SELECT (%(first)s::text[])[1 + (g * 31 + g / 7) %% cardinality(%(first)s::text[])] AS name) f ON true
JOIN LATERAL (SELECT (%(last)s::text[])[1 + (g * 17 + g / 3) %% cardinality(%(last)s::text[])] AS name) l ON true
"""

SEED_PREFERENCES = """
INSERT INTO brief_preferences (user_id, frequency, day_of_week, time_of_day, is_active, email_enabled)
SELECT g, CASE WHEN g %% 10 = 3 THEN 'weekly' ELSE 'daily' END,
       CASE WHEN g %% 10 = 3 THEN 1 + g %% 7 END,
       time '06:30' + (g %% 12) * interval '15 minutes',
       g %% 20 <> 7, g %% 5 < 2
FROM generate_series(1, %(n)s) g
"""

SEED_PROJECTS = """
INSERT INTO projects (user_id, name, description, status, created_at, updated_at)
SELECT u, (%(names)s::text[])[1 + (u + p) %% cardinality(%(names)s::text[])],
       'What this project is about, in a sentence or two, as the user wrote it.',
       CASE WHEN p = 5 THEN 'paused' ELSE 'active' END, %(now)s - interval '90 days', %(now)s - p * interval '1 day'
FROM generate_series(%(every)s, %(n)s, %(every)s) u, generate_series(1, 1 + (u / %(every)s) %% 5) p
"""

SEED_TASKS = """
INSERT INTO tasks (project_id, user_id, title, status, priority, due_date, completed_at, created_at, updated_at)
SELECT p.id, p.user_id, 'Task ' || t || ' of ' || p.name,
       (ARRAY['backlog', 'in_progress', 'done', 'blocked', 'done'])[1 + (p.id + t) %% 5],
       (ARRAY['low', 'medium', 'high'])[1 + t %% 3], (%(now)s + (t - 3) * interval '1 day')::date,
       CASE WHEN (p.id + t) %% 5 IN (2, 4) THEN %(now)s - t * interval '1 hour' END,
       %(now)s - interval '30 days', %(now)s - t * interval '1 hour'
FROM projects p, generate_series(1, 6) t
"""

SEED_NOTES = """
INSERT INTO notes (project_id, user_id, title, content, created_at, updated_at)
SELECT p.id, p.user_id, 'Meeting notes ' || k, repeat('Discussed the next steps and who does what. ', 8),
       %(now)s - k * interval '2 days', %(now)s - k * interval '2 days'
FROM projects p, generate_series(1, 2) k
"""


def _brief_users_sql() -> str:
    return """
    WITH who AS (
        SELECT u, d FROM generate_series(%(every)s, %(n)s, %(every)s) u, generate_series(1, %(days)s) d
        WHERE u <> ALL(%(heavy)s::bigint[])
        UNION ALL
        SELECT u, d FROM unnest(%(heavy)s::bigint[]) u, generate_series(1, %(heavy_days)s) d)
    INSERT INTO daily_briefs (user_id, brief_date, status, subject, summary_markdown, executive_summary,
                              priority_actions, engagement_stage, model, prompt_tokens, completion_tokens,
                              metadata, email_sent_at, started_at, completed_at, created_at, updated_at)
    SELECT u, (%(now)s - d * interval '1 day')::date,
           (ARRAY['completed', 'completed', 'completed', 'completed', 'completed', 'completed', 'partial',
                  'completed', 'failed', 'skipped'])[1 + (u + d) %% 10],
           'Your brief for ' || to_char(%(now)s - d * interval '1 day', 'Dy DD Mon'),
           repeat('## Today' || chr(10) || 'Finish the draft, review two pull requests, call the vendor. ', 12),
           'Three tasks are due this week; the billing migration is blocked on the vendor.',
           '[{"task": "Finish the draft", "why": "due tomorrow"}, {"task": "Call the vendor", "why": "blocked"}]',
           'standard', 'gpt-4o-mini', 1800 + (u + d) %% 400, 600 + (u * d) %% 300, '{"projects": 3}',
           CASE WHEN u %% 5 < 2 THEN %(now)s - d * interval '1 day' + interval '8 hours 1 minute' END,
           %(now)s - d * interval '1 day' + interval '7 hours 59 minutes',
           %(now)s - d * interval '1 day' + interval '8 hours',
           %(now)s - d * interval '1 day' + interval '7 hours 59 minutes',
           %(now)s - d * interval '1 day' + interval '8 hours'
    FROM who
    """


SEED_PROJECT_BRIEFS = """
INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, content_markdown, created_at, updated_at)
SELECT b.id, p.id, CASE WHEN b.status = 'failed' THEN 'failed' ELSE 'completed' END,
       repeat('- ' || p.name || ': two tasks moved to done, one is due on Friday.' || chr(10), 6),
       b.created_at, b.updated_at
FROM daily_briefs b JOIN projects p ON p.user_id = b.user_id AND p.status = 'active'
"""


def _jobs_sql() -> str:
    """The million jobs, in id order over the last 7 days: job g finished ``7 days × ((F - g) / F)²`` ago."""
    return """
    WITH g AS (
        SELECT g, (g * 7919) %% %(users)s + 1 AS u,
               %(now)s - interval '7 days' * power(greatest(%(finished)s - g, 0)::float / %(finished)s, 2) AS t,
               CASE WHEN g > %(finished)s + %(processing)s THEN 'pending'
                    WHEN g > %(finished)s THEN 'processing'
                    WHEN g %% 200 < 5 THEN 'failed'
                    WHEN g %% 200 < 7 THEN 'cancelled' ELSE 'completed' END AS status,
               CASE WHEN g %% 20 < 12 THEN %(brief)s WHEN g %% 20 < 18 THEN %(email)s
                    WHEN g BETWEEN 1000 AND 30000 THEN %(retired)s
                    ELSE (%(other)s::text[])[1 + (g / 20) %% cardinality(%(other)s::text[])] END AS job_type
        FROM generate_series(1::bigint, %(jobs)s) g),
    j AS (
        SELECT g.*, CASE WHEN status = 'pending' AND g > %(jobs)s - %(later)s
                         THEN %(now)s + (g %% 1440) * interval '1 minute' ELSE t END AS run,
               to_char(t, 'YYYY-MM-DD') AS day
        FROM g)
    INSERT INTO queue_jobs (job_type, payload, status, priority, run_at, attempts, max_attempts, dedup_key, user_id,
                            notify_at, locked_by, lease_expires_at, processing_token, heartbeat_at, started_at,
                            finished_at, last_error, result, created_at, updated_at)
    SELECT job_type,
           CASE WHEN job_type = %(email)s THEN jsonb_build_object('user_id', u, 'brief_date', day, 'brief_id', g)
                ELSE jsonb_build_object('user_id', u, 'brief_date', day, 'engagement_stage', 'standard',
                                        'email', g %% 3 = 0, 'source', 'scheduler') END,
           status, CASE WHEN job_type = %(brief)s THEN 50 ELSE 100 END, run,
           CASE WHEN status = 'failed' THEN 5 WHEN status = 'pending' THEN 0 ELSE 1 + (g %% 50 = 0)::int END, 5,
           CASE WHEN job_type = %(brief)s THEN 'brief:' || u || ':' || day
                WHEN job_type = %(email)s THEN 'email:' || u || ':' || day END,
           u, CASE WHEN job_type = %(brief)s THEN run END,
           CASE WHEN status = 'processing' THEN 'worker-' || (g %% 4 + 1) || '@app-' || (g %% 2 + 1) END,
           CASE WHEN status = 'processing' THEN %(now)s + interval '25 seconds' END,
           CASE WHEN status = 'processing' THEN gen_random_uuid() END,
           CASE WHEN status = 'processing' THEN %(now)s - interval '5 seconds' END,
           CASE WHEN status <> 'pending' THEN t - interval '1 second' * (1 + g %% 20) END,
           CASE WHEN status IN ('completed', 'failed', 'cancelled') THEN t END,
           CASE WHEN status = 'failed' THEN (%(errors)s::text[])[1 + g %% cardinality(%(errors)s::text[])] END,
           CASE WHEN status = 'completed' THEN jsonb_build_object('status', 'completed', 'projects', 1 + g %% 4) END,
           run - interval '1 second' * (1 + g %% 30), coalesce(t, run)
    FROM j
    """


def _jobs_params(now: datetime) -> dict[str, Any]:
    return {
        "now": now, "users": USERS, "jobs": JOBS, "finished": JOBS - PENDING - PROCESSING, "processing": PROCESSING,
        "later": PENDING_LATER, "retired": RETIRED_JOB,
        "brief": BRIEF_JOB, "email": EMAIL_JOB, "other": list(OTHER_JOBS), "errors": ERRORS,
    }


def seed(url: str) -> None:
    started = time.perf_counter()
    recreate(url)
    print(f"database {_dbname(url)} created and migrated in {time.perf_counter() - started:.1f}s", flush=True)
    now = datetime.now(UTC)
    base = {"now": now, "n": USERS, "every": BRIEF_USERS_EVERY}
    steps: list[tuple[str, str, dict[str, Any]]] = [
        ("users", SEED_USERS, {**base, "zones": ZONES, "first": FIRST, "last": LAST, "domains": DOMAINS}),
        ("brief_preferences", SEED_PREFERENCES, base),
        ("projects", SEED_PROJECTS, {**base, "names": PROJECTS}),
        ("tasks", SEED_TASKS, base),
        ("notes", SEED_NOTES, base),
        ("daily_briefs", _brief_users_sql(),
         {**base, "days": BRIEF_DAYS, "heavy": list(HEAVY_USERS), "heavy_days": HEAVY_DAYS}),
        ("project_daily_briefs", SEED_PROJECT_BRIEFS, base),
        ("queue_jobs", _jobs_sql(), _jobs_params(now)),
    ]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("SELECT setseed(0.42)")
        for table, sql, params in steps:
            step = time.perf_counter()
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            print(f"  {table:<22} {cur.rowcount:>9,} rows  {time.perf_counter() - step:6.1f}s", flush=True)
        for table in ("users", "projects", "daily_briefs", "project_daily_briefs"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        step = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        _vacuum_until_visible(conn)
        print(f"  VACUUM ANALYZE {time.perf_counter() - step:25.1f}s")
        print(_sizes(conn))
    print(f"seeded in {time.perf_counter() - started:.1f}s")


def _vacuum_until_visible(conn: psycopg.Connection[Any]) -> None:
    """VACUUM again while another session's old snapshot kept pages from being marked all-visible (index-only
    scans need the visibility map, as autovacuum would have set it on a table this old)."""
    for _ in range(10):
        row = conn.execute("SELECT relpages, relallvisible FROM pg_class WHERE relname = 'queue_jobs'").fetchone()
        assert row is not None
        if row[1] >= 0.99 * row[0]:
            return
        time.sleep(2)
        conn.execute("VACUUM queue_jobs, daily_briefs, users")
    print("  (queue_jobs is not all-visible: a long transaction elsewhere holds an old snapshot)")


def _sizes(conn: psycopg.Connection[Any]) -> str:
    rows = conn.execute(
        """SELECT relname, pg_size_pretty(pg_table_size(oid)), pg_size_pretty(pg_indexes_size(oid))
           FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace
           ORDER BY pg_total_relation_size(oid) DESC LIMIT 6"""
    ).fetchall()
    return "  sizes (table, indexes): " + "; ".join(f"{r[0]} {r[1]}, {r[2]}" for r in rows)



# --------------------------------------------------------------------------- explain


def _explain_cases(now: datetime) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, SQL, parameters) of the queries behind the routes, with the parameters the routes pass."""
    from briefs import health, metrics, service
    from briefs.web import queries as q
    from briefs.web import stats as st
    from scheduler import report

    hour = now.replace(minute=0, second=0, microsecond=0)
    cut = (now - st.CUT_MARGIN).replace(second=0, microsecond=0)
    jobs = {"before": None, "status": None, "type": None, "user": None, "limit": 51}
    users = {"after": None, "pattern": None, "id": None, "limit": 51}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("stats live: pending and running by type", st._UNFINISHED, {"clip": st.TYPE_CHARS}),
        ("stats live: finished since the cut", st._FINISHED_SINCE, {"clip": st.TYPE_CHARS, "cut": cut, "now": now}),
        ("stats base: finished up to the cut (the one pass)", st._FINISHED_BEFORE, {"clip": st.TYPE_CHARS, "cut": cut}),
        ("stats base: series per minute", st._SERIES, {"unit": "minute", "since": cut - timedelta(minutes=61),
                                                       "cut": cut}),
        ("stats base: series per hour", st._SERIES, {"unit": "hour", "since": hour - timedelta(hours=24), "cut": cut}),
        ("stats base: durations last hour", st._DURATIONS, {"since": now - timedelta(hours=1), "now": now}),
        ("stats: workers", st._WORKERS, {"since": now - st.WORKER_WINDOW}),
        ("stats: llm health", service._LLM_HEALTH_SQL, {"since": now - service.LLM_WINDOW, "now": now}),
        ("stats: recent ticks", report._RECENT.replace("%s", "%(limit)s"), {"limit": 50}),
        ("metrics: queue gauges", _gauges_sql(health), {"types": metrics.known_job_types(), "other": metrics.OTHER}),
        ("jobs: newest", q._JOB_LIST, jobs),
    ]
    for status in q.JOB_STATUSES:
        cases.append((f"jobs: status={status}", q._JOB_LIST, {**jobs, "status": status}))
    for job_type in (BRIEF_JOB, EMAIL_JOB, "send_weekly_digest", RETIRED_JOB, "no_such_type"):
        cases.append((f"jobs: type={job_type}", q._JOB_LIST, {**jobs, "type": job_type}))
    cases += [
        ("jobs: failed + send_weekly_digest", q._JOB_LIST, {**jobs, "status": "failed", "type": "send_weekly_digest"}),
        ("jobs: user=4242", q._JOB_LIST, {**jobs, "user": 4242}),
        ("jobs: user=4242 + completed", q._JOB_LIST, {**jobs, "user": 4242, "status": "completed"}),
        ("jobs: cursor id<1000", q._JOB_LIST, {**jobs, "before": 1000}),
        ("jobs: failed, cursor id<20000", q._JOB_LIST, {**jobs, "status": "failed", "before": 20000}),
        ("job: by id", q._JOB, {"id": 123456}),
        ("users: first page", q._USER_LIST, users),
        ("users: search 'emma'", q._USER_LIST, {**users, "pattern": q.like_prefix("emma")}),
        ("users: search 'zoe.sant'", q._USER_LIST, {**users, "pattern": q.like_prefix("zoe.sant")}),
        ("users: search 'nobody' (no match)", q._USER_LIST, {**users, "pattern": q.like_prefix("nobody")}),
        ("users: search '4242' (an id)", q._USER_LIST, {**users, "pattern": q.like_prefix("4242"), "id": 4242}),
        ("users: cursor id>99000", q._USER_LIST, {**users, "after": 99000}),
        ("user: by id", q._USER, {"id": 4240}),
        ("briefs: list user 10 (400)", q._BRIEF_LIST, {"user": 10, "before": None, "limit": 51}),
        ("briefs: list user 10, cursor", q._BRIEF_LIST, {"user": 10, "before": str(now.date() - timedelta(days=300)),
                                                         "limit": 51}),
        ("brief: user 10, one date", q._BRIEF, {"user": 10, "date": now.date() - timedelta(days=3)}),
        ("brief: sections", q._SECTIONS, {"brief": 1000, "limit": q.SECTIONS_MAX}),
    ]
    return cases


def _gauges_sql(health: Any) -> str:
    import inspect

    source = inspect.getsource(health.HealthServer._refresh_queue_gauges)
    body = source.split('"""SELECT', 2)[-1].split('""",', 1)[0]
    return ("SELECT" + body).replace("ANY(%s)", "ANY(%(types)s)").replace("ELSE %s", "ELSE %(other)s")


def explain(url: str, only: str | None, verbose: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        cur = psycopg.ClientCursor(conn)
        for label, sql, params in _explain_cases(now):
            if only and only not in label:
                continue
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
            plan = [r[0] for r in cur.fetchall()]
            took = next((line for line in plan if line.startswith("Execution Time")), "?")
            scans = [line.strip() for line in plan
                     if ("Scan" in line and "->" in line) or line.startswith(("Seq", "Index", "Bitmap"))]
            seq = " SEQ SCAN" if any("Seq Scan" in s for s in scans) else ""
            print(f"{label:<40} {took.replace('Execution Time: ', ''):>12}{seq}")
            if verbose:
                print("\n".join("      " + line for line in plan))
            else:
                for s in scans:
                    print(f"      {s.split('  (cost')[0][:130]}")


# --------------------------------------------------------------------------- the server under test


@dataclass
class Server:
    proc: subprocess.Popen[str]
    base: str

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(url: str, port: int, repo: Path = REPO) -> Server:
    """``briefs web`` on 127.0.0.1 over ``url`` (port 0: a free one, read from the line it prints), from the
    source tree ``repo`` (another checkout, to compare a change) with this virtualenv."""
    env = {**os.environ, "DATABASE_URL": url, "BRIEFS_ADMIN_TOKEN": TOKEN, "BRIEFS_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/python"), "-m", "briefs", "web", "--host", "127.0.0.1", "--port", str(port)],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    base = None
    while base is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"briefs web exited with {proc.returncode}")
        found = re.search(r"console: (http://[^/\s]+)", line)
        base = found.group(1) if found else None
    if base is None:
        proc.kill()
        raise SystemExit("briefs web did not print its address within 30 s")
    server = Server(proc, base)
    _drain_output(proc)
    _wait_ready(server)
    return server


def _drain_output(proc: subprocess.Popen[str]) -> None:
    import threading

    def run() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Traceback" in line or "ERROR" in line:
                print("  server: " + line.rstrip()[:300], file=sys.stderr)

    threading.Thread(target=run, daemon=True).start()


def _wait_ready(server: Server) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise SystemExit("briefs web was not ready within 30 s")


# --------------------------------------------------------------------------- what to request


@dataclass
class Sample:
    """Real keys from the database for the requests' parameters."""

    job_ids: dict[str, int]
    user_ids: list[int]
    brief_users: list[int]
    brief_dates: dict[int, list[str]]
    deep_cursor: str
    deep_failed_cursor: str


def sample(url: str) -> Sample:
    from briefs.web.queries import encode_cursor

    with psycopg.connect(url) as conn:
        job_ids = {
            status: conn.execute(
                "SELECT id FROM queue_jobs WHERE status = %s ORDER BY id DESC LIMIT 1 OFFSET 17", (status,)
            ).fetchone()[0]  # type: ignore[index]
            for status in ("pending", "processing", "completed", "failed", "cancelled")
        }
        brief_users = [r[0] for r in conn.execute(
            "SELECT DISTINCT user_id FROM daily_briefs WHERE user_id %% 997 = 0 OR user_id = ANY(%s)",
            (list(HEAVY_USERS),)).fetchall()]
        dates: dict[int, list[str]] = {}
        for user, day in conn.execute(
            "SELECT user_id, brief_date::text FROM daily_briefs WHERE user_id = ANY(%s)", (brief_users,)
        ).fetchall():
            dates.setdefault(user, []).append(day)
    rng = random.Random(7)
    return Sample(job_ids, [rng.randint(1, USERS) for _ in range(500)], brief_users, dates,
                  encode_cursor(JOBS // 20), encode_cursor(JOBS // 4))


def latency_routes(s: Sample) -> list[tuple[str, str, bool]]:
    """(label, path, api?) for every API route and page, with realistic parameters."""
    day = s.brief_dates[HEAVY_USERS[0]][len(s.brief_dates[HEAVY_USERS[0]]) // 2]
    user, heavy = 4242, HEAVY_USERS[0]
    api: list[tuple[str, str]] = [
        ("stats (cached)", "/api/v1/stats"),
        ("jobs", "/api/v1/jobs"),
        *[(f"jobs status={st}", f"/api/v1/jobs?status={st}") for st in s.job_ids],
        *[(f"jobs type={t}", f"/api/v1/jobs?type={t}") for t in (BRIEF_JOB, EMAIL_JOB, "send_weekly_digest")],
        (f"jobs type={RETIRED_JOB} (old rows only)", f"/api/v1/jobs?type={RETIRED_JOB}"),
        ("jobs type=no_such_type", "/api/v1/jobs?type=no_such_type"),
        ("jobs status=failed type=sync_calendar", "/api/v1/jobs?status=failed&type=sync_calendar"),
        ("jobs user_id", f"/api/v1/jobs?user_id={user}"),
        ("jobs user_id status=completed", f"/api/v1/jobs?user_id={user}&status=completed"),
        ("jobs deep cursor", f"/api/v1/jobs?cursor={s.deep_cursor}"),
        ("jobs failed deep cursor", f"/api/v1/jobs?status=failed&cursor={s.deep_failed_cursor}"),
        ("jobs limit=200", "/api/v1/jobs?limit=200"),
        *[(f"job {st}", f"/api/v1/jobs/{jid}") for st, jid in s.job_ids.items()],
        ("users", "/api/v1/users"),
        ("users query=emma (prefix)", "/api/v1/users?query=emma"),
        ("users query=zoe.sant (rare)", "/api/v1/users?query=zoe.sant"),
        ("users query=nobody (none)", "/api/v1/users?query=nobody"),
        ("users query=4242 (id)", "/api/v1/users?query=4242"),
        ("user", f"/api/v1/users/{user}"),
        ("user schedule days=7", f"/api/v1/users/{user}/schedule?days=7"),
        ("user briefs (400)", f"/api/v1/users/{heavy}/briefs"),
        ("user brief", f"/api/v1/users/{heavy}/briefs/{day}"),
        ("user brief email.html", f"/api/v1/users/{heavy}/briefs/{day}/email.html"),
    ]
    pages: list[tuple[str, str]] = [
        ("page /", "/"),
        ("page /jobs", "/jobs"),
        ("page /jobs status=failed", "/jobs?status=failed"),
        ("page /jobs type=send_brief_email", f"/jobs?type={EMAIL_JOB}"),
        ("page /jobs user_id", f"/jobs?user_id={user}"),
        ("page /jobs deep cursor", f"/jobs?cursor={s.deep_cursor}"),
        ("page /jobs/{id}", f"/jobs/{s.job_ids['failed']}"),
        ("page /users", "/users"),
        ("page /users query=emma", "/users?query=emma"),
        ("page /users/{id}", f"/users/{user}"),
        ("page /users/{id} (400 briefs)", f"/users/{heavy}"),
        ("page /users/{id}/briefs/{date}", f"/users/{heavy}/briefs/{day}"),
        ("/healthz", "/healthz"),
        ("/readyz", "/readyz"),
        ("/metrics", "/metrics"),
    ]
    return [(label, path, True) for label, path in api] + [(label, path, False) for label, path in pages]


def _server_ms(response: Any) -> float | None:
    found = re.search(r"app;dur=([0-9.]+)", response.headers.get("server-timing", ""))
    return float(found.group(1)) if found else None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- latency


def latency(url: str, port: int, repeat: int, only: str | None, repo: Path) -> None:
    import httpx

    s = sample(url)
    server = start_server(url, port, repo)
    try:
        with httpx.Client(base_url=server.base, timeout=30) as client:
            login = client.get("/login", params={"token": TOKEN}, follow_redirects=False)
            if login.status_code != 303:
                raise SystemExit(f"login answered {login.status_code}")
            routes = [r for r in latency_routes(s) if not only or only in r[0]]
            print(f"server {server.base}; {repeat} requests per route after 2 warm-ups; times in ms")
            print(f"{'route':<42} {'status':>6} {'median':>7} {'p95':>7} {'max':>7}   {'client med':>10} "
                  f"{'p95':>7} {'bytes':>8}")
            rows = [_measure(client, label, path, api, repeat) for label, path, api in routes]
            rows.append(_measure_cold_stats(client, min(repeat, 10)))
            slow = [r for r in rows if r["max"] is not None and r["max"] > SLOW_MS]
            print(f"\n{len(rows)} routes; over {SLOW_MS:.0f} ms server time (max): "
                  + (", ".join(r["label"] for r in slow) or "none"))
    finally:
        server.stop()


def _measure(client: Any, label: str, path: str, api: bool, repeat: int, pause: float = 0.0) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {TOKEN}"} if api else {}
    server: list[float] = []
    wall: list[float] = []
    statuses: set[int] = set()
    size = 0
    for i in range(repeat + 2):
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        response = client.get(path, headers=headers)
        took = (time.perf_counter() - started) * 1000
        statuses.add(response.status_code)
        size = len(response.content)
        if i >= 2 or pause:
            wall.append(took)
            ms = _server_ms(response)
            if ms is not None:
                server.append(ms)
    row = {"label": label, "status": "/".join(map(str, sorted(statuses))), "bytes": size,
           "median": statistics.median(server) if server else None, "p95": _pct(server, 0.95) if server else None,
           "max": max(server) if server else None, "client": statistics.median(wall), "client95": _pct(wall, 0.95)}
    mark = "  SLOW" if row["max"] is not None and row["max"] > SLOW_MS else ""
    fmt = (lambda v: f"{v:7.1f}" if v is not None else "      -")  # noqa: E731
    print(f"{label[:42]:<42} {row['status']:>6} {fmt(row['median'])} {fmt(row['p95'])} {fmt(row['max'])}   "
          f"{row['client']:10.1f} {row['client95']:7.1f} {size:>8,}{mark}", flush=True)
    return row


def _measure_cold_stats(client: Any, repeat: int) -> dict[str, Any]:
    """/api/v1/stats when its one-second snapshot has expired (the request computes it)."""
    return _measure(client, "stats (snapshot expired)", "/api/v1/stats", True, repeat, pause=1.2)


# --------------------------------------------------------------------------- load (open loop)


def load_mix(s: Sample, rng: random.Random) -> Callable[[], tuple[str, str]]:
    """A function giving the next (kind, path) of the mixed API reads, by weight."""
    statuses = list(s.job_ids)
    types = [BRIEF_JOB, EMAIL_JOB, *OTHER_JOBS, RETIRED_JOB]
    prefixes = [f.lower()[:k] for f in FIRST[:20] for k in (2, 4)] + ["emma.sm", "li", "4242", "nobody"]
    users = [*s.brief_users, *s.user_ids]

    def brief() -> str:
        user = rng.choice(s.brief_users)
        return f"/api/v1/users/{user}/briefs/{rng.choice(s.brief_dates[user])}"

    kinds: list[tuple[str, int, Callable[[], str]]] = [
        ("stats", 10, lambda: "/api/v1/stats"),
        ("jobs", 8, lambda: "/api/v1/jobs"),
        ("jobs?status", 8, lambda: f"/api/v1/jobs?status={rng.choice(statuses)}"),
        ("jobs?type", 6, lambda: f"/api/v1/jobs?type={rng.choice(types)}"),
        ("jobs?user_id", 6, lambda: f"/api/v1/jobs?user_id={rng.choice(users)}"),
        ("jobs?cursor", 4, lambda: f"/api/v1/jobs?cursor={_cursor(rng.randint(1000, JOBS))}"),
        ("job", 14, lambda: f"/api/v1/jobs/{rng.randint(1, JOBS)}"),
        ("users", 4, lambda: "/api/v1/users"),
        ("users?query", 6, lambda: f"/api/v1/users?query={rng.choice(prefixes)}"),
        ("user", 10, lambda: f"/api/v1/users/{rng.choice(users)}"),
        ("schedule", 8, lambda: f"/api/v1/users/{rng.choice(users)}/schedule?days=7"),
        ("briefs", 8, lambda: f"/api/v1/users/{rng.choice(s.brief_users)}/briefs"),
        ("brief", 8, brief),
    ]
    names = [k[0] for k in kinds]
    weights = [k[1] for k in kinds]
    makers = {k[0]: k[2] for k in kinds}

    def next_request() -> tuple[str, str]:
        kind = rng.choices(names, weights)[0]
        return kind, makers[kind]()

    return next_request


def _cursor(key: int) -> str:
    from briefs.web.queries import encode_cursor

    return encode_cursor(key)


@dataclass
class Outcome:
    kind: str
    status: int  # 0: transport error
    latency_ms: float  # from the scheduled instant to the whole response read
    server_ms: float | None
    late_ms: float  # how late the request left (the client's own lag)


class RawClient:
    """A minimal HTTP/1.1 keep-alive client (GET only) over ``connections`` asyncio streams: a tenth of
    httpx's CPU per request, so the load generator takes less of the 2 cores it shares with the server."""

    def __init__(self, base: str, connections: int) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.size = connections
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
        for _ in range(connections):
            self.idle.put_nowait(None)  # a slot without a connection yet: opened on first use
        self.prefix = f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()

    async def get(self, path: str) -> tuple[int, float | None]:
        """(status, Server-Timing ms) of GET ``path``; a broken connection is dropped and the error raised."""
        conn = await self.idle.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.prefix)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            await self._body(reader, head)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if conn is not None:
                conn[1].close()
            self.idle.put_nowait(None)
            raise
        self.idle.put_nowait(conn)
        timing = re.search(r"(?im)^server-timing:.*app;dur=([0-9.]+)", head)
        return int(head.split(" ", 2)[1]), float(timing.group(1)) if timing else None

    @staticmethod
    async def _body(reader: asyncio.StreamReader, head: str) -> None:
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if length:
            await reader.readexactly(int(length.group(1)))
            return
        if not re.search(r"(?im)^transfer-encoding:\s*chunked", head):
            raise ValueError("a response with neither Content-Length nor chunked encoding")
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return

    async def close(self) -> None:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn is not None:
                conn[1].close()


async def _open_loop(base: str, rps: float, seconds: float, connections: int, mix: Any) -> list[Outcome]:
    client = RawClient(base, connections)
    outcomes: list[Outcome] = []

    async def one(kind: str, path: str, due: float) -> None:
        late = (time.perf_counter() - due) * 1000
        try:
            status, server = await client.get(path)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, server = 0, None
        outcomes.append(Outcome(kind, status, (time.perf_counter() - due) * 1000, server, late))

    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(int(rps * seconds)):
        due = start + i / rps
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(*mix(), due)))
    await asyncio.gather(*tasks)
    await client.close()
    return outcomes


def load(url: str, port: int, rps: float, seconds: float, connections: int, repo: Path) -> None:
    s = sample(url)
    server = start_server(url, port, repo)
    try:
        warm = load_mix(s, random.Random(1))
        asyncio.run(_open_loop(server.base, 50, 2, connections, warm))  # warm-up: pool, caches
        cpu0, self0, wall0 = server.cpu_seconds(), _own_cpu(), time.perf_counter()
        busy0 = _machine_busy()
        outcomes = asyncio.run(_open_loop(server.base, rps, seconds, connections, load_mix(s, random.Random(2))))
        wall = time.perf_counter() - wall0
        cpu = {"server": (server.cpu_seconds() - cpu0) / wall, "client": (_own_cpu() - self0) / wall,
               "machine": _machine_busy(busy0)}
    finally:
        server.stop()
    _report_load(outcomes, rps, seconds, wall, connections, cpu)


def _own_cpu() -> float:

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy(since: tuple[float, float] | None = None) -> Any:
    """(busy, total) jiffies of every CPU from /proc/stat; with ``since``: the busy share in cores."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, total = fields[3] + fields[4], sum(fields[:8])
    if since is None:
        return (total - idle, total)
    return (total - idle - since[0]) / (total - since[1]) * (os.cpu_count() or 1)


def _report_load(outcomes: list[Outcome], rps: float, seconds: float, wall: float, connections: int,
                 cpu: dict[str, float]) -> None:
    ok = [o for o in outcomes if 200 <= o.status < 300]
    errors = len(outcomes) - len(ok)
    lat = [o.latency_ms for o in outcomes]
    srv = [o.server_ms for o in outcomes if o.server_ms is not None]
    late = [o.late_ms for o in outcomes]
    print(f"open loop: target {rps:.0f} req/s for {seconds:.0f} s, {connections} connections max; "
          f"sent {len(outcomes):,} in {wall:.1f} s = {len(outcomes) / wall:.1f} req/s; "
          f"2xx {len(ok):,}, errors {errors} {_status_counts(outcomes)}")
    print(f"latency from the scheduled instant (ms): p50 {_pct(lat, .5):.1f}  p95 {_pct(lat, .95):.1f}  "
          f"p99 {_pct(lat, .99):.1f}  max {max(lat):.1f}")
    print(f"server time (ms):                       p50 {_pct(srv, .5):.1f}  p95 {_pct(srv, .95):.1f}  "
          f"p99 {_pct(srv, .99):.1f}  max {max(srv):.1f}")
    print(f"sending lag of the client (ms): p50 {_pct(late, .5):.1f}  p99 {_pct(late, .99):.1f}  max {max(late):.1f}")
    print(f"CPU (cores, of {os.cpu_count()}): server process {cpu['server']:.2f}, load generator {cpu['client']:.2f}, "
          f"whole machine {cpu['machine']:.2f} (PostgreSQL and everything else included)")
    print(f"{'kind':<14} {'n':>6} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}  server p50/p99")
    for kind in sorted({o.kind for o in outcomes}):
        mine = [o for o in outcomes if o.kind == kind]
        k_lat = [o.latency_ms for o in mine]
        k_srv = [o.server_ms for o in mine if o.server_ms is not None] or [0.0]
        print(f"{kind:<14} {len(mine):>6} {_pct(k_lat, .5):7.1f} {_pct(k_lat, .95):7.1f} {_pct(k_lat, .99):7.1f} "
              f"{max(k_lat):7.1f}  {_pct(k_srv, .5):.1f}/{_pct(k_srv, .99):.1f}")


def _status_counts(outcomes: list[Outcome]) -> str:
    counts: dict[int, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    return json.dumps({str(k): v for k, v in sorted(counts.items())})

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["seed", "latency", "load", "explain"])
    parser.add_argument("--url", default=DEFAULT_URL, help="the benchmark database (its name must contain 'bench')")
    parser.add_argument("--only", help="explain, latency: only the queries/routes whose label contains this")
    parser.add_argument("--port", type=int, default=0, help="latency, load: the server's port (0: a free one)")
    parser.add_argument("--repeat", type=int, default=20, help="latency: requests per route (after 2 warm-ups)")
    parser.add_argument("--rps", type=float, default=200.0, help="load: requests per second (fixed arrival rate)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load: how long")
    parser.add_argument("--connections", type=int, default=64, help="load: the client's connection limit")
    parser.add_argument("--server-repo", type=Path, default=REPO,
                        help="latency, load: run the server from this source tree (to compare a change)")
    parser.add_argument("-v", "--verbose", action="store_true", help="explain: whole plans")
    args = parser.parse_args()
    if args.command == "seed":
        seed(args.url)
    elif args.command == "latency":
        latency(args.url, args.port, args.repeat, args.only, args.server_repo)
    elif args.command == "load":
        load(args.url, args.port, args.rps, args.seconds, args.connections, args.server_repo)
    elif args.command == "explain":
        explain(args.url, args.only, args.verbose)


if __name__ == "__main__":
    main()
