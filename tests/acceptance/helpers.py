"""Real worker processes for acceptance tests: start, signal, wait, read their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[2]


def clean_env(database_url: str, **settings: object) -> dict[str, str]:
    """The environment of a child process: this one without briefs/database settings, plus ``settings``.

    ``settings`` keys are BRIEFS_* names without the prefix, e.g. ``LEASE_SECONDS=2``.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BRIEFS_", "OPENAI_", "PG")) and k not in {"DATABASE_URL"}
    }
    env.update(
        DATABASE_URL=database_url,
        BRIEFS_DATA_DIR=tempfile.gettempdir(),
        BRIEFS_WEB_PORT="0",  # `briefs run`/`briefs web` take any free port: tests never fight over 8000
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update({f"BRIEFS_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class WorkerProcess:
    """``python -m worker`` in a child process; its stderr goes to a file (read it with :meth:`log`)."""

    def __init__(self, database_url: str, *args: str, **settings: object) -> None:
        values: dict[str, object] = {
            "HANDLER_MODULES": "tests.handlers_for_tests",
            "LOG_LEVEL": "INFO",  # the tests read the worker's log
            "POLL_INTERVAL": 0.5,
            "DB_POOL_SIZE": 4,
            "RETRY_BASE": 0.05,
            "RETRY_MAX": 0.5,
        }
        values.update(settings)
        self._log = tempfile.NamedTemporaryFile(prefix="briefs-worker-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            cwd=REPO,
            env=clean_env(database_url, **values),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 30.0) -> None:
        self.wait_until(lambda: "started:" in self.log() or self.proc.poll() is not None, timeout, "worker start")
        assert self.proc.poll() is None, f"worker exited early ({self.proc.returncode}):\n{self.log()}"

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str, **options: Any) -> Any:
        """:func:`tests.polling.wait_for`; a failure also tells whether this worker still runs, and its log's end."""
        try:
            return wait_for(condition, timeout, what, **options)
        except AssertionError as exc:
            state = "running" if self.proc.poll() is None else f"exited ({self.proc.returncode})"
            raise AssertionError(f"{exc}\nworker {self.pid} {state}; its log ends:\n{self.log()[-3000:]}") from None

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.pid} still running after {timeout}s:\n{self.log()[-3000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, application_name="test-admin") as conn:
        return conn.execute(sql, params).fetchall()


def scalar(url: str, sql: str, params: Any = None) -> Any:
    rows = query(url, sql, params)
    return rows[0][0] if rows else None


def briefs_command(database_url: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the ``briefs`` CLI (the console script next to this Python) and capture its output."""
    script = Path(sys.executable).with_name("briefs")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "briefs"]
    return subprocess.run(
        [*cmd, *args],
        cwd=REPO,
        env=clean_env(database_url),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
