"""Peak benchmark: many users share one brief time and the LLM's rate limit is the bottleneck (run by hand;
results go to bench/README-peak.md).

    .venv/bin/python bench/peak_bench.py                          # 300 users × 4 projects, fixed then capacity
    .venv/bin/python bench/peak_bench.py --modes capacity         # one mode
    .venv/bin/python bench/peak_bench.py --users 100 --lead 60    # a quicker run

Time is compressed tenfold: one real second stands for ten seconds of a real day, so every duration handed
to the processes is a real one and the results are printed in both units. The scenario, per mode, on a fresh
database ``briefs_peak_<pid>_<mode>`` on the server in ``--db`` (default ``BRIEFS_TEST_DATABASE_URL``, else
``postgresql://postgres@127.0.0.1:5432/postgres``), dropped at the end (``--keep`` keeps it):

* ``--users`` users in America/New_York share one brief time T, about ``--lead`` real seconds after the
  start (``time_of_day`` carries seconds), email on; each has ``--projects`` busy projects (an overdue, a
  today and a done task: none is quiet), so each brief makes projects + 1 LLM calls;
* the LLM is ``tests.fakellm.FakeLLM`` in a process of its own: it answers after ``--latency`` seconds and
  refuses, like the provider, what goes over ``--rpm`` requests per real minute (a token bucket holding one
  second's worth) with a 429 and ``retry-after-ms``; email goes to ``tests.smtp.SMTPServer``;
* the real ``python -m scheduler`` (a tick every 30 s = 5 simulated minutes, generation buffer 30 s = 5
  simulated minutes, max lead 720 s = 2 simulated hours, told the LLM's rpm and latency and the number of
  workers) and ``--workers`` real ``python -m worker`` processes run until every brief's email is sent or
  T + ``--timeout``, then are stopped with SIGTERM.

Modes: ``fixed`` (BRIEFS_CAPACITY_PLANNING=false: every brief starts the generation buffer ahead) and
``capacity`` (true: starts planned against the LLM capacity). From the database: the share of briefs
completed at or before their notify_at, email lateness (email_sent_at - notify_at), generation lead
(notify_at - started_at); from the fake: calls answered and refused. Also the machine's load and the CPU of
the processes, and, for the capacity mode, what the scheduler's tick log said.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from briefs.migrate import migrate_url  # noqa: E402
from tests.acceptance.helpers import clean_env  # noqa: E402
from tests.smtp import SMTPServer  # noqa: E402

DEFAULT_SERVER = os.environ.get("BRIEFS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ZONE = ZoneInfo("America/New_York")
SCALE = 10  # simulated seconds per real second
SECRET_KEY = "peak-bench-secret-key-0123456789abcdef"
MODES = ("fixed", "capacity")


# --------------------------------------------------------------------------- the fake LLM, out of process


def _serve_fake(latency: float, rpm: float, conn: Any) -> None:
    from tests.fakellm import FakeLLM

    fake = FakeLLM()
    fake.latency = latency
    fake.rate_limit(rpm)  # burst: one second's worth, the provider's default
    fake.start()
    conn.send(fake.base_url)
    while True:
        msg = conn.recv()
        if msg == "stats":
            conn.send({"calls": fake.calls, "refused": fake.refused, "max_in_flight": fake.max_in_flight,
                       "cpu_s": time.process_time()})
        else:
            fake.stop()
            conn.send("stopped")
            return


class FakeProcess:
    """FakeLLM in its own process, so its HTTP threads do not compete with this one for the GIL."""

    def __init__(self, latency: float, rpm: float) -> None:
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=_serve_fake, args=(latency, rpm, child), daemon=True)
        self.proc.start()
        self.base_url: str = self.parent.recv()

    def stats(self) -> dict[str, Any]:
        self.parent.send("stats")
        result: dict[str, Any] = self.parent.recv()
        return result

    def stop(self) -> None:
        self.parent.send("stop")
        self.parent.recv()
        self.proc.join(5)


# --------------------------------------------------------------------------- database


def create_db(server: str, mode: str) -> str:
    name = f"briefs_peak_{os.getpid()}_{mode}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(server)._replace(path="/" + name))
    asyncio.run(migrate_url(url))
    return url


def drop_db(server: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(url: str, users: int, projects: int, notify_at: datetime) -> None:
    """``users`` New York users notified at ``notify_at``, each with ``projects`` busy projects."""
    local = notify_at.astimezone(ZONE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO users (email, name, timezone, last_visit_at)
               SELECT 'peak' || g || '@example.com', 'Peak ' || g, %s, now() - interval '1 hour'
               FROM generate_series(1, %s) g""",
            (ZONE.key, users),
        )
        conn.execute(
            "INSERT INTO brief_preferences (user_id, time_of_day, email_enabled) SELECT id, %s, true FROM users",
            (local.time(),),
        )
        conn.execute(
            """INSERT INTO projects (user_id, name, description)
               SELECT u.id, 'Project ' || u.id || '-' || g, 'A peak benchmark project'
               FROM users u, generate_series(1, %s) g""",
            (projects,),
        )
        # An overdue task alone keeps a project from being quiet; the others give the prompt some body.
        conn.execute(
            """INSERT INTO tasks (project_id, user_id, title, status, priority, start_date, due_date, completed_at)
               SELECT p.id, p.user_id, k.title || ' ' || p.id, k.status, k.priority,
                      %(day)s::date + k.start_off, %(day)s::date + k.due_off,
                      CASE WHEN k.status = 'done' THEN now() - interval '2 hours' END
               FROM projects p, (VALUES
                   ('Fix the overdue thing', 'in_progress', 'high', NULL::int, -2),
                   ('Start the new thing', 'backlog', 'medium', 0, 0),
                   ('Ship the finished thing', 'done', 'medium', NULL, -1)
               ) AS k(title, status, priority, start_off, due_off)""",
            {"day": local.date()},
        )
        conn.execute(
            """INSERT INTO notes (project_id, user_id, title, content)
               SELECT id, user_id, 'Standup notes', 'Discussed scope, risks and the next milestone.' FROM projects"""
        )
        conn.execute("ANALYZE")


