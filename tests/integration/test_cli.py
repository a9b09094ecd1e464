"""The `briefs` command as an operator meets it: one error line, never a traceback or silence.

Commands run in-process through ``briefs.app.cli.main`` against the session's real database
(or a fresh, unmigrated one); the broken-pipe case runs a real process with a real pipe.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Jsonb

from briefs.app.cli import main
from tests.acceptance.helpers import clean_env
from tests.conftest import BriefSeed, _with_dbname

HOSTILE = "\x1b[2J\x1b[H\x1b]0;owned\x07\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\\x9b31m\x07\r\u202egnp.exe\u202c"


class Cli:
    def __init__(self, capsys: Any, monkeypatch: Any, url: str) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.url(url)

    def url(self, url: str) -> None:
        self.monkeypatch.setenv("DATABASE_URL", url)

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(clean_db: str, capsys: Any, monkeypatch: Any) -> Iterator[Cli]:
    root = logging.getLogger()  # the CLI sets up logging; give the session its handlers back afterwards
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in list(os.environ):
        if name.startswith(("BRIEFS_", "OPENAI_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir("/")  # no .env
    yield Cli(capsys, monkeypatch, clean_db)


@pytest.fixture
def seed(clean_db: str) -> Iterator[BriefSeed]:
    s = BriefSeed(clean_db)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def empty_database(pg_server_url: str) -> Iterator[str]:
    """A database nobody migrated."""
    name = f"briefs_unmigrated_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(pg_server_url, name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("briefs: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _brief(url: str, user_id: int, day: date, markdown: str, **columns: Any) -> int:
    values = {"status": "completed", "summary_markdown": markdown, "completed_at": datetime.now(UTC), **columns}
    if "metadata" in values:
        values["metadata"] = Jsonb(values["metadata"])
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            f"INSERT INTO daily_briefs (user_id, brief_date, {names}) VALUES (%s, %s, {marks}) RETURNING id",
            (user_id, day, *values.values()),
        ).fetchone()
    assert row is not None
    return int(row[0])


# --------------------------------------------------------------------------- one line, saying what to do


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["jobs"],
        ["show", "1"],
        ["schedule", "--once", "--dry-run"],
        ["enqueue", "1"],
        ["enqueue", "--all"],
        ["retry", "--failed"],
        ["cancel", "1"],
    ],
)
def test_an_unmigrated_database_says_run_migrate(cli: Cli, empty_database: str, args: list[str]) -> None:
    cli.url(empty_database)
    code, out, err = cli(*args)
    assert code == 1 and out == ""
    assert "run `briefs migrate`" in _one_error_line(err)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"DATABASE_URL": "garbage"}, "DATABASE_URL is not a URL"),
        ({"DATABASE_URL": "mysql://app:pw-mysql-1@db/app"}, "mysql URL; briefs needs PostgreSQL"),
        ({"BRIEFS_LOG_LEVEL": "LOUD"}, "BRIEFS_LOG_LEVEL"),
    ],
)
def test_bad_configuration_is_one_line(cli: Cli, env: dict[str, str], says: str) -> None:
    for name, value in env.items():
        cli.monkeypatch.setenv(name, value)
    for command in (["migrate"], ["status"], ["show", "1"]):
        code, _, err = cli(*command)
        line = _one_error_line(err)
        assert code in (1, 2) and says in line
        assert "pw-mysql-1" not in line


def test_bad_arguments_are_refused_before_any_database(cli: Cli, monkeypatch: Any) -> None:
    cli.url("postgresql://nobody@127.0.0.1:1/none")  # would fail as 'database unavailable' if it were reached
    for args in (
        ["enqueue", "1", "--date", "yesterday"],
        ["enqueue", "--all", "--date", "2026-01-01"],
        ["enqueue", "--all", "--resend-email"],
        ["show", "1", "--date", "2026-13-01"],
        ["schedule", "--once", "--now", "noon"],
        ["schedule"],
    ):
        code, _, err = cli(*args)
        assert code == 2, args
        assert "unavailable" not in _one_error_line(err)
    for args in (["show", "99999999999999999999"], ["jobs", "--limit", "0"], ["status", "--bogus"], []):
        cli.capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        assert "--help`" in _one_error_line(cli.capsys.readouterr().err)  # one line, no usage block


def test_show_says_whether_the_user_exists(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    code, _, err = cli("show", "999999")
    assert code == 1 and _one_error_line(err) == "briefs: error: no user with id 999999"

    uid = seed.user("Ada")
    code, _, err = cli("show", str(uid))
    assert code == 1
    assert _one_error_line(err) == f"briefs: error: user {uid} has no brief yet; queue one with `briefs enqueue {uid}`"

    _brief(clean_db, uid, date(2026, 11, 20), "# hello")
    code, _, err = cli("show", str(uid), "--date", "2026-11-21")
    assert code == 1 and "the latest is 2026-11-20" in _one_error_line(err)
    assert cli("show", str(uid)) == (0, "# hello\n", "")


def test_an_unexpected_error_is_one_line_with_a_hint(cli: Cli, monkeypatch: Any) -> None:
    import briefs.app.cli

    async def broken(*args: Any) -> str:
        raise RuntimeError("postgresql://app:pw-unexpected-9@db/x went sideways\nsecond line")

    monkeypatch.setattr(briefs.app.cli, "show_brief", broken)
    code, _, err = cli("show", "1")
    line = _one_error_line(err)
    assert code == 1
    assert line.startswith("briefs: error: unexpected RuntimeError: postgresql://app:***@db/x went sideways")
    assert "BRIEFS_LOG_LEVEL=DEBUG" in line and "pw-unexpected-9" not in line

    monkeypatch.setenv("BRIEFS_LOG_LEVEL", "DEBUG")
    code, _, err = cli("show", "1")
    assert code == 1 and "Traceback" in err and "pw-unexpected-9" not in err  # asked for: the traceback, redacted


def test_a_closed_pipe_ends_quietly(clean_db: str, seed: BriefSeed) -> None:
    uid = seed.user("Pipe")
    _brief(clean_db, uid, date(2026, 11, 20), "line of a long brief\n" * 100_000)  # far more than a pipe buffer
    proc = subprocess.Popen(
        [sys.executable, "-m", "briefs", "show", str(uid)],
        env=clean_env(clean_db),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"line of a long brief\n"
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert err == "", err  # no traceback, no "database unavailable", no error line
    assert code == 1


# --------------------------------------------------------------------------- hostile text never drives the terminal


def test_show_strips_terminal_control_sequences(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    uid = seed.user("Esc")
    _brief(clean_db, uid, date(2026, 11, 20), f"# Brief\n\n- task {HOSTILE} done\n\tindented\n")
    code, out, _ = cli("show", str(uid))
    assert code == 0
    assert out == "# Brief\n\n- task clickgnp.exe done\n\tindented\n\n"


def test_jobs_print_hostile_errors_on_one_clean_line(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    uid = seed.user("Jobs")
    error = f"boom {HOSTILE}\nsecond line " + "x" * 5000
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO queue_jobs (job_type, payload, status, user_id, last_error, finished_at)
               VALUES ('noop', '{}', 'failed', %s, %s, now())""",
            (uid, error),
        )
    code, out, _ = cli("jobs")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3  # header, rule, one job
    assert "boom clickgnp.exe second line" in lines[2]
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F or c in "\u202e\u202c" for c in out.replace("\n", ""))

    code, out, _ = cli("jobs", "--json")
    [job] = json.loads(out)
    assert code == 0 and job["user_id"] == uid and job["status"] == "failed"
    assert job["last_error"].startswith(f"boom {HOSTILE}\nsecond line")  # the facts, escaped by JSON
    assert "\x1b" not in out

    code, out, _ = cli("status")
    assert code == 0 and "failures in the last hour: 1" in out


