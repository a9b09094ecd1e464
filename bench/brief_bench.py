"""Brief generation benchmarks (run by hand; results go to bench/README-briefs.md).

    /work/venv/bin/python bench/brief_bench.py single                 # one brief, 10 projects, 300 ms replies
    /work/venv/bin/python bench/brief_bench.py fleet                  # 1,000 users × 5 projects through the worker
    /work/venv/bin/python bench/brief_bench.py fleet --processes 2    # the same with two worker processes
    /work/venv/bin/python bench/brief_bench.py fleet --users 200      # a quicker run
    /work/venv/bin/python bench/brief_bench.py fleet --no-llm         # everything but the LLM (no API key)
    /work/venv/bin/python bench/brief_bench.py client --calls 3000    # the LLM client alone, 100 at a time

The database is a fresh ``briefs_bench_<pid>`` on the server in ``--db`` (default
``BRIEFS_TEST_DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``),
dropped at the end. The LLM is ``tests.fakellm.FakeLLM`` with a fixed reply
latency, run in a *separate process* so its HTTP threads do not compete with the
worker for the GIL.

The fleet reports the CPU seconds of every party during the run: the worker
process(es), FakeLLM, the PostgreSQL backends of the benchmark's database (sampled
by a third process: a lower bound), interrupts, and everything else on the machine
(other people's work), so a slow run can be told from a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from briefs import llm as llm_module
from briefs.contract import BriefRequest
from briefs.db import Database
from briefs.generator import generate
from briefs.llm import LLMClient
from briefs.migrate import migrate_url
from briefs.settings import Settings

DEFAULT_SERVER = os.environ.get("BRIEFS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# --------------------------------------------------------------------------- the fake LLM, out of process


def _serve_fake(latency: float, backlog: int, nodelay: bool, conn: Any) -> None:
    from tests import fakellm

    # The stdlib server's listen backlog is 5; a burst of 100 new connections overflows it and
    # the kernel drops SYNs (the client retries after 1 s). Raise it for this process only.
    fakellm._Server.request_queue_size = backlog
    # The stdlib handler leaves Nagle's algorithm on and writes headers and body separately: the body
    # then waits for the client's delayed ACK (~40 ms per request). Real APIs do not behave like that.
    fakellm._Handler.disable_nagle_algorithm = nodelay
    fake = fakellm.FakeLLM()
    fake.latency = latency
    fake.start()
    conn.send(fake.base_url)
    while True:
        msg = conn.recv()
        if msg == "stats":
            conn.send({"calls": fake.calls, "max_in_flight": fake.max_in_flight, "cpu_s": time.process_time()})
        elif msg == "reset":
            fake.reset()
            conn.send("ok")
        else:
            fake.stop()
            conn.send("stopped")
            return


class FakeProcess:
    def __init__(self, latency: float, backlog: int, nodelay: bool = True) -> None:
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(
            target=_serve_fake, args=(latency, backlog, nodelay, child), daemon=True
        )
        self.proc.start()
        self.base_url: str = self.parent.recv()

    def ask(self, msg: str) -> Any:
        self.parent.send(msg)
        return self.parent.recv()

    def stop(self) -> None:
        self.ask("stop")
        self.proc.join(5)


# --------------------------------------------------------------------------- CPU accounting, out of process


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process, from /proc; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """CPU seconds all cores spent not idle since boot, and of those in interrupts (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values[:8]) - idle) / tick, (values[5] + values[6]) / tick  # irq + softirq