# --------------------------------------------------------------------------- processes


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Service:
    """``python -m <module>`` in a child process, its output in a log file."""

    name: str
    module: str
    env: dict[str, str]
    log: Path = field(init=False)
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix=f"briefs-peak-{self.name}-", suffix=".log")
        self.log = Path(path)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module], cwd=REPO, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, marker: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not log {marker!r} ({self.proc.poll()}):\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def cpu(self) -> float:
        return _proc_cpu(self.proc.pid) or 0.0

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def process_env(url: str, args: argparse.Namespace, mode: str, llm_url: str, smtp_url: str) -> dict[str, str]:
    """Every process's environment: the same settings for the scheduler and the workers."""
    env = clean_env(
        url,
        CAPACITY_PLANNING=str(mode == "capacity").lower(),
        GENERATION_BUFFER=args.buffer,
        SCHEDULER_INTERVAL=args.interval,
        LOOKAHEAD=900,
        MAX_LEAD=720,
        LLM_CALL_SECONDS=args.latency,
        LLM_RPM=round(args.rpm),
        WORKERS_EXPECTED=args.workers,
        LLM_CONCURRENCY=args.llm_concurrency,
        WORKER_CONCURRENCY=args.worker_concurrency,
        SMTP_URL=smtp_url,
        SECRET_KEY=SECRET_KEY,
        LOG_LEVEL="INFO",
    )
    env.update(OPENAI_API_KEY="peak-bench-key", OPENAI_BASE_URL=llm_url)
    return env


# --------------------------------------------------------------------------- one mode


def _emails_sent(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) AS n FROM daily_briefs WHERE email_sent_at IS NOT NULL").fetchone()
    return int(row[0]) if row else 0


