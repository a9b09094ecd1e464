"""Scheduler tick benchmark (run by hand; results go to bench/README-scheduler.md).

    /work/venv/bin/python bench/tick_bench.py                     # 100,000 users over 50 zones
    /work/venv/bin/python bench/tick_bench.py --users 10000 --users 1000000
    /work/venv/bin/python bench/tick_bench.py --users 100000 --profile   # cProfile of the first tick

The database is a fresh ``briefs_tickbench_<pid>`` on the server in ``--db`` (default
``BRIEFS_TEST_DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``),
dropped at the end (``--keep`` keeps it). Seeding is SQL only (``generate_series``):

* users spread round-robin over 50 timezones (whole, half- and quarter-hour offsets, DST and not);
* a tenth of them have their local brief time ten minutes after ``now`` (due in the window), the
  rest twelve hours away (neither due nor catch-up);
* last visits: 70 % yesterday, 20 % unknown, 10 % inactive 5–40 days (so the engagement query
  runs); every 20th user (all inactive ones among them) had a re-engagement brief two days ago, so some are
  skipped with an engagement reason;
* ``--history-days`` days of completed brief jobs per user (default 2), so the dedup index has the
  size it has in production.

Per size it runs: the first tick (enqueues a tenth), a steady-state tick five minutes later
(everything already queued), a dry run, then the first tick again under tracemalloc (after deleting
what it enqueued) for the Python memory peak. Durations are wall clock, from the tick's own report.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import resource
import sys
import time
import tracemalloc
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from briefs.db import Database
from briefs.migrate import migrate_url
from briefs.settings import Settings
from scheduler.report import TickReport
from scheduler.tick import run_tick

DEFAULT_SERVER = os.environ.get("BRIEFS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# fmt: off
ZONES = [
    "UTC", "Europe/London", "Europe/Paris", "Europe/Berlin", "Europe/Madrid", "Europe/Helsinki", "Europe/Moscow",
    "Europe/Istanbul", "Africa/Cairo", "Africa/Lagos", "Africa/Johannesburg", "Africa/Nairobi", "Asia/Dubai",
    "Asia/Tehran", "Asia/Kabul", "Asia/Karachi", "Asia/Kolkata", "Asia/Kathmandu", "Asia/Dhaka", "Asia/Yangon",
    "Asia/Bangkok", "Asia/Shanghai", "Asia/Singapore", "Asia/Tokyo", "Asia/Seoul", "Australia/Adelaide",
    "Australia/Darwin", "Australia/Sydney", "Australia/Brisbane", "Australia/Lord_Howe", "Pacific/Auckland",
    "Pacific/Chatham", "Pacific/Kiritimati", "Pacific/Tongatapu", "Pacific/Pago_Pago", "Pacific/Honolulu",
    "America/Anchorage", "America/Los_Angeles", "America/Denver", "America/Phoenix", "America/Chicago",
    "America/Mexico_City", "America/New_York", "America/Bogota", "America/Caracas", "America/Halifax",
    "America/St_Johns", "America/Sao_Paulo", "America/Argentina/Buenos_Aires", "Atlantic/Azores",
]
# fmt: on
assert len(ZONES) == 50


def _with_dbname(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def seed(url: str, users: int, now: datetime, history_days: int, due_every: int = 10) -> float:
    due = [(now + timedelta(minutes=10)).astimezone(ZoneInfo(z)).strftime("%H:%M") for z in ZONES]
    later = [(now + timedelta(hours=12)).astimezone(ZoneInfo(z)).strftime("%H:%M") for z in ZONES]
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(
            """INSERT INTO users (id, email, timezone, last_visit_at)
               SELECT g, 'u' || g || '@bench.example', (%(zones)s::text[])[1 + g %% 50],
                      CASE WHEN g %% 10 < 7 THEN %(now)s - interval '1 day'
                           WHEN g %% 10 < 9 THEN NULL
                           ELSE %(now)s - make_interval(days => 5 + (g / 10) %% 36) END
               FROM generate_series(1, %(n)s) g""",
            {"zones": ZONES, "now": now, "n": users},
        )
        conn.execute(
            """INSERT INTO brief_preferences (user_id, time_of_day, email_enabled)
               SELECT g, CASE WHEN (g / 50) %% %(every)s = 0 THEN (%(due)s::time[])[1 + g %% 50]
                              ELSE (%(later)s::time[])[1 + g %% 50] END,
                      g %% 3 = 0
               FROM generate_series(1, %(n)s) g""",
            {"due": due, "later": later, "n": users, "every": due_every},
        )
        conn.execute(
            """INSERT INTO daily_briefs (user_id, brief_date, status, engagement_stage)
               SELECT g, (%(now)s - interval '2 days')::date, 'completed', 're_engagement'
               FROM generate_series(9, %(n)s, 20) g""",
            {"now": now, "n": users},
        )
        if history_days:
            conn.execute(
                """INSERT INTO queue_jobs (job_type, payload, status, priority, run_at, dedup_key, user_id,
                                           notify_at, finished_at)
                   SELECT 'generate_daily_brief', '{}'::jsonb, 'completed', 50, %(now)s - make_interval(days => d),
                          'brief:' || g || ':' || (%(now)s - make_interval(days => d))::date, g,
                          %(now)s - make_interval(days => d), %(now)s - make_interval(days => d)
                   FROM generate_series(1, %(n)s) g, generate_series(1, %(days)s) d""",
                {"now": now, "n": users, "days": history_days},
            )
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _line(label: str, report: TickReport, extra: str = "") -> str:
    per_page = (report.queries - 4) / report.pages if report.pages else 0.0
    return (
        f"  {label:<22} {report.duration_s:7.3f}s  users {report.users_seen:>9,}  pages {report.pages:>5}  "
        f"queries {report.queries:>5} (~{per_page:.2f}/page)  enqueued {len(report.enqueued):>7,}  "
        f"dedup {report.deduplicated:>7,}  skipped {len(report.skipped):>6,}{extra}"
    )


async def bench_size(server: str, users: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"briefs_tickbench_{os.getpid()}_{users}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(server, name)
    await migrate_url(url)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    seconds = seed(url, users, now, args.history_days, args.due_every)
    print(f"{users:,} users: seeded in {seconds:.1f}s (db {name})")
    settings = Settings(_env_file=None, database_url=url, scheduler_page_size=args.page_size)  # type: ignore[call-arg]
    db = Database(settings, url, pool_size=2)
    result: dict[str, Any] = {"users": users}
    try:
        await db.check()
        gc.collect()
        rss0 = _maxrss_mb()
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
        first = await run_tick(db, settings, now)
        if args.profile:
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
            print(out.getvalue())
        rss1 = _maxrss_mb()
        print(_line("first tick", first, f"  peak RSS +{rss1 - rss0:.0f} MB"))
        steady = await run_tick(db, settings, now + timedelta(minutes=5))
        print(_line("steady tick (+5 min)", steady))
        dry = await run_tick(db, settings, now + timedelta(minutes=5), dry_run=True)
        print(_line("dry run (+5 min)", dry))

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM queue_jobs WHERE status = 'pending'")
            conn.execute("VACUUM ANALYZE queue_jobs")
        gc.collect()
        tracemalloc.start()
        traced = await run_tick(db, settings, now)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(_line("first tick, traced", traced, f"  tracemalloc peak {peak / 2**20:.1f} MB"))
        result.update(
            first_s=first.duration_s,
            steady_s=steady.duration_s,
            dry_s=dry.duration_s,
            queries=first.queries,
            pages=first.pages,
            enqueued=len(first.enqueued),
            peak_mb=peak / 2**20,
            rss_mb=rss1 - rss0,
        )
    finally:
        await db.dispose()
        if not args.keep:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return result


async def bench_indexed(server: str, users: int, args: argparse.Namespace) -> dict[str, Any]:
    """The indexed tick (next_due_at): one user in ``--due-every`` blocks of 50 is due at ``now``.

    The seeded preferences have no next_due_at yet (as after the migration): a tick three hours before
    ``now`` (nothing due then) plans everyone and stores it. Then, as in ``bench_size``, the first tick
    (enqueues the due users), a steady tick five minutes later, and a full scan of the same (a dry run).
    """
    name = f"briefs_tickbench_{os.getpid()}_{users}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_dbname(server, name)
    await migrate_url(url)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    seconds = seed(url, users, now, args.history_days, args.due_every)
    print(f"{users:,} users, one block in {args.due_every} due: seeded in {seconds:.1f}s (db {name})")
    settings = Settings(_env_file=None, database_url=url, scheduler_page_size=args.page_size)
    db = Database(settings, url, pool_size=2)
    try:
        await db.check()
        warm = await run_tick(db, settings, now - timedelta(hours=3))
        print(_line("unknown -> stored (-3 h)", warm))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE brief_preferences")
        first = await _profiled(args.profile, run_tick(db, settings, now))
        print(_line("first tick (indexed)", first))
        steady = await run_tick(db, settings, now + timedelta(minutes=5))
        print(_line("steady tick (+5 min)", steady))
        full = await run_tick(db, settings, now + timedelta(minutes=5), dry_run=True, detailed=False)
        print(_line("full scan (dry run)", full))
        return {"users": users, "warm_s": warm.duration_s, "first_s": first.duration_s,
                "steady_s": steady.duration_s, "full_s": full.duration_s, "enqueued": len(first.enqueued)}
    finally:
        await db.dispose()
        if not args.keep:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _profiled(profile: bool, tick: Awaitable[TickReport]) -> TickReport:
    """Await a tick, under cProfile when ``profile`` (the 30 costliest calls printed)."""
    if not profile:
        return await tick
    prof = cProfile.Profile()
    prof.enable()
    report = await tick
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
    print(out.getvalue())
    return report


def _ratio(results: list[dict[str, Any]]) -> None:
    """The largest size's tick times over the smallest's (the same number due: the point of --indexed)."""
    small, large = min(results, key=lambda r: r["users"]), max(results, key=lambda r: r["users"])
    for key in ("first_s", "steady_s"):
        print(f"  {key[:-2]} tick at {large['users']:,} / at {small['users']:,} users: "
              f"{large[key]:.3f}s / {small[key]:.3f}s = {large[key] / small[key]:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=DEFAULT_SERVER, help="a libpq URL on the server to use")
    parser.add_argument("--users", type=int, action="append", help="active preferences (repeatable)")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--history-days", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile the first tick")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--indexed", action="store_true", help="the indexed tick: store next_due_at first")
    parser.add_argument("--due-every", type=int, action="append",
                        help="one block of 50 users in N is due (default 10; with --indexed, one per --users)")
    args = parser.parse_args()
    sizes = args.users or [100_000]
    every = args.due_every or [10] * len(sizes)
    results = []
    for users, due_every in zip(sizes, every, strict=True):
        args.due_every = due_every
        results.append(await (bench_indexed if args.indexed else bench_size)(args.db, users, args))
    if args.indexed and len(results) > 1:
        _ratio(results)


if __name__ == "__main__":
    asyncio.run(main())
