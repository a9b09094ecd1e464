"""The ``briefs`` command (also ``python -m briefs``; ``python -m worker`` and ``python -m scheduler``
run its ``worker`` and ``scheduler`` commands).

Part of the composition root: it imports every layer, and nothing imports it. The services
(``run``, ``worker``, ``scheduler``) run in :class:`briefs.app.host.Host`. Every command fails
with one line, ``briefs: error: …``, saying what to do, and a non-zero exit: a bad argument
(2, before any database is started), bad configuration, an unreachable or unmigrated database
(1), and anything unexpected (1; ``BRIEFS_LOG_LEVEL=DEBUG`` logs the traceback). A closed
stdout (``briefs show 1 | head``) ends the command quietly. Stored text is printed without
terminal control sequences (:mod:`briefs.terminal`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any, NoReturn

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import ValidationError

from briefs.app.demo import DemoService, demo_public_url, demo_settings, seed_demo
from briefs.app.host import Host, Service
from briefs.app.services import SchedulerService, WebService, WorkerService
from briefs.circuit import circuit_key, process_name, read_status
from briefs.circuit import reset as reset_circuit
from briefs.db import Database, DatabaseUnavailable, is_connection_error, resolve_url
from briefs.errors import PermanentError
from briefs.jobs import settings_enqueue_hook
from briefs.logs import redact, setup_logging, truncate
from briefs.migrate import MigrationError, migrate_url, require_schema
from briefs.progress import Progress
from briefs.service import enqueue_all, llm_cost, llm_health, queue_brief, show_brief
from briefs.settings import MAX_COUNT, Settings
from briefs.terminal import one_line, printable
from scheduler.report import capacity_lines, last_capacity
from scheduler.tick import run_tick
from worker import queue

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
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first instant Python can hold in UTC
        raise UsageError(f"the instant {text!r} is out of range in UTC (years 1 to 9999)") from None


def _parse_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"not a date: {text!r} (expected YYYY-MM-DD)") from exc


MAX_ID = 2**63 - 1  # bigint


def _positive(text: str) -> int:
    # ASCII digits only: int() also reads '١' or '９' (other scripts), '1_000', ' +7 '; an id that
    # cancels or retries a job must be the number the operator sees.
    if not (text.isascii() and text.removeprefix("-").isdigit()):
        raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r} (digits 0-9 only)")
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    if value > MAX_ID:
        raise argparse.ArgumentTypeError(f"too large: {text[:40]} (at most {MAX_ID})")
    return value


def _slots(text: str) -> int:
    value = _positive(text)
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"at most {MAX_COUNT} slots (as BRIEFS_WORKER_CONCURRENCY): {value}")
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text[:40]!r} (0 to 65535)")
    return int(text)


def _host(text: str) -> str:
    if not text or len(text) > 253 or not text.isascii() or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(f"not a host: {text[:40]!r}")
    return text


def _limit(text: str) -> int:
    value = _positive(text)
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"at most 10000 rows: {value}")
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
    rows = [[one_line(str(c), 200) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


async def _with_db(settings: Settings, fn: Callable[[Database], Awaitable[int]], *, schema: bool = True) -> int:
    """Run ``fn`` on the database; with ``schema``, refuse an unmigrated one ("run `briefs migrate`")."""
    db = await Database.connect(settings)
    try:
        if schema:
            async with db.raw() as conn:
                await require_schema(conn)
        return await fn(db)
    finally:
        await db.dispose()


def _json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, datetime | date):
            return obj.isoformat()
        if isinstance(obj, timedelta):
            return obj.total_seconds()
        return str(obj)

    return json.dumps(value, indent=2, default=default)


# --------------------------------------------------------------------------- commands


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    async def go(db: Database) -> int:
        with Progress("migrating", stream=sys.stderr) as bar:
            applied = await migrate_url(db.url, on_step=lambda m, i, n: bar.update(i, n, m.name))
        print(f"applied {len(applied)} migration(s)" if applied else "database is up to date")
        return 0

    return await _with_db(settings, go, schema=False)


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    async def build(db: Database, resources: dict[str, Any]) -> list[Service]:
        return [WorkerService(db, settings, resources, concurrency=args.concurrency, burst=args.burst)]

    [service] = await Host(settings).run(build)
    stats = service.stats  # type: ignore[attr-defined]
    if args.burst and stats is not None:
        print(f"drained: {stats.completed} completed, {stats.failed} failed, {stats.retried} retried")
    return 0


async def cmd_scheduler(settings: Settings, args: argparse.Namespace) -> int:
    async def build(db: Database, resources: dict[str, Any]) -> list[Service]:
        return [SchedulerService(db, settings)]

    await Host(settings).run(build)
    return 0


async def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    if not args.once:
        raise UsageError("`briefs schedule` runs one tick: pass --once (the daemon is `briefs scheduler`)")
    now = _parse_instant(args.now) if args.now else datetime.now(UTC)

    async def go(db: Database) -> int:
        report = await run_tick(db, settings, now, dry_run=args.dry_run)
        if args.json:
            print(_json(report.to_dict()))
        else:
            print(printable(report.summary()))
        return 0

    return await _with_db(settings, go)


async def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    if (args.user_id is None) == (not args.all):
        raise UsageError("give a USER_ID or --all (not both)")
    if args.all and args.date:
        raise UsageError("--date applies to one user; --all queues each user's local today")
    if args.all and args.resend_email:
        raise UsageError("--resend-email applies to one user's brief (give USER_ID)")
    brief_date = _parse_date(args.date) if args.date else None
    force = args.force or args.resend_email  # --resend-email regenerates: it implies --force
    hook = settings_enqueue_hook(settings)

    async def go(db: Database) -> int:
        if args.all:
            with Progress("queueing briefs", stream=sys.stderr) as bar:
                report = await enqueue_all(db, force=force, enqueue=hook, on_progress=bar.update)
            print(printable(report.summary()))
            return 0
        queued = await queue_brief(
            db, settings, args.user_id, brief_date, force=force, enqueue=hook, resend_email=args.resend_email
        )
        print(queued.line())
        return 0

    return await _with_db(settings, go)


async def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    brief_date = _parse_date(args.date) if args.date else None

    async def go(db: Database) -> int:
        text = await show_brief(db, args.user_id, brief_date)
        print(printable(text))
        return 0

    return await _with_db(settings, go)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    async def go(db: Database) -> int:
        async with db.raw() as conn:
            rows = await queue.stats(conn)
            failures = await queue.recent_failures(conn, 3600)
        llm = await llm_health(db)
        cost = await llm_cost(db, settings)
        async with db.raw() as conn:
            circuit = await read_status(conn, settings)
            planned = await last_capacity(conn)
        if args.json:
            queue_rows = [
                {
                    "job_type": r["job_type"],
                    "status": r["status"],
                    "jobs": r["jobs"],
                    "oldest_pending_seconds": (
                        r["oldest_pending_age"].total_seconds() if r["oldest_pending_age"] is not None else None
                    ),
                    "next_run_at": r.get("next_run_at"),
                }
                for r in rows
            ]
            print(_json({"queue": queue_rows, "failures_last_hour": failures, "llm": llm, "llm_circuit": circuit,
                         "llm_cost": cost, "llm_capacity": planned}))
            return 0
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
        print(_llm_text(llm))
        print(f"LLM circuit: {one_line(str(circuit['detail']), 300)}")
        print(_cost_text(cost))
        print(_capacity_text(planned, settings))
        return 0

    return await _with_db(settings, go)


async def cmd_llm_reset(settings: Settings, args: argparse.Namespace) -> int:
    """Close the LLM circuit of this configuration (every configuration's with --all)."""
    if not args.all and not settings.llm_enabled:
        raise UsageError("no OPENAI_API_KEY: there is no LLM circuit to reset (or pass --all)")

    async def go(db: Database) -> int:
        async with db.raw() as conn:
            key = None if args.all else circuit_key(settings)
            closed = await reset_circuit(conn, key, f"reset by {process_name()}")
        print(f"LLM circuit closed ({len(closed)} reset); workers follow within seconds" if closed
              else "LLM circuit already closed")
        return 0

    return await _with_db(settings, go)


def _capacity_text(planned: dict[str, Any], settings: Settings) -> str:
    """The last periodic tick's capacity plan for ``briefs status``: what it planned, and each overload."""
    plan = planned["capacity"]
    if plan is None:
        if planned["tick_at"] is None:
            return "LLM capacity: no scheduler tick logged yet"
        why = "BRIEFS_CAPACITY_PLANNING is off" if not settings.capacity_planning else "off or no LLM configured"
        return f"LLM capacity (tick at {planned['tick_at']}): not planned ({why}): briefs start the buffer ahead"
    lines = capacity_lines(plan, f"LLM capacity (tick at {planned['tick_at']})")
    if "error" not in plan:
        rate = f"{plan['calls_per_minute']:,.0f} calls/min" if plan.get("calls_per_minute") else "no call limit"
        measured = "measured" if plan.get("request_seconds_measured") else "expected"
        lines.insert(1, f"  planned at {rate}, {plan['concurrency']:,} in flight, {plan['request_seconds']} s a "
                        f"request ({measured})")
    return "\n".join(lines)


def _cost_text(cost: dict[str, Any]) -> str:
    """Today's and this month's LLM tokens and cost for ``briefs status`` (UTC days)."""
    currency = one_line(str(cost["currency"]), 10)

    def part(label: str, p: dict[str, Any]) -> str:
        money = f"{p['cost']:.4f} {currency}" if p["cost"] is not None else (
            f"unknown ({p['unpriced_briefs']} brief(s) of a model without a price; "
            f"{p['priced_cost']:.4f} {currency} priced)")
        return (f"  {label}: {p['prompt_tokens']:,} prompt + {p['completion_tokens']:,} completion tokens, "
                f"{money}")

    lines = ["LLM cost (UTC):", part(f"today ({cost['today']['day']})", cost["today"]),
             part(f"this month ({cost['month']['month']})", cost["month"])]
    budget = cost["daily_budget"]
    if budget is not None:
        today = cost["today"]
        state = "reached: new briefs are written without AI until the next UTC day" if today["budget_reached"] \
            else f"{today['remaining']:.4f} {currency} left"
        lines.append(f"  daily budget: {budget:g} {currency}, {state}")
    return "\n".join(lines)


def _llm_text(llm: dict[str, Any]) -> str:
    """The LLM health facts of ``briefs status`` for humans (the JSON form has the same facts)."""
    briefs = llm["briefs"]
    if not briefs:
        return "LLM, last hour: no briefs finished"
    if llm["llm_disabled_briefs"] == briefs:
        return f"LLM, last hour: disabled (no OPENAI_API_KEY); {briefs} deterministic brief(s)"
    lines = [
        f"LLM, last hour: {briefs} brief(s), {llm['calls']} call(s), {llm['failed_calls']} failed"
        + (f" ({llm['llm_disabled_briefs']} brief(s) without the LLM)" if llm["llm_disabled_briefs"] else "")
    ]
    if llm["errors_by_kind"]:
        kinds = ", ".join(f"{one_line(kind, 40)} {n}" for kind, n in llm["errors_by_kind"].items())
        lines.append(f"  errors by kind: {kinds}")
    if llm["fell_back"]:
        share = llm["fell_back_share"] or 0
        lines.append(
            f"  fell back to deterministic text: {llm['fell_back']} of {briefs} brief(s) ({share:.0%})"
        )
    last = llm["last_error"]
    if last:
        at = last["at"]
        when = datetime.fromisoformat(at).astimezone(UTC).strftime("%H:%M:%SZ") if isinstance(at, str) else "-"
        lines.append(f"  last error: {one_line(last['hint'], 120)}")
        lines.append(
            f"    {when}, user {last['user_id']}, {last['part']}: {one_line(last['error'] or '-', 200)}"
        )
    return "\n".join(lines)


async def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    async def go(db: Database) -> int:
        async with db.raw() as conn:
            rows = await queue.list_jobs(conn, status=args.status, job_type=args.type, limit=args.limit)
        if args.json:
            print(_json([{**r, "last_error": r["last_error"] and truncate(r["last_error"], 2000)} for r in rows]))
            return 0
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
                        _instant(r["run_at"]),
                        str(r["user_id"] or "-"),
                        one_line(r["last_error"] or "", 60),
                    ]
                    for r in rows
                ],
                ["id", "type", "status", "tries", "run at", "user", "last error"],
            )
        )
        return 0

    return await _with_db(settings, go)