def _cpu_now(processes: list[Service]) -> dict[str, float]:
    """CPU seconds so far of every process, this one (the SMTP server's thread lives here) as "bench"."""
    return {"bench": time.process_time(), **{s.name: s.cpu() for s in processes}}


def wait_for_emails(url: str, users: int, notify_at: datetime, timeout: float,
                    processes: list[Service]) -> tuple[bool, dict[str, float]]:
    """Until every brief's email is sent (True) or ``notify_at + timeout`` (False), with every process's CPU
    seconds at T (:func:`_cpu_now`); a progress line every 10 s."""
    deadline = notify_at + timedelta(seconds=timeout)
    shown = 0.0
    at_t: dict[str, float] = {}
    while True:
        sent = _emails_sent(url)
        now = datetime.now(UTC)
        if now >= notify_at and not at_t:
            at_t = _cpu_now(processes)
        if time.monotonic() - shown >= 10:
            shown = time.monotonic()
            to_go = (notify_at - now).total_seconds()
            print(f"    T{-to_go:+6.0f} s real ({-to_go * SCALE / 60:+6.1f} min simulated): {sent}/{users} emails sent",
                  flush=True)
        if sent >= users or now > deadline:
            return sent >= users, at_t or _cpu_now(processes)
        for service in processes:
            if service.proc.poll() is not None:
                raise RuntimeError(f"{service.name} exited ({service.proc.returncode}):\n{service.text()[-3000:]}")
        time.sleep(0.5)


def start_processes(env: dict[str, str], workers: int) -> list[Service]:
    services = [Service(f"worker{i + 1}", "worker", {**env, "BRIEFS_WORKER_ID": f"peak-worker-{i + 1}"})
                for i in range(workers)]
    try:
        for service in services:
            service.wait_for_line("started:")
        services.append(Service("scheduler", "scheduler", env))
        services[-1].wait_for_line("scheduler started")
    except BaseException:
        for service in services:
            service.stop(5)
        raise
    return services


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    url = create_db(args.db, mode)
    fake = FakeProcess(args.latency, args.rpm)
    smtp = SMTPServer().start()
    services: list[Service] = []
    try:
        notify_at = (datetime.now(UTC) + timedelta(seconds=args.lead)).replace(microsecond=0)
        seed(url, args.users, args.projects, notify_at)
        print(f"  {mode}: {args.users} users notified at {notify_at.astimezone(ZONE):%H:%M:%S %Z} "
              f"(T = now + {args.lead:g} s real = {args.lead * SCALE / 60:g} min simulated)", flush=True)
        services = start_processes(process_env(url, args, mode, fake.base_url, smtp.url), args.workers)
        busy0, wall0, bench0 = _machine_busy(), time.monotonic(), time.process_time()
        all_sent, cpu_at_t = wait_for_emails(url, args.users, notify_at, args.timeout, services)
        cpu_end = _cpu_now(services)
        cpu = {name: round(value - (bench0 if name == "bench" else 0.0), 1) for name, value in cpu_end.items()}
        cpu_after_t = {name: round(cpu_end[name] - cpu_at_t[name], 1) for name in cpu_end}
        busy, wall = _machine_busy() - busy0, time.monotonic() - wall0
        load = os.getloadavg()
        for service in services:
            service.stop()
        result = {"mode": mode, "all_sent": all_sent, "smtp_received": len(smtp.received), **measure(url)}
        result.update(llm=fake.stats(), cpu_s=cpu, cpu_s_after_t=cpu_after_t,
                      machine_busy_share=round(busy / wall / (os.cpu_count() or 1), 2),
                      loadavg=[round(v, 2) for v in load], ticks=tick_log(url))
        return result
    finally:
        for service in services:
            service.stop(5)
            service.log.unlink(missing_ok=True)
        smtp.stop()
        fake.stop()
        if not args.keep:
            drop_db(args.db, url)


# --------------------------------------------------------------------------- what happened


def _quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank quantile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