def _all_processes() -> dict[int, tuple[float, str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            cpu = _proc_cpu(int(name))
            if cpu is not None:
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = "?"
                out[int(name)] = (cpu, cmd[:90])
    return out


def _monitor(url: str, interval: float, conn: Any) -> None:
    """Samples the CPU of the PostgreSQL backends serving ``url``'s database (they are this machine's
    processes) and the whole machine's busy time, between "start" and "stop"."""
    with psycopg.connect(url, autocommit=True) as db:
        conn.send("ready")
        assert conn.recv() == "start"
        busy0, irq0 = _machine_busy()
        procs0 = _all_processes()
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        while True:
            for (pid,) in db.execute(query).fetchall():
                cpu = _proc_cpu(pid)
                if cpu is not None:
                    first.setdefault(pid, cpu)
                    last[pid] = cpu
            if conn.poll(interval):
                break
        for pid in last:  # a last look at the ones still alive
            cpu = _proc_cpu(pid)
            if cpu is not None:
                last[pid] = cpu
        busy, irq = (b - a for a, b in zip((busy0, irq0), _machine_busy(), strict=True))
        procs = _all_processes()
    # The busiest processes of the run (started before it or during it; those that ended are missed).
    deltas = sorted(((cpu - procs0.get(pid, (0.0, ""))[0], cmd) for pid, (cpu, cmd) in procs.items()), reverse=True)
    conn.recv()
    conn.send({
        # A lower bound: a backend that ends between two samples loses its last interval, and one
        # seen first mid-run counts from then (the pool's connections are open before the start).
        "postgres_backends_s": sum(last[p] - first[p] for p in last),
        "postgres_backends_seen": len(last),
        "machine_busy_s": busy,
        "machine_irq_s": irq,  # interrupt time, loopback networking included: nobody's process time
        "busiest_processes": [f"{cpu:5.1f} s  {cmd}" for cpu, cmd in deltas[:5]],
        "monitor_s": time.process_time(),
    })


class CpuMonitor:
    def __init__(self, url: str, interval: float = 0.2) -> None:
        self.parent, child = mp.Pipe()
        self.proc = mp.get_context("spawn").Process(target=_monitor, args=(url, interval, child), daemon=True)
        self.proc.start()
        assert self.parent.recv() == "ready"

    def start(self) -> None:
        self.parent.send("start")

    def stop(self) -> dict[str, Any]:
        self.parent.send("stop")
        self.parent.send("result")
        result: dict[str, Any] = self.parent.recv()
        self.proc.join(5)
        return result


# --------------------------------------------------------------------------- database


def _with_db(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def create_db(server: str) -> str:
    name = f"briefs_bench_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(server, name)
    asyncio.run(migrate_url(url))
    return url


def drop_db(server: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed(url: str, users: int, projects: int, day: Any) -> None:
    """``users`` users, each with ``projects`` busy projects (overdue, today, upcoming, done, a note)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO users (email, name, timezone)
               SELECT 'bench' || g || '@example.com', 'Bench ' || g, 'UTC' FROM generate_series(1, %s) g""",
            (users,),
        )
        conn.execute("INSERT INTO brief_preferences (user_id) SELECT id FROM users")
        conn.execute(
            """INSERT INTO projects (user_id, name, description)
               SELECT u.id, 'Project ' || u.id || '-' || g, 'A benchmark project'
               FROM users u, generate_series(1, %s) g""",
            (projects,),
        )
        conn.execute(
            """INSERT INTO tasks (project_id, user_id, title, status, priority, start_date, due_date, completed_at)
               SELECT p.id, p.user_id, k.title || ' ' || p.id, k.status, k.priority,
                      %(day)s::date + k.start_off, %(day)s::date + k.due_off,
                      CASE WHEN k.status = 'done' THEN now() - interval '2 hours' END
               FROM projects p, (VALUES
                   ('Fix the overdue thing', 'in_progress', 'high', NULL::int, -2),
                   ('Start the new thing', 'backlog', 'medium', 0, 5),
                   ('Review the upcoming thing', 'backlog', 'low', NULL, 3),
                   ('Ship the finished thing', 'done', 'medium', NULL, -1)
               ) AS k(title, status, priority, start_off, due_off)""",
            {"day": day},
        )
        conn.execute(
            """INSERT INTO notes (project_id, user_id, title, content)
               SELECT id, user_id, 'Standup notes', 'Discussed scope, risks and the next milestone.'
               FROM projects"""
        )


def settings_for(url: str, base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "openai_api_key": "bench-key",
        "openai_base_url": base_url,
        "smtp_url": None,
        "llm_max_retries": 0,
        "llm_timeout": 30.0,
        "poll_interval": 0.5,
        "lease_seconds": 30.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --------------------------------------------------------------------------- scenarios


async def _one_brief(url: str, base_url: str, per_brief: int, day: Any) -> float:
    settings = settings_for(url, base_url, llm_brief_concurrency=per_brief, llm_concurrency=max(per_brief, 8))
    db = Database(settings, url, pool_size=5)
    try:
        async with db.raw() as conn:
            await conn.execute("TRUNCATE daily_briefs CASCADE")
        async with LLMClient(settings) as client:
            started = time.perf_counter()
            outcome = await generate(db, settings, BriefRequest(1, day, datetime.now(UTC)), llm=client)
            elapsed = time.perf_counter() - started
        assert outcome.status == "completed", outcome
        assert outcome.sources.get("llm") == 10, outcome.sources
        return elapsed
    finally:
        await db.dispose()


def single(args: argparse.Namespace) -> dict[str, Any]:
    url = create_db(args.db)
    fake = FakeProcess(args.latency, args.backlog)
    day = datetime.now(UTC).date()
    try:
        seed(url, 1, 10, day)
        cold = asyncio.run(_one_brief(url, fake.base_url, 10, day))  # first run: templates compile, connects
        calls = fake.ask("stats")["calls"]
        concurrent = asyncio.run(_one_brief(url, fake.base_url, 10, day))
        sequential = asyncio.run(_one_brief(url, fake.base_url, 1, day))
        result = {
            "scenario": "single brief, 10 projects",
            "latency_s": args.latency,
            "calls_per_brief": calls,
            "concurrent_wall_s_first_run": round(cold, 3),
            "concurrent_wall_s": round(concurrent, 3),
            "sequential_wall_s": round(sequential, 3),
            "ideal_concurrent_s": round(2 * args.latency, 3),
        }
    finally:
        fake.stop()
        drop_db(args.db, url)
    return result


async def _client_only(base_url: str, calls: int, concurrency: int) -> dict[str, Any]:
    """``calls`` project-brief completions through one ``LLMClient``, ``concurrency`` at a time."""
    from briefs.loading import ProjectContext
    from briefs.render import project_messages

    settings = settings_for("postgresql://unused", base_url, llm_concurrency=concurrency)
    project = ProjectContext(1, "Apollo", "A benchmark project", 3)
    messages = project_messages(project, datetime.now(UTC).date(), "standard")
    async with LLMClient(settings) as client:
        await client.complete(messages, llm_module.ProjectBrief)  # connect, warm caches
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client.complete(messages, llm_module.ProjectBrief) for _ in range(calls)))
        return {"elapsed": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


def client_only(args: argparse.Namespace) -> dict[str, Any]:
    fake = FakeProcess(args.latency, args.backlog)
    calls = args.users * (args.projects + 1) if args.calls is None else args.calls
    try:
        out = asyncio.run(_client_only(fake.base_url, calls, args.llm_concurrency))
        fake_stats = fake.ask("stats")
    finally:
        fake.stop()
    ideal = calls * args.latency / args.llm_concurrency
    return {
        "scenario": f"LLM client alone: {calls} calls, concurrency {args.llm_concurrency}",
        "latency_s": args.latency,
        "wall_s": round(out["elapsed"], 2),
        "ideal_s": round(ideal, 2),
        "overhead_pct": round(100 * (out["elapsed"] / ideal - 1), 1),
        "cpu_s_client": round(out["cpu_s"], 2),
        "cpu_ms_per_call": round(1000 * out["cpu_s"] / calls, 3),
        "max_in_flight_at_fake": fake_stats["max_in_flight"],
    }


def _enqueue_all(url: str, day: Any) -> None:
    notify = datetime.now(UTC) - timedelta(seconds=1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO queue_jobs (job_type, payload, dedup_key, user_id, notify_at)
               SELECT 'generate_daily_brief',
                      jsonb_build_object('user_id', id, 'brief_date', %(day)s::text, 'notify_at', %(notify)s::text,
                                         'engagement_stage', 'standard', 'email', false, 'catch_up', false,
                                         'force', false),
                      'brief:' || id || ':' || %(day)s::text, id, %(notify)s::timestamptz
               FROM users""",
            {"day": day.isoformat(), "notify": notify.isoformat()},
        )


def _llm_tokens(kind: str) -> int:
    """The LLM tokens this process has counted (Prometheus ``briefs_llm_tokens_total``)."""
    from prometheus_client import REGISTRY

    return int(REGISTRY.get_sample_value("briefs_llm_tokens_total", {"kind": kind}) or 0)


async def _drain(settings: Settings, worker_concurrency: int, start: Any = None,
                 monitor: CpuMonitor | None = None) -> dict[str, Any]:
    """One worker process's share: a burst worker until the queue is empty."""
    from briefs.app.host import close_resources
    from briefs.app.services import handlers
    from worker.runner import Worker

    db = Database(settings, settings.database_url, pool_size=settings.db_pool_size)
    await db.check()
    tokens_before = {kind: _llm_tokens(kind) for kind in ("prompt", "completion")}
    services: dict[str, Any] = {"llm": LLMClient(settings)}
    worker = Worker(db, settings, handlers(settings), burst=True, concurrency=worker_concurrency,
                    services=services)
    if start is not None:
        await asyncio.to_thread(start.wait)
    if monitor is not None:
        monitor.start()
    started = time.perf_counter()
    cpu = time.process_time()
    try:
        stats = await worker.run()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await close_resources(services)
        await db.dispose()
    return {
        "elapsed": elapsed,
        "cpu_s": cpu,
        "completed": stats.completed,
        "failed": stats.failed,
        "prompt_tokens": _llm_tokens("prompt") - tokens_before["prompt"],
        "completion_tokens": _llm_tokens("completion") - tokens_before["completion"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _drain_process(settings_json: str, worker_concurrency: int, ready: Any, start: Any, out: Any) -> None:
    settings = Settings.model_validate_json(settings_json)
    ready.set()
    out.put(asyncio.run(_drain(settings, worker_concurrency, start)))


def _settings_json(settings: Settings) -> str:
    data = settings.model_dump(mode="json")
    data["openai_api_key"] = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    data["smtp_url"] = None
    return json.dumps(data)


def _run_processes(settings: Settings, processes: int, worker_concurrency: int,
                   monitor: CpuMonitor) -> tuple[float, list[dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    readies, procs = [], []
    for _ in range(processes):
        ready = ctx.Event()
        proc = ctx.Process(
            target=_drain_process, args=(_settings_json(settings), worker_concurrency, ready, start, out)
        )
        proc.start()
        readies.append(ready)
        procs.append(proc)
    for ready in readies:
        ready.wait(60)
    time.sleep(1.0)  # let every process finish connecting before the clock starts
    monitor.start()
    began = time.perf_counter()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - began
    for proc in procs:
        proc.join(10)
    return wall, results


def _summarise(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT status, count(*), sum(prompt_tokens), sum(completion_tokens) FROM daily_briefs GROUP BY status"
        ).fetchall()
        sources = dict(conn.execute("SELECT metadata->>'source', count(*) FROM project_daily_briefs GROUP BY 1")
                       .fetchall())
    return {
        "briefs": {r[0]: r[1] for r in rows},
        "tokens": [int(sum(r[2] or 0 for r in rows)), int(sum(r[3] or 0 for r in rows))],
        "sources": sources,
    }


def fleet(args: argparse.Namespace) -> dict[str, Any]:
    url = create_db(args.db)
    fake = FakeProcess(args.latency, args.backlog)
    day = datetime.now(UTC).date()
    per_process = args.llm_concurrency // args.processes
    try:
        seed(url, args.users, args.projects, day)
        settings = settings_for(
            url,
            fake.base_url,
            llm_concurrency=per_process,
            llm_brief_concurrency=args.projects,
            db_pool_size=args.pool,
            **({"openai_api_key": None} if args.no_llm else {}),
        )
        _enqueue_all(url, day)
        monitor = CpuMonitor(url)
        fake_cpu = fake.ask("stats")["cpu_s"]
        if args.processes == 1:
            out = asyncio.run(_drain(settings, args.worker_concurrency, monitor=monitor))
            wall, results = out["elapsed"], [out]
        else:
            wall, results = _run_processes(settings, args.processes, args.worker_concurrency // args.processes,
                                           monitor)
        cpu = monitor.stop()
        fake_stats = fake.ask("stats")
        calls = fake_stats["calls"]
        ideal = calls * args.latency / args.llm_concurrency
        db_side = _summarise(url)
        worker_cpu = sum(r["cpu_s"] for r in results)
        result = {
            "scenario": f"{args.users} users × {args.projects} projects through the worker",
            "worker_processes": args.processes,
            "latency_s": args.latency,
            "llm_concurrency_total": per_process * args.processes,
            "worker_concurrency_total": args.worker_concurrency,
            "llm_calls": calls,
            "max_in_flight_at_fake": fake_stats["max_in_flight"],
            "wall_s": round(wall, 2),
            "ideal_s": round(ideal, 2),
            "overhead_pct": round(100 * (wall / ideal - 1), 1) if ideal else None,
            "briefs": db_side["briefs"],
            "jobs_completed": sum(r["completed"] for r in results),
            "jobs_failed": sum(r["failed"] for r in results),
            "sections_by_source": db_side["sources"],
            "tokens_recorded_on_briefs": db_side["tokens"],
            "tokens_counted_by_clients": [sum(r["prompt_tokens"] for r in results),
                                          sum(r["completion_tokens"] for r in results)],
            "peak_rss_mb_per_worker_process": [round(r["peak_rss_mb"], 1) for r in results],
            "cpu_s_worker_processes": [round(r["cpu_s"], 1) for r in results],
            "cpu_s_fake_llm": round(fake_stats["cpu_s"] - fake_cpu, 1),
            "cpu_s_postgres_backends": round(cpu["postgres_backends_s"], 1),
            "cpu_s_machine_busy": round(cpu["machine_busy_s"], 1),
            "cpu_s_machine_irq": round(cpu["machine_irq_s"], 1),
            "cpu_s_other_processes": round(cpu["machine_busy_s"] - cpu["machine_irq_s"] - worker_cpu
                                           - (fake_stats["cpu_s"] - fake_cpu) - cpu["postgres_backends_s"], 1),
            "busiest_processes": cpu["busiest_processes"],
            "cpu_s_available": round(wall * (os.cpu_count() or 1), 1),
            "llm_pool_fast_checks": llm_module.fast_pool_checks(llm_module.make_http_client(1)),
            "cores": os.cpu_count(),
        }
    finally:
        fake.stop()
        drop_db(args.db, url)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["single", "fleet", "client"])
    parser.add_argument("--db", default=DEFAULT_SERVER, help="a maintenance database URL on the server to use")
    parser.add_argument("--latency", type=float, default=None, help="FakeLLM reply latency in seconds")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--projects", type=int, default=5)
    parser.add_argument("--llm-concurrency", type=int, default=100)
    parser.add_argument("--worker-concurrency", type=int, default=60)
    parser.add_argument("--pool", type=int, default=20, help="database pool size (overflow as much again)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes sharing the LLM concurrency")
    parser.add_argument("--calls", type=int, default=None,
                        help="client scenario: number of calls (default users × (projects + 1))")
    parser.add_argument("--no-llm", action="store_true",
                        help="fleet without an API key: deterministic briefs, the cost of everything but the LLM")
    parser.add_argument("--backlog", type=int, default=256, help="FakeLLM listen backlog (stdlib default: 5)")
    args = parser.parse_args()
    if args.latency is None:
        args.latency = 0.3 if args.scenario == "single" else 0.2
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    scenarios = {"single": single, "fleet": fleet, "client": client_only}
    result = scenarios[args.scenario](args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
