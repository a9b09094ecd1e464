"""Queue benchmarks, run by hand (never by the test suite): ours vs pgqueuer vs procrastinate.

    /work/venv/bin/python bench/queue_bench.py                 # everything, default sizes
    /work/venv/bin/python bench/queue_bench.py --only drain,latency --systems ours --repeat 5

Workloads (same sizes for every system):

- ``drain``    20,000 queued no-op jobs, 10 slots: jobs/s from the worker's start to an empty queue.
- ``sleep``    2,000 jobs that each ``await asyncio.sleep(0.05)``, 50 slots: seconds against the 2.0 s ideal.
- ``latency``  an idle worker (10 slots); 200 jobs enqueued one by one, 20 ms apart, by another process:
               time from the start of the enqueue call to the handler starting (median and p95).
- ``enqueue``  one bulk enqueue of 20,000 jobs (one call, committed): jobs/s.
- ``single``   2,000 jobs enqueued one at a time, each its own call and its own commit: jobs/s.
- ``wakeup``   an idle worker (10 slots, the default 5 s poll interval); 200 jobs scheduled 0.5–5 s ahead:
               lateness ``started_at - run_at``, both written by the database (p50, p99, max). Ours only.
- ``memory``   200,000 no-op jobs, 10 slots: the worker process's RSS before, at its peak and after.

Every measurement runs in a fresh child process: ours with this interpreter, the competitors
with the interpreter of the virtualenv in ``BRIEFS_BENCH_VENV`` (default ``/work/benchvenv``,
made with ``python3 -m venv /work/benchvenv && /work/benchvenv/bin/pip install
'pgqueuer>=1.6,<1.7' 'procrastinate>=3.10,<3.11' asyncpg 'psycopg[binary]' psutil``); a
competitor whose package is missing there is skipped with a message. Each system gets a
database of its own on the server of ``BRIEFS_BENCH_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``): ``briefs_bench``, ``briefs_bench_pgqueuer``,
``briefs_bench_procrastinate``, dropped and created again at the start. The server's settings
are used as they are (``synchronous_commit`` is printed; it should be ``on``). Before each
timed drain the queue table is ANALYZEd, as autovacuum would have done on a live queue.

This file is also the child: ``queue_bench.py child SYSTEM WORKLOAD URL`` prints one JSON line.
It imports a system's package only inside that system's functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
SYSTEMS = ("ours", "pgqueuer", "procrastinate")
WORKLOADS: dict[str, dict[str, Any]] = {
    "drain": {"jobs": 20_000, "slots": 10, "kind": "noop"},
    "sleep": {"jobs": 2_000, "slots": 50, "kind": "sleep"},
    "latency": {"jobs": 200, "slots": 10, "kind": "stamp", "spacing": 0.02},
    "enqueue": {"jobs": 20_000},
    "single": {"jobs": 2_000},
    "wakeup": {"jobs": 200, "slots": 10, "kind": "noop", "ahead": (0.5, 5.0)},
    "memory": {"jobs": 200_000, "slots": 10, "kind": "noop"},
}
SLEEP_SECONDS = 0.05
ENQUEUE_CHUNK = 20_000
# --scale (passed to the children in this variable) shrinks every workload for a quick smoke run.
_SCALE = float(os.environ.get("BRIEFS_BENCH_SCALE", "1"))
for _spec in WORKLOADS.values():
    _spec["jobs"] = max(1, int(_spec["jobs"] * _SCALE))

# --------------------------------------------------------------------------- child: shared helpers

STAMPS: dict[int, float] = {}


class RssSampler:
    """Samples this process's RSS every 0.1 s in a thread (cheap: one /proc read)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self.rss())

    def __enter__(self) -> RssSampler:
        self.start = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = self.rss()
        self.peak = max([self.start, self.end, *self.samples])


async def timed_drain(run: Callable[[], Awaitable[Any]], n: int, memory: bool) -> dict[str, Any]:
    if memory:
        with RssSampler() as rss:
            started = time.perf_counter()
            await run()
            elapsed = time.perf_counter() - started
        mb = 1024 * 1024
        return {"jobs": n, "seconds": elapsed, "rate": n / elapsed, "rss_start_mb": rss.start / mb,
                "rss_peak_mb": rss.peak / mb, "rss_end_mb": rss.end / mb}
    started = time.perf_counter()
    await run()
    elapsed = time.perf_counter() - started
    return {"jobs": n, "seconds": elapsed, "rate": n / elapsed}