_BRIEFS = """
    SELECT b.status, extract(epoch FROM b.completed_at - b.notify_at) AS done_after,
           extract(epoch FROM b.email_sent_at - b.notify_at) AS email_late,
           extract(epoch FROM b.notify_at - b.started_at) AS lead,
           extract(epoch FROM b.notify_at - j.run_at) AS planned_lead
    FROM daily_briefs b
    LEFT JOIN queue_jobs j ON j.job_type = 'generate_daily_brief' AND j.user_id = b.user_id
                          AND j.status = 'completed'
"""


def measure(url: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute(_BRIEFS).fetchall()
        sources = {r["source"]: r["n"] for r in conn.execute(
            "SELECT coalesce(metadata->>'source', '?') AS source, count(*) AS n FROM project_daily_briefs GROUP BY 1")}
        claims = {r["job_type"]: {"p50": r["p50"], "max": r["max"], "run_p50": r["run_p50"]} for r in conn.execute(
            """SELECT job_type, percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - run_at))
                      AS p50, max(extract(epoch FROM started_at - run_at)) AS max,
                      percentile_disc(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
                      AS run_p50
               FROM queue_jobs WHERE started_at IS NOT NULL GROUP BY 1""")}
        window = conn.execute(
            """SELECT extract(epoch FROM max(completed_at) - min(started_at)) AS span FROM daily_briefs""").fetchone()
    done = [float(r["done_after"]) for r in rows if r["done_after"] is not None]
    late = [float(r["email_late"]) for r in rows if r["email_late"] is not None]
    leads = [float(r["lead"]) for r in rows if r["lead"] is not None]
    planned = [float(r["planned_lead"]) for r in rows if r["planned_lead"] is not None]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "briefs": len(rows),
        "statuses": statuses,
        "on_time": sum(1 for d in done if d <= 0),
        "emails": len(late),
        "email_late_s": {"p50": _quantile(late, 0.5), "p99": _quantile(late, 0.99), "max": max(late, default=None)},
        "lead_s": {"p50": _quantile(leads, 0.5), "max": max(leads, default=None), "min": min(leads, default=None)},
        "planned_lead_s": {"min": min(planned, default=None), "max": max(planned, default=None)},
        "generation_span_s": float(window["span"]) if window and window["span"] is not None else None,
        "sections": sources,
        # How long due jobs waited for a worker slot (started_at - run_at), and then ran, by job type.
        "claim_delay_s": {kind: {k: None if v is None else float(v) for k, v in delays.items()}
                          for kind, delays in claims.items()},
    }


