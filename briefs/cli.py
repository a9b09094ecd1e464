"""The ``briefs`` command: the composition root.

Only this module imports ``worker`` and ``scheduler`` (lazily, inside commands).
Every command prints a one-line error and exits non-zero on a bad argument or an
unreachable database; no tracebacks for expected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from briefs.db import Database, DatabaseUnavailable
from briefs.errors import PermanentError
from briefs.logs import setup_logging
from briefs.migrate import MigrationError
from briefs.settings import Settings

log = logging.getLogger("briefs")


class UsageError(Exception):
    """A bad argument: exit code 2."""


# --------------------------------------------------------------------------- helpers


def _parse_instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"not an ISO 8601 instant: {text!r} (example: 2026-03-08T12:00:00Z)") from exc
    if value.tzinfo is None:
        raise UsageError(f"the instant {text!r} has no UTC offset (add Z or +00:00)")
    return value.astimezone(UTC)


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"not a date: {text!r} (expected YYYY-MM-DD)") from exc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _age(delta: timedelta | None) -> str:
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


async def _with_db(settings: Settings, fn: Callable[[Database], Awaitable[int]]) -> int:
    db = await Database.connect(settings)
    try:
        return await fn(db)
    finally:
        await db.dispose()


# --------------------------------------------------------------------------- commands


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from briefs.migrate import migrate_url
    from briefs.progress import Progress

    async def go(db: Database) -> int:
        with Progress("migrating", stream=sys.stderr) as bar:
            applied = await migrate_url(db.url, on_step=lambda m, i, n: bar.update(i, n, m.name))
        print(f"applied {len(applied)} migration(s)" if applied else "database is up to date")
        return 0

    return await _with_db(settings, go)


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.main import serve

    stats = await serve(settings, concurrency=args.concurrency, burst=args.burst)
    if args.burst:
        print(f"drained: {stats.completed} completed, {stats.failed} failed, {stats.retried} retried")
    return 0


async def cmd_scheduler(settings: Settings, args: argparse.Namespace) -> int:
    from scheduler.daemon import serve

    await serve(settings)
    return 0


async def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    from scheduler.tick import run_tick

    if not args.once:
        raise UsageError("`briefs schedule` runs one tick: pass --once (the daemon is `briefs scheduler`)")
    now = _parse_instant(args.now) if args.now else datetime.now(UTC)

    async def go(db: Database) -> int:
        report = await run_tick(db, settings, now, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            print(report.summary())
        return 0

    return await _with_db(settings, go)


def queue_hook(settings: Settings) -> Any:
    """The generator's enqueue hook type, backed by the queue's bulk insert."""
    from worker.brief_handlers import enqueue_hook

    return enqueue_hook(settings.max_attempts)


async def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    from briefs.progress import Progress
    from briefs.service import enqueue_all, enqueue_brief

    if (args.user_id is None) == (not args.all):
        raise UsageError("give a USER_ID or --all (not both)")
    if args.all and args.date:
        raise UsageError("--date applies to one user; --all queues each user's local today")
    brief_date = _parse_date(args.date) if args.date else None
    hook = queue_hook(settings)

    async def go(db: Database) -> int:
        if args.all:
            with Progress("queueing briefs", stream=sys.stderr) as bar:
                queued, skipped = await enqueue_all(db, force=args.force, enqueue=hook, on_progress=bar.update)
            print(f"queued {queued} brief job(s); {skipped} already queued or finished")
            return 0
        print(await enqueue_brief(db, settings, args.user_id, brief_date, force=args.force, enqueue=hook))
        return 0

    return await _with_db(settings, go)


async def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from briefs.service import load_brief_markdown

    brief_date = _parse_date(args.date) if args.date else None

    async def go(db: Database) -> int:
        text = await load_brief_markdown(db, args.user_id, brief_date)
        if text is None:
            which = f"for {brief_date}" if brief_date else "yet"
            print(f"briefs: no brief for user {args.user_id} {which}", file=sys.stderr)
            return 1
        print(text)
        return 0

    return await _with_db(settings, go)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from worker import queue

    async def go(db: Database) -> int:
        async with db.raw() as conn:
            rows = await queue.stats(conn)
            failures = await queue.recent_failures(conn, 3600)
        if not rows:
            print("queue is empty")
        else:
            print(
                _table(
                    [
                        [r["job_type"], r["status"], str(r["jobs"]), _age(r["oldest_pending_age"])]
                        for r in rows
                    ],
                    ["job type", "status", "jobs", "oldest pending"],
                )
            )
        print(f"\nfailures in the last hour: {failures}")
        return 0

    return await _with_db(settings, go)


async def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from worker import queue

    async def go(db: Database) -> int:
        async with db.raw() as conn:
            rows = await queue.list_jobs(conn, status=args.status, job_type=args.type, limit=args.limit)
        if not rows:
            print("no jobs")
            return 0
        print(
            _table(
                [
                    [
                        str(r["id"]),
                        r["job_type"],
                        r["status"],
                        f"{r['attempts']}/{r['max_attempts']}",
                        r["run_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                        str(r["user_id"] or "-"),
                        (r["last_error"] or "")[:60],
                    ]
                    for r in rows
                ],
                ["id", "type", "status", "tries", "run at", "user", "last error"],
            )
        )
        return 0

    return await _with_db(settings, go)


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from worker import queue

    if (args.job_id is None) == (not args.failed):
        raise UsageError("give a JOB_ID or --failed (not both)")

    async def go(db: Database) -> int:
        async with db.raw() as conn:
            ids = await queue.retry(conn, args.job_id)
        print(f"requeued {len(ids)} job(s)" + (f": {', '.join(map(str, ids[:20]))}" if ids else ""))
        return 0

    return await _with_db(settings, go)


async def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    from worker import queue

    async def go(db: Database) -> int:
        async with db.raw() as conn:
            await queue.cancel(conn, args.job_id)
        print(f"cancelled job {args.job_id}")
        return 0

    return await _with_db(settings, go)


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Everything in one process: migrate, then the scheduler and a worker side by side."""
    from briefs.migrate import migrate_url
    from briefs.process import exit_now, install_stop_signals
    from briefs.progress import Progress
    from scheduler.daemon import SchedulerDaemon
    from scheduler.daemon import health_max_age as scheduler_health_max_age
    from worker.handlers import build_handlers
    from worker.main import close_services
    from worker.main import health_max_age as worker_health_max_age
    from worker.runner import Worker

    db = await Database.connect(settings)
    services: dict[str, object] = {}
    health = None
    try:
        with Progress("migrating", stream=sys.stderr) as bar:
            await migrate_url(db.url, on_step=lambda m, i, n: bar.update(i, n, m.name))
        demo_user: int | None = None
        if args.demo:
            demo_user = await _seed_demo(db)
        worker = Worker(db, settings, build_handlers(settings), services=services)
        daemon = SchedulerDaemon(db, settings)
        stop = asyncio.Event()

        def soft() -> None:
            stop.set()
            worker.stop()

        def hard() -> None:
            worker.abort()
            asyncio.get_running_loop().call_later(2.0, exit_now, 1)

        install_stop_signals(soft, hard)
        if settings.health_port:
            from briefs.health import HealthServer

            health = HealthServer(db, settings.health_port)
            health.watch("worker", lambda: worker.stats.last_cycle, worker_health_max_age(settings))
            health.watch("scheduler", lambda: daemon.last_tick_completed, scheduler_health_max_age(settings))
            await health.start()
        await daemon.start()
        worker_task = asyncio.create_task(worker.run(), name="worker")
        side = [asyncio.create_task(stop.wait(), name="stop")]
        if demo_user is not None:
            side.append(asyncio.create_task(_show_when_ready(db, demo_user), name="demo"))
        await asyncio.wait([worker_task, side[0]], return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        await daemon.stop()
        await worker_task
        for task in side:
            task.cancel()
        return 0
    finally:
        if health is not None:
            await health.stop()
        await close_services(services)  # type: ignore[arg-type]
        await db.dispose()


async def _seed_demo(db: Database) -> int:
    from briefs.demo import seed
    from briefs.progress import Progress

    with Progress("seeding demo users", stream=sys.stderr) as bar:
        async with db.raw() as conn:
            users = await seed(conn, datetime.now(UTC), on_user=lambda i, n, email: bar.update(i, n, email))
    first_id, email, when = users[0]
    print(
        f"demo: {len(users)} users ready; {email} (user {first_id}) wants a brief at "
        f"{when:%H:%M:%S} UTC, a minute from now.\n"
        f"      Briefs are generated ahead of the user's time, so it appears here in a few seconds.\n"
        f"      Watch it: `briefs status`, `briefs jobs`; read it: `briefs show {first_id}`.",
        flush=True,
    )
    return first_id


async def _show_when_ready(db: Database, user_id: int) -> None:
    """Print the demo user's brief as soon as it is written."""
    from briefs.service import load_brief_markdown

    started = datetime.now(UTC)
    while True:
        await asyncio.sleep(1.0)
        try:
            async with db.raw() as conn:
                cur = await conn.execute(
                    """SELECT brief_date FROM daily_briefs
                       WHERE user_id = %s AND status IN ('completed', 'partial') AND completed_at >= %s
                       ORDER BY completed_at DESC LIMIT 1""",
                    (user_id, started),
                )
                row = await cur.fetchone()
        except Exception:
            continue
        if row:
            text = await load_brief_markdown(db, user_id, row[0])
            print(f"\n===== brief for user {user_id}, {row[0]} =====\n{text}\n=====", flush=True)
            print(f"demo: that was `briefs show {user_id}`. `briefs status` shows the queue. Ctrl-C stops.", flush=True)
            return


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="briefs", description="Daily AI briefs, delivered at each user's local time.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="migrate, then run the scheduler and a worker in one process")
    p.add_argument("--demo", action="store_true", help="seed demo users; one brief is due a minute from now")
    p.set_defaults(fn=cmd_run)

    sub.add_parser("migrate", help="apply pending SQL migrations").set_defaults(fn=cmd_migrate)

    p = sub.add_parser("worker", help="run a queue worker")
    p.add_argument("--concurrency", type=_positive, help="job slots (default BRIEFS_WORKER_CONCURRENCY)")
    p.add_argument("--burst", action="store_true", help="drain what is runnable now, then exit")
    p.set_defaults(fn=cmd_worker)

    sub.add_parser("scheduler", help="run the scheduler daemon").set_defaults(fn=cmd_scheduler)

    p = sub.add_parser("schedule", help="run one scheduler tick")
    p.add_argument("--once", action="store_true", help="run exactly one tick")
    p.add_argument("--now", help="the tick's instant, ISO 8601 with offset (default: now)")
    p.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    p.add_argument("--json", action="store_true", help="print the tick report as JSON")
    p.set_defaults(fn=cmd_schedule)

    p = sub.add_parser("enqueue", help="queue one user's brief now (or every user's, with --all)")
    p.add_argument("user_id", type=_positive, nargs="?", metavar="USER_ID")
    p.add_argument("--all", action="store_true", help="every user with an active preference")
    p.add_argument("--date", help="local brief date YYYY-MM-DD (default: the user's today)")
    p.add_argument("--force", action="store_true", help="regenerate even if a brief exists")
    p.set_defaults(fn=cmd_enqueue)

    sub.add_parser("status", help="queue counts, oldest pending, recent failures").set_defaults(fn=cmd_status)

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--status", choices=["pending", "processing", "completed", "failed", "cancelled"])
    p.add_argument("--type", help="job type")
    p.add_argument("--limit", type=_positive, default=50)
    p.set_defaults(fn=cmd_jobs)

    p = sub.add_parser("retry", help="requeue a failed or cancelled job, or every failed job")
    p.add_argument("job_id", type=_positive, nargs="?", metavar="JOB_ID")
    p.add_argument("--failed", action="store_true", help="requeue every failed job")
    p.set_defaults(fn=cmd_retry)

    p = sub.add_parser("cancel", help="cancel a pending or running job")
    p.add_argument("job_id", type=_positive, metavar="JOB_ID")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("show", help="print a user's brief (Markdown)")
    p.add_argument("user_id", type=_positive, metavar="USER_ID")
    p.add_argument("--date", help="local brief date YYYY-MM-DD (default: the latest)")
    p.set_defaults(fn=cmd_show)
    return parser


SERVICES = frozenset({"run", "worker", "scheduler"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"briefs: error: invalid configuration: {problems}", file=sys.stderr)
        return 2
    # Services log at INFO; one-shot commands keep stderr for warnings and their error line,
    # unless BRIEFS_LOG_LEVEL says otherwise.
    quiet = args.command not in SERVICES and "log_level" not in settings.model_fields_set
    setup_logging(
        settings.log_format,
        "WARNING" if quiet else settings.log_level,
        secrets=(
            settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
            settings.smtp_url.get_secret_value() if settings.smtp_url else None,
        ),
    )
    try:
        return asyncio.run(args.fn(settings, args))
    except UsageError as exc:
        print(f"briefs: error: {exc}", file=sys.stderr)
        return 2
    except (DatabaseUnavailable, MigrationError, PermanentError) as exc:
        print(f"briefs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from briefs.db import is_connection_error
        from briefs.logs import redact

        if is_connection_error(exc):
            print(f"briefs: error: database unavailable: {redact(_first_line(exc))}", file=sys.stderr)
            return 1
        qerr = _queue_error()
        if qerr is not None and isinstance(exc, qerr):
            print(f"briefs: error: {exc}", file=sys.stderr)
            return 1
        raise


def _queue_error() -> type[Exception] | None:
    try:
        from worker.queue import QueueError
    except ImportError:  # pragma: no cover
        return None
    return QueueError


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