async def latency_run(system: str, url: str, spec: dict[str, Any], start_worker: Callable[[], Awaitable[Any]],
                      stop_worker: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """Start an idle worker, let another process enqueue jobs one by one, measure enqueue → handler start."""
    STAMPS.clear()
    worker = asyncio.ensure_future(start_worker())
    await asyncio.sleep(1.5)  # connected, LISTENing, idle
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE), "enqueuer", system, url, str(spec["jobs"]), str(spec["spacing"]),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    enqueued: list[float] = json.loads(out.decode().strip().splitlines()[-1])
    deadline = time.monotonic() + 10
    while len(STAMPS) < len(enqueued) and time.monotonic() < deadline:  # noqa: ASYNC110 (a bench: polling is fine)
        await asyncio.sleep(0.05)
    await stop_worker()
    await asyncio.wait_for(worker, 30)
    lat = sorted((STAMPS[i] - t) * 1000 for i, t in enumerate(enqueued) if i in STAMPS)
    return {"jobs": len(enqueued), "started": len(lat), "median_ms": statistics.median(lat),
            "p95_ms": lat[int(0.95 * (len(lat) - 1))], "max_ms": lat[-1]}


# --------------------------------------------------------------------------- child: ours


def ours_handlers() -> dict[str, Any]:
    from worker.handlers import builtin_handlers
    from worker.runner import Handler

    async def sleep(ctx: Any) -> None:
        await asyncio.sleep(SLEEP_SECONDS)

    async def stamp(ctx: Any) -> None:
        STAMPS[ctx.job.payload["i"]] = time.time()

    return {**builtin_handlers(), "sleep": Handler(sleep), "stamp": Handler(stamp)}


async def ours_enqueue(url: str, kind: str, n: int) -> float:
    import psycopg

    from worker import queue

    async with await psycopg.AsyncConnection.connect(url) as conn:
        started = time.perf_counter()
        for offset in range(0, n, ENQUEUE_CHUNK):
            jobs = [queue.NewJob(kind) for _ in range(min(ENQUEUE_CHUNK, n - offset))]
            await queue.enqueue_many(conn, jobs)
            await conn.commit()
        return time.perf_counter() - started


async def ours_enqueue_one_by_one(url: str, kind: str, n: int) -> float:
    """``n`` enqueues, each its own statement and commit (an autocommit connection, as pgqueuer's asyncpg)."""
    import psycopg

    from worker import queue

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for _ in range(n):
            await queue.enqueue(conn, queue.NewJob(kind))
        return time.perf_counter() - started


async def ours_wakeup(url: str, spec: dict[str, Any], worker: Any) -> dict[str, Any]:
    """An idle worker; jobs scheduled ahead (run_at from the database's clock); lateness measured in the database."""
    import random

    import psycopg

    from worker import queue

    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(1.5)  # connected, LISTENing, idle
    low, high = spec["ahead"]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT clock_timestamp()")
        (now,) = await cur.fetchone()  # type: ignore[misc]
        jobs = [queue.NewJob(spec["kind"], run_at=now + timedelta(seconds=random.uniform(low, high)))
                for _ in range(spec["jobs"])]
        await queue.enqueue_many(conn, jobs)
        deadline = time.monotonic() + high + 15
        while time.monotonic() < deadline:
            cur = await conn.execute("SELECT count(*) FROM queue_jobs WHERE started_at IS NULL")
            (left,) = await cur.fetchone()  # type: ignore[misc]
            if left == 0:
                break
            await asyncio.sleep(0.2)
        cur = await conn.execute("SELECT extract(epoch FROM started_at - run_at)::float8 * 1000 FROM queue_jobs"
                                 " WHERE started_at IS NOT NULL ORDER BY 1")
        late = [ms for (ms,) in await cur.fetchall()]
    worker.stop()
    await asyncio.wait_for(run, 30)
    if not late:
        return {"jobs": spec["jobs"], "started": 0}
    return {"jobs": spec["jobs"], "started": len(late), "p50_ms": statistics.median(late),
            "p99_ms": late[int(0.99 * (len(late) - 1))], "max_ms": late[-1], "min_ms": late[0]}