def _instant(value: object) -> str:
    """A stored instant for the table; one Python cannot hold (``infinity``, year 10000) comes as text."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return one_line(str(value), 40)


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    if (args.job_id is None) == (not args.failed):
        raise UsageError("give a JOB_ID or --failed (not both)")

    async def go(db: Database) -> int:
        async with db.raw() as conn:
            ids = await queue.retry(conn, args.job_id)
        print(f"requeued {len(ids)} job(s)" + (f": {', '.join(map(str, ids[:20]))}" if ids else ""))
        return 0

    return await _with_db(settings, go)


async def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async def go(db: Database) -> int:
        async with db.raw() as conn:
            await queue.cancel(conn, args.job_id)
        print(f"cancelled job {args.job_id}")
        return 0

    return await _with_db(settings, go)


def _split_password(url: str) -> tuple[str, str | None]:
    """(connection string without the password, the password): the password goes to psql
    in PGPASSWORD, never in its argv (visible to every user in ``ps``)."""
    params = conninfo_to_dict(url)
    password = params.pop("password", None)
    return make_conninfo("", **params), None if password is None else str(password)


async def cmd_dsn(settings: Settings, args: argparse.Namespace) -> int:
    """Print the libpq URL of the database in use (password masked unless --show-password)."""
    url, where = await asyncio.to_thread(resolve_url, settings)
    print(url if args.show_password else redact(url))
    if not settings.database_url:
        print(
            f"briefs: {where}: it runs while a briefs process uses it (`briefs run`); "
            "`briefs psql` opens a session on it",
            file=sys.stderr,
        )
    return 0


async def cmd_psql(settings: Settings, args: argparse.Namespace) -> int:
    """Run psql on the database in use (the embedded one is started, and kept while psql runs)."""
    psql = shutil.which("psql")
    if psql is None:
        raise UsageError(
            "psql is not installed (e.g. apt install postgresql-client); "
            "`briefs dsn --show-password` prints the URL for another client"
        )
    url, _ = await asyncio.to_thread(resolve_url, settings)
    bare, password = _split_password(url)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    proc = await asyncio.to_thread(subprocess.Popen, [psql, bare, *args.psql_args], env=env)
    while True:
        try:
            return await asyncio.to_thread(proc.wait)
        except KeyboardInterrupt:  # Ctrl-C belongs to psql (it cancels the query)
            continue


async def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    """The console and HTTP API alone."""
    host = args.host if args.host is not None else settings.web_host
    port = args.port if args.port is not None else settings.web_port

    async def build(db: Database, resources: dict[str, Any]) -> list[Service]:
        web = WebService(db, settings, host=host, port=port)
        print(web.login_hint(), flush=True)
        return [web]

    await Host(settings).run(build)
    return 0


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Everything in one process: migrate, then the scheduler, a worker and the console side by side."""
    if args.demo:
        settings = demo_settings(settings)

    async def build(db: Database, resources: dict[str, Any]) -> list[Service]:
        web = WebService(db, settings, host=settings.web_host, port=settings.web_port)
        print(web.login_hint(), flush=True)
        run_settings = demo_public_url(settings, web.url) if args.demo else settings
        services: list[Service] = [
            SchedulerService(db, run_settings), WorkerService(db, run_settings, resources), web
        ]
        if args.demo:
            since = datetime.now(UTC)
            user_id = await seed_demo(db, run_settings, console=web.url)
            services.append(DemoService(db, user_id, since, console=web.url))
        return services

    await Host(settings, migrate=True).run(build)
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, with the one-line error of every other failure (and where to read more)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"briefs: error: {one_line(message, 300)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="briefs", description="Daily AI briefs, delivered at each user's local time.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _service_commands(sub)
    _schedule_commands(sub)
    _queue_commands(sub)
    _reading_commands(sub)
    return parser