# --------------------------------------------------------------------------- LLM health in `briefs status`


def test_jobs_and_status_show_instants_python_cannot_hold(cli: Cli, clean_db: str) -> None:
    """A run_at of 'infinity' or past year 9999 (a hostile row) is shown as text, not a crash of the command."""
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO queue_jobs (job_type, run_at) VALUES
               ('noop', 'infinity'), ('noop', '-infinity'), ('noop', '10000-01-01 00:00:00+00')"""
        )
    code, out, err = cli("jobs")
    assert code == 0, err
    assert "infinity" in out and "-infinity" in out and "10000" in out
    code, out, err = cli("status")
    assert code == 0, err
    assert "noop" in out


def _section(url: str, brief_id: int, project_id: int, metadata: dict[str, Any], error: str | None = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, content_markdown, error, metadata)
               VALUES (%s, %s, 'completed', 'text', %s, %s)""",
            (brief_id, project_id, error, Jsonb(metadata)),
        )


def test_status_reports_a_wrong_api_key(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    """Every call a 401: the briefs are `partial`, the jobs `completed`, and status says why."""
    now = datetime.now(UTC)
    auth = {"source": "fallback", "error": "Error code: 401 - bad key", "error_kind": "auth", "http_status": 401}
    for n in range(2):
        uid = seed.user(f"U{n}")
        project = seed.project(uid, "Atlas")
        brief = _brief(
            clean_db,
            uid,
            date(2026, 11, 20),
            "# partial",
            status="partial",
            completed_at=now - timedelta(minutes=10 + n),
            metadata={
                "llm": "enabled",
                "summary_source": "fallback",
                "summary_error": "LLM request failed: 401",
                "summary_error_kind": "auth",
                "llm_requests": 2,
                "llm_failures": 2,
            },
        )
        _section(clean_db, brief, project, auth, error=auth["error"])
    # outside the hour, and hostile metadata: neither counts nor breaks the report
    old = seed.user("Old")
    _brief(clean_db, old, date(2026, 11, 20), "# old", completed_at=now - timedelta(hours=3),
           metadata={"llm": "enabled", "llm_requests": 50, "llm_failures": 50, "summary_source": "fallback"})
    odd = seed.user("Odd")
    _brief(clean_db, odd, date(2026, 11, 20), "# odd", completed_at=now - timedelta(minutes=30),
           metadata={"llm": "enabled", "llm_requests": "lots", "llm_failures": [1], "summary_source": "llm"})
    odder = seed.user("Odder")
    odd_brief = _brief(clean_db, odder, date(2026, 11, 20), "# odder", completed_at=now - timedelta(minutes=40),
                       metadata=["not", "an", "object"])
    _section(clean_db, odd_brief, seed.project(odder, "Odd"), "a string")  # type: ignore[arg-type]

    code, out, _ = cli("status")
    assert code == 0
    assert "LLM, last hour: 4 brief(s), 4 call(s), 4 failed" in out
    assert "errors by kind: auth 4" in out
    assert "fell back to deterministic text: 2 of 4 brief(s) (50%)" in out
    assert "last error: 401: check OPENAI_API_KEY" in out

    code, out, _ = cli("status", "--json")
    llm = json.loads(out)["llm"]
    assert code == 0
    assert (llm["briefs"], llm["calls"], llm["failed_calls"], llm["fell_back"]) == (4, 4, 4, 2)
    assert llm["errors_by_kind"] == {"auth": 4} and llm["fell_back_share"] == 0.5
    assert llm["last_error"]["hint"] == "401: check OPENAI_API_KEY" and llm["last_error"]["http_status"] == 401
    assert json.loads(out)["queue"] == [] and json.loads(out)["failures_last_hour"] == 0


def test_status_without_an_llm_says_so(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    uid = seed.user("Plain")
    meta = {"llm": "disabled", "summary_source": "deterministic"}
    _brief(clean_db, uid, date(2026, 11, 20), "# plain", metadata=meta)
    code, out, _ = cli("status")
    assert code == 0 and "LLM, last hour: disabled (no OPENAI_API_KEY); 1 deterministic brief(s)" in out


def test_status_reports_todays_and_this_months_llm_cost(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    first_of_month = month_start + timedelta(seconds=1)
    uid = seed.user("Spender")
    _brief(clean_db, uid, date(2026, 11, 1), "# a", prompt_tokens=1000, completion_tokens=100, cost=Decimal("0.25"))
    _brief(clean_db, uid, date(2026, 11, 2), "# b", prompt_tokens=10, completion_tokens=1, cost=Decimal("0.5"),
           completed_at=first_of_month)
    _brief(clean_db, uid, date(2026, 11, 3), "# c", prompt_tokens=7, completion_tokens=7, cost=Decimal("9"),
           completed_at=month_start - timedelta(seconds=1))  # last month: counts nowhere
    _brief(clean_db, uid, date(2026, 11, 4), "# d", cost=None)  # no tokens, no cost: nothing unknown
    in_today = first_of_month.date() == now.date()
    cli.monkeypatch.setenv("BRIEFS_LLM_DAILY_BUDGET", "1")
    cli.monkeypatch.setenv("BRIEFS_LLM_CURRENCY", "EUR")

    code, out, _ = cli("status", "--json")
    cost = json.loads(out)["llm_cost"]
    assert code == 0 and cost["currency"] == "EUR" and cost["daily_budget"] == 1
    today, month = cost["today"], cost["month"]
    assert today["day"] == now.date().isoformat() and month["month"] == now.strftime("%Y-%m")
    assert (month["briefs"], month["prompt_tokens"], month["completion_tokens"], month["cost"]) == (3, 1010, 101, 0.75)
    expected = 0.75 if in_today else 0.25
    assert today["cost"] == expected and today["prompt_tokens"] == (1010 if in_today else 1000)
    assert today["remaining"] == 1 - expected and today["budget_reached"] is False
    code, out, _ = cli("status")
    assert "LLM cost (UTC):" in out and f"today ({today['day']}): " in out
    assert f"this month ({month['month']}): 1,010 prompt + 101 completion tokens, 0.7500 EUR" in out
    assert f"daily budget: 1 EUR, {1 - expected:.4f} EUR left" in out

    # A brief of a model without a price: its tokens count, the cost is unknown (never 0).
    _brief(clean_db, uid, date(2026, 11, 5), "# e", prompt_tokens=5, completion_tokens=5, cost=None)
    _brief(clean_db, uid, date(2026, 11, 6), "# f", prompt_tokens=1, completion_tokens=1, cost=Decimal("0.5"))
    code, out, _ = cli("status", "--json")
    today = json.loads(out)["llm_cost"]["today"]
    assert today["cost"] is None and today["unpriced_briefs"] == 1 and today["priced_cost"] == expected + 0.5
    assert today["budget_reached"] is (expected + 0.5 >= 1)
    code, out, _ = cli("status")
    assert "unknown (1 brief(s) of a model without a price;" in out


# --------------------------------------------------------------------------- enqueue: date range, resend


def test_enqueue_date_is_bounded_unless_forced(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    uid = seed.user("Aki", tz="Asia/Tokyo")
    today = datetime.now(ZoneInfo("Asia/Tokyo")).date()
    for day in (date(1900, 1, 1), today - timedelta(days=8), today + timedelta(days=2)):
        code, _, err = cli("enqueue", str(uid), "--date", day.isoformat())
        assert code == 1 and "pass --force" in _one_error_line(err)
    for day in (today - timedelta(days=7), today + timedelta(days=1)):
        code, out, _ = cli("enqueue", str(uid), "--date", day.isoformat())
        assert code == 0 and out.startswith("queued job "), out
    code, out, _ = cli("enqueue", str(uid), "--date", "1900-01-01", "--force")
    assert code == 0 and "brief date 1900-01-01" in out


def test_enqueue_resend_email_is_in_the_payload(cli: Cli, seed: BriefSeed, clean_db: str) -> None:
    uid = seed.user("Mail")
    other = seed.user("Quiet")
    code, out, _ = cli("enqueue", str(uid), "--resend-email")
    assert code == 0 and out.strip().endswith("(forced; the email is sent again)")
    assert cli("enqueue", str(other), "--force")[0] == 0
    with psycopg.connect(clean_db) as conn:
        payloads = dict(conn.execute("SELECT user_id, payload FROM queue_jobs").fetchall())
    assert payloads[uid]["force"] is True and payloads[uid]["resend_email"] is True
    assert payloads[other]["force"] is True and payloads[other]["resend_email"] is False


def test_enqueue_all_reports_skipped_users(cli: Cli, seed: BriefSeed) -> None:
    good = seed.user("Good", tz="Europe/Paris")
    long_tz = seed.user("Long", tz="A" * 60_000)
    escaped = seed.user("Esc", tz="\x1b]0;x\x07Bad/Zone")
    code, out, err = cli("enqueue", "--all")
    assert code == 0, err
    assert out.startswith("queued 1 brief job(s); 0 already queued or finished; skipped 2 user(s)")
    assert f"user {long_tz}: timezone 'AAAA" in out and f"user {escaped}: timezone '\\x1b]0;x\\x07Bad/Zone'" in out
    assert "\x1b" not in out and "File name too long" not in out + err
    assert f"user {good}:" not in out


# --------------------------------------------------------------------------- dsn and psql


def test_dsn_masks_the_password_unless_asked(cli: Cli) -> None:
    cli.url("postgresql://app:pw-dsn-42@db.internal:5433/briefs?sslmode=require")
    code, out, _ = cli("dsn")
    assert code == 0 and out.strip() == "postgresql://app:***@db.internal:5433/briefs?sslmode=require"
    code, out, _ = cli("dsn", "--show-password")
    assert code == 0 and out.strip() == "postgresql://app:pw-dsn-42@db.internal:5433/briefs?sslmode=require"


def test_psql_opens_the_database_in_use(seed: BriefSeed, clean_db: str) -> None:
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed here")
    seed.user("Counted")
    proc = subprocess.run(
        [sys.executable, "-m", "briefs", "psql", "-At", "-c", "SELECT count(*) FROM users"],
        env=clean_env(clean_db),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "1", "")


def test_psql_missing_is_one_line(cli: Cli, monkeypatch: Any) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, err = cli("psql")
    assert code == 2 and "psql is not installed" in _one_error_line(err)


def test_the_demo_signs_email_without_configuration(caplog: Any) -> None:
    from briefs import logs
    from briefs.app.cli import demo_settings
    from tests.conftest import make_settings

    bare = make_settings("postgresql://h/db", secret_key=None)
    with caplog.at_level(logging.DEBUG, logger="briefs"):
        demo = demo_settings(bare)
    assert bare.secret_key is None and demo.secret_key is not None
    key = demo.secret_key.get_secret_value()
    assert len(key) >= 32 and logs.redact(f"key {key}") == "key ***"  # never logged
    assert demo_settings(make_settings("postgresql://h/db", secret_key=None)).secret_key != demo.secret_key
    assert any("BRIEFS_SECRET_KEY is unset" in r.getMessage() for r in caplog.records)
    configured = make_settings("postgresql://h/db", secret_key="operator-key-0123456789")
    assert demo_settings(configured) is configured


def test_status_shows_the_last_ticks_capacity_plan_and_its_overloads(cli: Cli, clean_db: str) -> None:
    code, out, _ = cli("status")
    assert code == 0 and "LLM capacity: no scheduler tick logged yet" in out
    message = ("2026-12-02 07:00 America/New_York: 3,000 briefs need 15,000 calls (30,000,000 tokens); at 2,400 "
               "calls/min they need 6.2 min; starting 06:00, the last expected 1.5 min late")
    capacity = {"briefs": 3000, "started_earlier": 2400, "expected_late": 120, "calls_per_minute": 3000.0,
                "concurrency": 64, "request_seconds": 1.2, "request_seconds_measured": True,
                "overloads": [{"notify_at": "2026-12-02T12:00:00Z", "message": message + "\x1b[2J"}]}
    with psycopg.connect(clean_db, autocommit=True) as conn:
        for user_id, report in ((None, {"capacity": capacity}), (7, {"capacity": None})):  # a one-user tick last
            conn.execute("INSERT INTO scheduler_ticks (tick_at, ok, user_id, report) VALUES (now(), true, %s, %s)",
                         (user_id, Jsonb(report)))
    code, out, _ = cli("status")
    assert code == 0
    assert "brief(s) in the window, 2,400 started earlier, 120 expected late" in out
    assert "planned at 3,000 calls/min, 64 in flight, 1.2 s a request (measured)" in out
    assert f"  ! {message}" in out and "\x1b" not in out
    code, out, _ = cli("status", "--json")
    planned = json.loads(out)["llm_capacity"]
    assert planned["capacity"]["expected_late"] == 120 and planned["tick_at"] is not None