async def ours_child(workload: str, url: str) -> dict[str, Any]:
    import logging

    import psycopg

    from briefs.db import Database
    from briefs.migrate import migrate_url
    from briefs.settings import Settings
    from worker.runner import Worker

    logging.basicConfig(level=logging.WARNING)
    spec = WORKLOADS[workload]
    await migrate_url(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("TRUNCATE queue_jobs")
    if workload == "enqueue":
        elapsed = await ours_enqueue(url, "noop", spec["jobs"])
        return {"jobs": spec["jobs"], "seconds": elapsed, "rate": spec["jobs"] / elapsed}
    if workload == "single":
        elapsed = await ours_enqueue_one_by_one(url, "noop", spec["jobs"])
        return {"jobs": spec["jobs"], "seconds": elapsed, "rate": spec["jobs"] / elapsed}
    settings = Settings(_env_file=None, database_url=url, log_level="WARNING")  # type: ignore[call-arg]
    db = await Database.connect(settings)
    try:
        if workload == "latency":
            worker = Worker(db, settings, ours_handlers(), concurrency=spec["slots"])

            async def stop() -> None:
                worker.stop()

            return await latency_run("ours", url, spec, worker.run, stop)
        if workload == "wakeup":
            return await ours_wakeup(url, spec, Worker(db, settings, ours_handlers(), concurrency=spec["slots"]))
        await ours_enqueue(url, spec["kind"], spec["jobs"])
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("ANALYZE queue_jobs")
        worker = Worker(db, settings, ours_handlers(), concurrency=spec["slots"], burst=True)
        result = await timed_drain(worker.run, spec["jobs"], memory=workload == "memory")
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT status, count(*) FROM queue_jobs GROUP BY status")
            result["statuses"] = dict(await cur.fetchall())  # type: ignore[arg-type]
        return result
    finally:
        await db.dispose()


async def ours_enqueuer(url: str, n: int, spacing: float) -> list[float]:
    import psycopg

    from worker import queue

    times = []
    async with await psycopg.AsyncConnection.connect(url) as conn:
        for i in range(n):
            t = time.time()
            await queue.enqueue(conn, queue.NewJob("stamp", {"i": i}))
            await conn.commit()
            times.append(t)
            await asyncio.sleep(spacing)
    return times


# --------------------------------------------------------------------------- child: pgqueuer


async def pgqueuer_setup(url: str, fresh: bool) -> Any:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(url)
    queries = Queries(AsyncpgDriver(conn))
    if fresh:
        if await queries.schema_is_installed():
            await queries.uninstall()
        await queries.install()
    return conn, queries


async def pgqueuer_enqueue(queries: Any, kind: str, n: int, payload: bytes | None = None) -> float:
    started = time.perf_counter()
    for offset in range(0, n, ENQUEUE_CHUNK):
        size = min(ENQUEUE_CHUNK, n - offset)
        await queries.enqueue([kind] * size, [payload] * size, [0] * size)
    return time.perf_counter() - started


def pgqueuer_manager(conn: Any) -> Any:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager

    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        return None

    @qm.entrypoint("sleep")
    async def sleep(job: Any) -> None:
        await asyncio.sleep(SLEEP_SECONDS)

    @qm.entrypoint("stamp")
    async def stamp(job: Any) -> None:
        STAMPS[json.loads(job.payload)["i"]] = time.time()

    return qm


async def pgqueuer_child(workload: str, url: str) -> dict[str, Any]:
    import asyncpg
    from pgqueuer.domain.types import QueueExecutionMode

    spec = WORKLOADS[workload]
    if workload == "wakeup":
        return {"error": "not measured for this system"}
    conn, queries = await pgqueuer_setup(url, fresh=True)
    try:
        if workload == "enqueue":
            elapsed = await pgqueuer_enqueue(queries, "noop", spec["jobs"])
            return {"jobs": spec["jobs"], "seconds": elapsed, "rate": spec["jobs"] / elapsed}
        if workload == "single":
            started = time.perf_counter()
            for _ in range(spec["jobs"]):
                await queries.enqueue("noop", None, 0)
            elapsed = time.perf_counter() - started
            return {"jobs": spec["jobs"], "seconds": elapsed, "rate": spec["jobs"] / elapsed}
        worker_conn = await asyncpg.connect(url)
        qm = pgqueuer_manager(worker_conn)
        # Same number of slots as ours: at most `slots` jobs picked at once (it requires batch <= slots / 2).
        slots = spec["slots"]
        run_kw = {"batch_size": max(1, slots // 2), "max_concurrent_tasks": slots}
        if workload == "latency":
            async def stop() -> None:
                qm.shutdown.set()

            return await latency_run("pgqueuer", url, spec, lambda: qm.run(**run_kw), stop)
        await pgqueuer_enqueue(queries, spec["kind"], spec["jobs"])
        await conn.execute("ANALYZE")
        result = await timed_drain(lambda: qm.run(mode=QueueExecutionMode.drain, **run_kw), spec["jobs"],
                                   memory=workload == "memory")
        result["left_in_queue"] = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        return result
    finally:
        await conn.close()


async def pgqueuer_enqueuer(url: str, n: int, spacing: float) -> list[float]:
    conn, queries = await pgqueuer_setup(url, fresh=False)
    times = []
    for i in range(n):
        t = time.time()
        await queries.enqueue("stamp", json.dumps({"i": i}).encode())
        times.append(t)
        await asyncio.sleep(spacing)
    await conn.close()
    return times


# --------------------------------------------------------------------------- child: procrastinate


def procrastinate_app(url: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="sleep")
    async def sleep() -> None:
        await asyncio.sleep(SLEEP_SECONDS)

    @app.task(name="stamp")
    async def stamp(i: int) -> None:
        STAMPS[i] = time.time()

    return app


async def procrastinate_enqueue(app: Any, kind: str, n: int) -> float:
    task = app.tasks[kind]
    started = time.perf_counter()
    for offset in range(0, n, ENQUEUE_CHUNK):
        await task.batch_defer_async(*[{} for _ in range(min(ENQUEUE_CHUNK, n - offset))])
    return time.perf_counter() - started


async def procrastinate_child(workload: str, url: str) -> dict[str, Any]:
    import psycopg

    spec = WORKLOADS[workload]
    if workload == "wakeup":
        return {"error": "not measured for this system"}
    app = procrastinate_app(url)
    async with app.open_async():
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
            installed = (await cur.fetchone())[0]  # type: ignore[index]
        if not installed:
            await app.schema_manager.apply_schema_async()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("TRUNCATE procrastinate_jobs CASCADE")
        if workload == "enqueue":
            elapsed = await procrastinate_enqueue(app, "noop", spec["jobs"])
            return {"jobs": spec["jobs"], "seconds": elapsed, "rate": spec["jobs"] / elapsed}
        if workload == "single":
            started = time.perf_counter()
            for _ in range(spec["jobs"]):
                await app.tasks["noop"].defer_async()
            elapsed = time.perf_counter() - started
            return {"jobs": spec["jobs"], "seconds": elapsed, "rate": spec["jobs"] / elapsed}
        worker_kw = {"concurrency": spec["slots"], "install_signal_handlers": False}
        if workload == "latency":
            async def stop() -> None:
                worker.cancel()  # procrastinate's documented way to stop an async worker

            worker = asyncio.ensure_future(app.run_worker_async(wait=True, **worker_kw))

            async def wait_worker() -> None:
                try:
                    await worker
                except asyncio.CancelledError:
                    pass

            return await latency_run("procrastinate", url, spec, wait_worker, stop)
        await procrastinate_enqueue(app, spec["kind"], spec["jobs"])
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("ANALYZE procrastinate_jobs")
        result = await timed_drain(lambda: app.run_worker_async(wait=False, **worker_kw), spec["jobs"],
                                   memory=workload == "memory")
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY status")
            result["statuses"] = dict(await cur.fetchall())  # type: ignore[arg-type]
        return result


async def procrastinate_enqueuer(url: str, n: int, spacing: float) -> list[float]:
    app = procrastinate_app(url)
    times = []
    async with app.open_async():
        task = app.tasks["stamp"]
        for i in range(n):
            t = time.time()
            await task.defer_async(i=i)
            times.append(t)
            await asyncio.sleep(spacing)
    return times


CHILDREN = {"ours": ours_child, "pgqueuer": pgqueuer_child, "procrastinate": procrastinate_child}
ENQUEUERS = {"ours": ours_enqueuer, "pgqueuer": pgqueuer_enqueuer, "procrastinate": procrastinate_enqueuer}

# --------------------------------------------------------------------------- driver


def with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def db_name(system: str) -> str:
    return "briefs_bench" if system == "ours" else f"briefs_bench_{system}"


def python_for(system: str) -> str | None:
    if system == "ours":
        return sys.executable
    venv = Path(os.environ.get("BRIEFS_BENCH_VENV", "/work/benchvenv"))
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", f"import {system}, psutil"], capture_output=True)
    return str(python) if probe.returncode == 0 else None


def run_child(python: str, system: str, workload: str, url: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO) if system == "ours" else ""}
    proc = subprocess.run(
        [python, str(HERE), "child", system, workload, url], capture_output=True, text=True, env=env, timeout=1800
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def summarize(workload: str, runs: list[dict[str, Any]]) -> str:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return f"error: {runs[-1]['error']}"
    if workload in ("drain", "enqueue", "single"):
        rates = sorted(r["rate"] for r in ok)
        extra = ""
        if workload == "drain" and ok[-1].get("statuses"):
            extra = f"  (statuses {ok[-1]['statuses']})"
        return f"{statistics.median(rates):,.0f} jobs/s median, best {rates[-1]:,.0f} ({len(ok)} runs){extra}"
    if workload == "sleep":
        secs = sorted(r["seconds"] for r in ok)
        ideal = WORKLOADS["sleep"]["jobs"] / WORKLOADS["sleep"]["slots"] * SLEEP_SECONDS
        med = statistics.median(secs)
        return f"{med:.3f} s median ({(med / ideal - 1) * 100:+.1f} % vs {ideal:.1f} s ideal), best {secs[0]:.3f} s"
    if workload == "latency":
        med = statistics.median(r["median_ms"] for r in ok)
        p95 = statistics.median(r["p95_ms"] for r in ok)
        started = min(r["started"] for r in ok)
        return f"median {med:.2f} ms, p95 {p95:.2f} ms ({started}/{ok[0]['jobs']} started)"
    if workload == "wakeup":
        ok = [r for r in ok if r["started"]]
        if not ok:
            return "error: no job started"
        return (f"lateness p50 {statistics.median(r['p50_ms'] for r in ok):.1f} ms, "
                f"p99 {statistics.median(r['p99_ms'] for r in ok):.1f} ms, max {max(r['max_ms'] for r in ok):.1f} ms "
                f"(medians of {len(ok)} runs; {min(r['started'] for r in ok)}/{ok[0]['jobs']} started)")
    if workload == "memory":
        r = ok[-1]
        return (f"RSS start {r['rss_start_mb']:.1f} MB, peak {r['rss_peak_mb']:.1f} MB, end {r['rss_end_mb']:.1f} MB "
                f"(+{r['rss_end_mb'] - r['rss_start_mb']:.1f} MB) at {r['rate']:,.0f} jobs/s")
    return json.dumps(ok)


def driver(args: argparse.Namespace) -> int:
    import psycopg

    server = os.environ.get("BRIEFS_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.only.split(",") if w]
    with psycopg.connect(server, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
    print(f"# PostgreSQL {version}, synchronous_commit={sync}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    pythons: dict[str, str] = {}
    for system in systems:
        python = python_for(system)
        if python is None:
            print(f"# {system}: skipped (not installed in {os.environ.get('BRIEFS_BENCH_VENV', '/work/benchvenv')};"
                  " see the module docstring)")
            continue
        pythons[system] = python
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name(system)}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{db_name(system)}"')
    results: dict[tuple[str, str], str] = {}
    for workload in workloads:
        repeat = 1 if workload == "memory" else args.repeat
        for system in pythons:
            if workload == "memory" and system != "ours" and not args.memory_competitors:
                continue
            runs = []
            for _ in range(repeat):
                runs.append(run_child(pythons[system], system, workload, with_db(server, db_name(system))))
                if args.verbose:
                    print(f"  {workload:8} {system:14} {runs[-1]}", flush=True)
            results[(workload, system)] = summarize(workload, runs)
            print(f"{workload:8} {system:14} {results[(workload, system)]}", flush=True)
    print("\n| workload | " + " | ".join(pythons) + " |")
    print("|---|" + "---|" * len(pythons))
    for workload in workloads:
        print(f"| {workload} | " + " | ".join(results.get((workload, s), "-") for s in pythons) + " |")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        system, workload, url = sys.argv[2:5]
        print(json.dumps(asyncio.run(CHILDREN[system](workload, url))), flush=True)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "enqueuer":
        system, url, n, spacing = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
        print(json.dumps(asyncio.run(ENQUEUERS[system](url, n, spacing))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: ours,pgqueuer,procrastinate")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and system (memory: 1)")
    parser.add_argument("--memory-competitors", action="store_true", help="run the 200k memory drain for all")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every workload's size (smoke runs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = parser.parse_args()
    os.environ["BRIEFS_BENCH_SCALE"] = str(args.scale * _SCALE)
    if args.scale != 1.0:
        for spec in WORKLOADS.values():
            spec["jobs"] = max(1, int(spec["jobs"] * args.scale))
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