def _service_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="migrate, then run the scheduler and a worker in one process")
    p.add_argument("--demo", action="store_true", help="seed demo users; one brief is due a minute from now")
    p.set_defaults(fn=cmd_run)

    sub.add_parser("migrate", help="apply pending SQL migrations").set_defaults(fn=cmd_migrate)

    p = sub.add_parser("worker", help="run a queue worker")
    p.add_argument("--concurrency", type=_slots, help="job slots (default BRIEFS_WORKER_CONCURRENCY)")
    p.add_argument("--burst", action="store_true", help="drain what is runnable now, then exit")
    p.set_defaults(fn=cmd_worker)

    sub.add_parser("scheduler", help="run the scheduler daemon").set_defaults(fn=cmd_scheduler)

    p = sub.add_parser("web", help="serve the console and HTTP API")
    p.add_argument("--host", type=_host, help="address to bind (default BRIEFS_WEB_HOST, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port (default BRIEFS_WEB_PORT, 8000; 0 picks a free one)")
    p.set_defaults(fn=cmd_web)


def _schedule_commands(sub: Any) -> None:
    p = sub.add_parser("schedule", help="run one scheduler tick")
    p.add_argument("--once", action="store_true", help="run exactly one tick")
    p.add_argument("--now", help="the tick's instant, ISO 8601 with offset (default: now)")
    p.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    p.add_argument("--json", action="store_true", help="print the tick report as JSON")
    p.set_defaults(fn=cmd_schedule)

    p = sub.add_parser("enqueue", help="queue one user's brief now (or every user's, with --all)")
    p.add_argument("user_id", type=_positive, nargs="?", metavar="USER_ID")
    p.add_argument("--all", action="store_true", help="every user with an active preference")
    p.add_argument(
        "--date",
        help="local brief date YYYY-MM-DD (default: the user's today; without --force, "
        "from 7 days back to tomorrow in the user's timezone)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="regenerate even if a brief exists, and accept any --date (the email is not sent again)",
    )
    p.add_argument(
        "--resend-email",
        action="store_true",
        help="regenerate (implies --force) and email the new brief even if that date's email was sent",
    )
    p.set_defaults(fn=cmd_enqueue)


