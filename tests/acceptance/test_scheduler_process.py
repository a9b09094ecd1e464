"""Real scheduler processes: `python -m scheduler` ticks and exits 0 on SIGTERM; two `briefs schedule --once`
at the same moment make each job once; an unmigrated database is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.conftest import SchedulerSeed

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


def test_python_m_scheduler_ticks_and_stops_on_sigterm(clean_db: str, tmp_path: Path) -> None:
    seed = SchedulerSeed(clean_db)
    try:
        uid = seed.user("UTC", _soon())
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler"],
            env=_env(clean_db, tmp_path, BRIEFS_SCHEDULER_INTERVAL="1"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not seed.jobs(uid):
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "no job appeared"
                time.sleep(0.1)
            time.sleep(1.5)  # let it tick again (deduplicated)
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=20)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, output
        assert "scheduler stopped" in output
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
    cmd = [sys.executable, "-m", "briefs.cli", "schedule", "--once", "--now", "2026-03-10T07:30:00Z", "--json"]
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
    base = [sys.executable, "-m", "briefs.cli", "schedule", "--once"]
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
