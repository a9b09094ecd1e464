"""Real scheduler processes: `python -m scheduler` ticks and exits 0 on SIGTERM; two `briefs schedule --once`
at the same moment make each job once; an unmigrated database is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.conftest import SchedulerSeed
from tests.polling import wait_for

pytestmark = pytest.mark.slow


def _env(database_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIEFS_", "DATABASE_URL", "OPENAI_"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "BRIEFS_DATA_DIR": str(tmp_path / "data"),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


def _soon() -> str:
    return (datetime.now(UTC) + timedelta(minutes=10)).strftime("%H:%M")


# The line the daemon logs after every tick that ran (a tick skipped for the lock logs another one).
_TICK_LINE = re.compile(r"tick at \S+: (?P<users>\d+) users, (?P<new>\d+) enqueued, (?P<queued>\d+) already queued")


def _ticks(proc: subprocess.Popen[bytes], log: Path) -> list[dict[str, int]]:
    """The ticks the running scheduler's log reports so far: users seen, jobs enqueued, jobs already queued."""
    exited = proc.poll() is not None
    text = log.read_text(errors="replace")
    if exited:
        raise AssertionError(f"the scheduler exited ({proc.returncode}):\n{text}")
    return [{k: int(v) for k, v in m.groupdict().items()} for m in _TICK_LINE.finditer(text)]


def test_python_m_scheduler_ticks_and_stops_on_sigterm(clean_db: str, tmp_path: Path) -> None:
    seed = SchedulerSeed(clean_db)
    log = tmp_path / "scheduler.log"
    try:
        uid = seed.user("UTC", _soon())
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler"],
                env=_env(clean_db, tmp_path, BRIEFS_SCHEDULER_INTERVAL="1", BRIEFS_LOG_LEVEL="INFO"),
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            # Two ticks, counted from the log: the one at start enqueues the job, the next finds it queued.
            first, *later = wait_for(lambda: _ticks(proc, log), 30, "two scheduler ticks",
                                     accept=lambda seen: len(seen) >= 2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = log.read_text()
        assert proc.returncode == 0, output
        assert "scheduler stopped" in output
        assert first == {"users": 1, "new": 1, "queued": 0}, output
        assert later and all(t == {"users": 1, "new": 0, "queued": 1} for t in later), output
        [job] = seed.jobs(uid)
        assert job["status"] == "pending" and job["payload"]["source"] == "scheduler"
    finally:
        seed.close()


def test_two_processes_at_the_same_moment(clean_db: str, tmp_path: Path) -> None:
    seed = SchedulerSeed(clean_db)
    try:
        seed.many(3000, ["UTC", "Europe/London", "Africa/Abidjan"], "08:00")
    finally:
        seed.close()
    cmd = [sys.executable, "-m", "briefs", "schedule", "--once", "--now", "2026-03-10T07:30:00Z", "--json"]
    env = _env(clean_db, tmp_path)
    procs = [
        subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    assert sum(len(r["enqueued"]) for r in reports) == 3000
    with psycopg.connect(clean_db) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT dedup_key) FROM queue_jobs").fetchone()
    assert row == (3000, 3000)


def test_dry_run_cli_and_bad_now(clean_db: str, tmp_path: Path) -> None:
    seed = SchedulerSeed(clean_db)
    try:
        seed.user("UTC", "08:00")
        seed.user("Not/A_Zone", "08:00")
    finally:
        seed.close()
    env = _env(clean_db, tmp_path)
    base = [sys.executable, "-m", "briefs", "schedule", "--once"]
    done = subprocess.run(
        [*base, "--now", "2026-03-10T07:30:00Z", "--dry-run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "dry run" in done.stdout and "enqueued 1" in done.stdout and "invalid_timezone 1" in done.stdout
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT count(*) FROM queue_jobs").fetchone() == (0,)
    bad = subprocess.run(
        [*base, "--now", "yesterday"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_scheduler_refuses_an_unmigrated_database(pg_server_url: str, tmp_path: Path) -> None:
    name = f"briefs_sched_empty_{os.getpid()}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = urlunsplit(urlsplit(pg_server_url)._replace(path="/" + name))
        done = subprocess.run(
            [sys.executable, "-m", "scheduler"],
            env=_env(url, tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "briefs migrate" in done.stderr
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