def _queue_commands(sub: Any) -> None:
    p = sub.add_parser("status", help="queue counts, oldest pending, recent failures, LLM health")
    p.add_argument("--json", action="store_true", help="the same facts as JSON")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--status", choices=["pending", "processing", "completed", "failed", "cancelled"])
    p.add_argument("--type", help="job type")
    p.add_argument("--limit", type=_limit, default=50)
    p.add_argument("--json", action="store_true", help="the same facts as JSON (full last error)")
    p.set_defaults(fn=cmd_jobs)

    p = sub.add_parser("retry", help="requeue a failed or cancelled job, or every failed job")
    p.add_argument("job_id", type=_positive, nargs="?", metavar="JOB_ID")
    p.add_argument("--failed", action="store_true", help="requeue every failed job")
    p.set_defaults(fn=cmd_retry)

    p = sub.add_parser("cancel", help="cancel a pending or running job")
    p.add_argument("job_id", type=_positive, metavar="JOB_ID")
    p.set_defaults(fn=cmd_cancel)

    p = sub.add_parser("llm", help="the LLM provider's circuit breaker")
    llm_sub = p.add_subparsers(dest="llm_command", required=True, metavar="ACTION")
    r = llm_sub.add_parser("reset", help="close the LLM circuit (after fixing the key, or to probe now)")
    r.add_argument("--all", action="store_true", help="every configuration's circuit, not only this one's")
    r.set_defaults(fn=cmd_llm_reset)