def tick_log(url: str) -> list[dict[str, Any]]:
    """The scheduler's ticks, oldest first: summary, and whatever its report says about capacity or overload."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT tick_at, ok, summary, report, error FROM scheduler_ticks ORDER BY id").fetchall()
    ticks = []
    for row in rows:
        report = row["report"] or {}
        capacity = {k: v for k, v in report.items()
                    if v is not None and ("capacity" in k or "overload" in k or "warning" in k)}
        ticks.append({"tick_at": row["tick_at"].isoformat(), "ok": row["ok"], "summary": row["summary"],
                      "capacity": capacity, "error": row["error"]})
    return ticks


# --------------------------------------------------------------------------- printing


def _both(seconds: float | None) -> str:
    """Real seconds and the simulated time they stand for."""
    if seconds is None:
        return "-"
    sim = seconds * SCALE
    shown = f"{sim / 60:.1f} min" if abs(sim) >= 120 else f"{sim:.0f} s"
    return f"{seconds:.1f} s ({shown})"


def table(results: list[dict[str, Any]]) -> str:
    head = ("| mode | on time | emails sent | email lateness p50 / p99 / max | generation lead p50 / max "
            "| LLM calls answered | 429s (share of requests) | sections llm / other | load avg 1 min |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in results:
        llm = r["llm"]
        answered = llm["calls"] - llm["refused"]
        share = llm["refused"] / llm["calls"] if llm["calls"] else 0.0
        late, lead = r["email_late_s"], r["lead_s"]
        llm_sections = r["sections"].get("llm", 0)
        lines.append(
            f"| {r['mode']} | {r['on_time']}/{r['briefs']} ({100 * r['on_time'] / max(1, r['briefs']):.1f} %) "
            f"| {r['emails']} | {_both(late['p50'])} / {_both(late['p99'])} / {_both(late['max'])} "
            f"| {_both(lead['p50'])} / {_both(lead['max'])} | {answered} | {llm['refused']} ({100 * share:.1f} %) "
            f"| {llm_sections} / {sum(r['sections'].values()) - llm_sections} | {r['loadavg'][0]} |"
        )
    return "\n".join(lines)


def print_results(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    calls = args.users * (args.projects + 1)
    need = 60 * calls / args.rpm
    print(f"\nTime compressed {SCALE}x: 1 real second stands for {SCALE} simulated seconds.")
    print(f"{args.users} users x {args.projects} projects = {calls} LLM calls at {args.rpm:g}/min real "
          f"({args.rpm / SCALE:g}/min simulated): {_both(need)} of LLM time at best; "
          f"generation buffer {_both(args.buffer)}; LLM latency {args.latency:g} s real; {args.workers} workers; "
          f"{os.cpu_count()} cores\n")
    print(table(results))
    for r in results:
        print(f"\n{r['mode']}: statuses {r['statuses']}, sections {r['sections']}, all emails sent: {r['all_sent']} "
              f"(SMTP received {r['smtp_received']}), generation span {_both(r['generation_span_s'])}, "
              f"planned lead (notify_at - run_at) {r['planned_lead_s']}")
        waits = "; ".join(f"{kind} p50 {_both(d['p50'])} max {_both(d['max'])}, then ran p50 {_both(d['run_p50'])}"
                          for kind, d in r["claim_delay_s"].items())
        print(f"  due jobs waited for a worker slot (started_at - run_at): {waits}")
        print(f"  CPU s from T to the end (email, mostly): {r['cpu_s_after_t']}")
        print(f"  LLM: {r['llm']}; CPU s: {r['cpu_s']}; machine busy {100 * r['machine_busy_share']:.0f} %; "
              f"load average {r['loadavg']}")
        if r["mode"] == "capacity":
            for tick in r["ticks"]:
                if tick["capacity"] or tick["error"] or " 0 enqueued" not in (tick["summary"] or ""):
                    print(f"  tick {tick['tick_at']}: {tick['summary'] or tick['error']}")
                    if tick["capacity"]:
                        print("    " + json.dumps(tick["capacity"], default=str)[:2000])
    if args.json:
        print(json.dumps(results, indent=2, default=str))


def _commit() -> str:
    """The code's commit (``git describe``), or "unknown" outside a git work tree."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=DEFAULT_SERVER, help="a maintenance database URL on the server to use")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: fixed, capacity")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--projects", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the fake LLM takes to answer")
    parser.add_argument("--rpm", type=float, default=2000, help="the fake LLM's requests per real minute")
    parser.add_argument("--lead", type=float, default=100, help="real seconds from the start to the brief time")
    parser.add_argument("--timeout", type=float, default=90, help="real seconds after the brief time to give up")
    parser.add_argument("--buffer", type=float, default=30, help="BRIEFS_GENERATION_BUFFER, real seconds")
    parser.add_argument("--interval", type=float, default=30, help="BRIEFS_SCHEDULER_INTERVAL, real seconds")
    parser.add_argument("--llm-concurrency", type=int, default=8, help="BRIEFS_LLM_CONCURRENCY per worker")
    parser.add_argument("--worker-concurrency", type=int, default=10, help="BRIEFS_WORKER_CONCURRENCY per worker")
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"peak benchmark at {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {_commit()}, load average {load}",
          flush=True)
    results = [run_mode(args, mode) for mode in modes]
    print_results(args, results)


if __name__ == "__main__":
    main()
