"""The newcomer's path: `briefs run --demo` on an embedded database, a brief appears, SIGTERM exits 0."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIEFS_", "DATABASE_URL", "OPENAI_"))}
    env.update({"BRIEFS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "BRIEFS_SCHEDULER_INTERVAL": "5",
                "BRIEFS_WEB_PORT": "0"})
    return env


def _briefs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "briefs", *args], env=env, capture_output=True, text=True, timeout=120
    )


def _run_demo(env: dict[str, str]) -> str:
    """`briefs run --demo` until it has printed a brief, then SIGTERM; returns what it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "briefs", "run", "--demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not sel.select(timeout=1):
                assert proc.poll() is None, "".join(output)
                continue
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("demo: that was"):
                break
        text = "".join(output)
        assert "===== brief for user 1" in text, text

        shown = _briefs(env, "show", "1")
        assert shown.returncode == 0, shown.stderr
        assert "Website relaunch" in shown.stdout
        _see_it_in_the_console(text)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, "".join(output) + (proc.stdout.read() or "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return text


def _see_it_in_the_console(text: str) -> None:
    """The console the demo printed serves the brief it made: one-click login, the viewer, the API."""
    login = re.search(r"^console: (http://127\.0\.0\.1:\d+)(/login\?token=\S+)", text, re.M)
    assert login, text
    base, path = login.groups()
    brief = re.search(r"In the console: \S+/users/1/briefs/(\d{4}-\d\d-\d\d)\.", text)
    assert brief, text
    day = brief.group(1)
    with httpx.Client(base_url=base, timeout=20, follow_redirects=True) as client:
        assert client.get(path).status_code == 200
        assert client.get(f"/users/1/briefs/{day}").status_code == 200
        api = client.get(f"/api/v1/users/1/briefs/{day}")
        assert api.status_code == 200 and api.json()["status"] in ("completed", "partial"), api.text
        assert "Website relaunch" in client.get(f"/api/v1/users/1/briefs/{day}/email.html").text


def test_run_demo_makes_a_brief_and_stops_cleanly(tmp_path: Path) -> None:
    env = _env(tmp_path / "data")
    first = _run_demo(env)
    assert "a minute from now" in first

    jobs = _briefs(env, "jobs", "--status", "processing")
    assert jobs.returncode == 0, jobs.stderr
    assert jobs.stdout.strip() == "no jobs"

    # Run it again the same day: today's brief exists and the scheduler will not make it twice.
    # The demo says so, makes a fresh one at once, and prints it (it used to wait forever).
    second = _run_demo(env)
    assert "already has today's brief" in second and "a fresh one is being made now" in second, second
    assert second.count("===== brief for user 1") == 1
    if shutil.which("psql"):  # psql is optional; when it is here, `briefs psql` reaches the embedded server
        sql = "SELECT metadata->>'revision' FROM daily_briefs WHERE user_id = 1"
        revision = _briefs(env, "psql", "-At", "-c", sql)
        assert (revision.returncode, revision.stdout.split()) == (0, ["2"]), revision