def _reading_commands(sub: Any) -> None:
    p = sub.add_parser("show", help="print a user's brief (Markdown)")
    p.add_argument("user_id", type=_positive, metavar="USER_ID")
    p.add_argument("--date", help="local brief date YYYY-MM-DD (default: the latest)")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("dsn", help="print the libpq URL of the database in use")
    p.add_argument("--show-password", action="store_true", help="print the password (default: masked)")
    p.set_defaults(fn=cmd_dsn)

    p = sub.add_parser("psql", help="open psql on the database in use (extra arguments go to psql)")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="PSQL_ARGS")
    p.set_defaults(fn=cmd_psql)


SERVICES = frozenset({"run", "worker", "scheduler", "web"})
DEBUG_HINT = "set BRIEFS_LOG_LEVEL=DEBUG for the traceback"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`briefs show 1 | head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (tests capture it): nothing left to flush
        pass


def _error(message: str) -> None:
    print(f"briefs: error: {message}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "psql":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.psql_args = [*extra, *args.psql_args]
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {one_line(e['msg'], 200)}" for e in exc.errors()
        )
        _error(f"invalid configuration: {problems}")
        return 2
    except Exception as exc:  # an unreadable .env, say: still one line
        _error(f"invalid configuration: {one_line(redact(_first_line(exc)), 300)}")
        return 2
    # Services log at INFO; one-shot commands keep stderr for warnings and their error line,
    # unless BRIEFS_LOG_LEVEL says otherwise.
    quiet = args.command not in SERVICES and "log_level" not in settings.model_fields_set
    try:
        setup_logging(
            settings.log_format,
            "WARNING" if quiet else settings.log_level,
            secrets=tuple(
                secret.get_secret_value() if secret else None
                for secret in (settings.openai_api_key, settings.smtp_url, settings.secret_key, settings.admin_token)
            ),
        )
    except ValueError as exc:
        _error(f"invalid configuration: BRIEFS_LOG_LEVEL: {one_line(str(exc), 200)}")
        return 2
    try:
        code: int = asyncio.run(args.fn(settings, args))
        return code
    except UsageError as exc:
        _error(str(exc))
        return 2
    except (DatabaseUnavailable, MigrationError, PermanentError) as exc:
        _error(one_line(redact(str(exc)), 2000))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: Exception) -> int:
    """The last resort: one line for any exception, the traceback only at debug level."""
    log.debug("unexpected error", exc_info=exc)
    text = one_line(redact(_first_line(exc)), 300)
    local_os_error = isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError)
    if is_connection_error(exc) and not local_os_error:
        _error(f"database unavailable: {text}")
        return 1
    if isinstance(exc, queue.QueueError):
        _error(text)
        return 1
    _error(f"unexpected {type(exc).__name__}: {text} ({DEBUG_HINT})")
    return 1


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
