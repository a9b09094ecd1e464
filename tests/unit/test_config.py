"""Configuration that must be refused with one clear line, and credentials that must never be printed."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from briefs import logs
from briefs.db import ConfigError, _register_password, check_database_url
from briefs.settings import EnvFileError, Settings, env_file, redact_url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("garbage", "is not a URL"),
        ("mysql://u:p@db.example/app", "is a mysql URL; briefs needs PostgreSQL"),
        ("sqlite:///tmp/x.db", "is a sqlite URL"),
        ("postgresql://u:p@h:notaport/db", "cannot be parsed"),
        ("postgresql+asyncpg://h/db", "names the driver 'asyncpg'"),
        ("postgresql://h/db?sslmode=bogus&connect_timeout", "not a valid PostgreSQL URL"),
    ],
)
def test_unusable_database_urls_are_refused_by_name(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")) as err:
        check_database_url(url)
    assert "\n" not in str(err.value)


def test_refusal_never_echoes_the_password() -> None:
    with pytest.raises(ConfigError) as err:
        check_database_url("host=db password=hunter2-secret")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:p@h:5432/db", "postgres://h/db", "postgresql+psycopg://u@h/db?sslmode=require"],
)
def test_postgresql_urls_pass(url: str) -> None:
    assert check_database_url(url) == url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:s3cret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db?password=s3cret&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("postgresql://u@h/db?sslmode=require&PASSWORD=s3cret", "postgresql://u@h/db?sslmode=require&PASSWORD=***"),
        ("host=h user=u password=s3cret dbname=db", "host=h user=u password=*** dbname=db"),
        ("smtp://mailer:s3cret@smtp.example:587", "smtp://mailer:***@smtp.example:587"),
        ("postgresql://u:p%40s3cret@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_every_form_of_credential_is_masked(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_the_database_password_is_a_log_secret() -> None:
    """A password given as ?password= is registered, so it is masked in any log line, URL or not."""
    _register_password("postgresql://u@h/db?password=pw-in-query-7")
    _register_password("postgresql://u:pw%40userinfo-8@h/db")
    stream = io.StringIO()
    logs.setup_logging("text", "INFO", stream=stream)
    logging.getLogger("t").warning("server said: password pw-in-query-7 / pw@userinfo-8 rejected")
    assert "pw-in-query-7" not in stream.getvalue()
    assert "pw@userinfo-8" not in stream.getvalue()


def test_log_level_is_checked() -> None:
    with pytest.raises(ValidationError, match="BRIEFS_LOG_LEVEL must be one of"):
        Settings(_env_file=None, log_level="LOUD")  # type: ignore[call-arg]
    assert Settings(_env_file=None, log_level=" debug ").log_level == "DEBUG"  # type: ignore[call-arg]


# --------------------------------------------------------------------------- the .env file


def test_env_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BRIEFS_MODEL=from-dotenv\n")
    (tmp_path / ".env").chmod(0o600)
    assert env_file({}, tmp_path) == tmp_path / ".env"
    assert Settings(_env_file=env_file({}, tmp_path)).model == "from-dotenv"  # type: ignore[call-arg]


def test_env_file_others_can_write_is_ignored(tmp_path: Path) -> None:
    """A planted .env in a shared folder must not redirect the database or the LLM endpoint."""
    planted = tmp_path / ".env"
    planted.write_text("OPENAI_BASE_URL=http://attacker.example/v1\n")
    planted.chmod(0o666)
    with pytest.warns(UserWarning, match="others can write to it"):
        assert env_file({}, tmp_path) is None


def test_env_file_symlink_is_ignored(tmp_path: Path) -> None:
    target = tmp_path / "real.env"
    target.write_text("BRIEFS_MODEL=x\n")
    target.chmod(0o600)
    (tmp_path / ".env").symlink_to(target)
    with pytest.warns(UserWarning, match="not a regular file"):
        assert env_file({}, tmp_path) is None


def test_env_file_named_explicitly(tmp_path: Path) -> None:
    named = tmp_path / "briefs.env"
    named.write_text("BRIEFS_MODEL=named\n")
    assert env_file({"BRIEFS_ENV_FILE": str(named)}, tmp_path) == named
    assert env_file({"BRIEFS_ENV_FILE": ""}, tmp_path) is None  # empty: no .env at all
    with pytest.raises(EnvFileError, match="is not a file"):
        env_file({"BRIEFS_ENV_FILE": str(tmp_path / "missing.env")}, tmp_path)


# --------------------------------------------------------------------------- numeric settings and the worker id


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # Each of these used to pass validation and fail later, at the first job or at bind():
        # an infinite or 1e308 lease overflowed PostgreSQL's interval/timestamp in the claim,
        # 10**30 slots overflowed the claim's bigint LIMIT, port 99999 raised OverflowError.
        ("BRIEFS_LEASE_SECONDS", "inf"),
        ("BRIEFS_LEASE_SECONDS", "1e308"),
        ("BRIEFS_JOB_TIMEOUT", "-inf"),
        ("BRIEFS_POLL_INTERVAL", "nan"),
        ("BRIEFS_POLL_INTERVAL", "1e-9"),  # an idle worker spun on claim queries (74% of a core)
        ("BRIEFS_SCHEDULER_INTERVAL", "0.000001"),
        ("BRIEFS_RETENTION_DAYS", "inf"),
        ("BRIEFS_RETRY_MAX", "1e300"),
        ("BRIEFS_LOOKAHEAD", "Infinity"),
        ("BRIEFS_LOOKAHEAD", "316224000"),  # ten years: 7,300 occurrences planned per user and tick
        ("BRIEFS_CATCH_UP", "31536000"),
        ("BRIEFS_GENERATION_BUFFER", "604800"),
        ("BRIEFS_WORKER_CONCURRENCY", str(10**30)),
        ("BRIEFS_MAX_ATTEMPTS", str(10**30)),
        ("BRIEFS_DB_POOL_SIZE", str(10**12)),
        ("BRIEFS_MAX_PAYLOAD_BYTES", str(10**12)),
        ("BRIEFS_HEALTH_PORT", "99999"),
        ("BRIEFS_HEALTH_PORT", "-1"),
        ("BRIEFS_WORKER_ID", "w1\nINFO forged log line"),
        ("BRIEFS_WORKER_ID", "w1\x1b[31m"),
        ("BRIEFS_WORKER_ID", "w" * 10_000),
        ("BRIEFS_MODEL", " "),  # every LLM call was a 400, every section fell back
        ("BRIEFS_MODEL", "gpt\n" * 100_000),
    ],
)
def test_unholdable_settings_are_refused_with_their_name(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from briefs.app.cli import main

    monkeypatch.setenv("BRIEFS_ENV_FILE", "")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv(name, value)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    field = name.removeprefix("BRIEFS_").lower()
    assert err.startswith(f"briefs: error: invalid configuration: {field}: ")
    assert err.count("\n") == 1 and "\x1b" not in err and len(err) < 1000


def test_bounded_settings_keep_their_usual_values() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, health_port="0", worker_id="  host-1:42 ", lease_seconds=86400 * 30, retention_days=365
    )
    assert settings.health_port is None
    assert settings.worker_id == "host-1:42"
    assert Settings(_env_file=None, worker_id=" ").worker_id is None  # type: ignore[call-arg]
    assert Settings(_env_file=None, health_port=8080).health_port == 8080  # type: ignore[call-arg]


# --------------------------------------------------------------------------- DATABASE_URL in every form


def test_a_url_without_a_host_keeps_its_slashes() -> None:
    from briefs.db import libpq_url

    # A local socket (or the host in the query) leaves the host part empty; urlunsplit used to
    # drop the '//' and libpq then refused "postgresql:/db?host=…" as an invalid option.
    url = "postgresql:///briefs?host=/run/postgresql&user=app"
    assert check_database_url(url) == url
    assert libpq_url(url) == url
    assert libpq_url("postgres:///briefs") == "postgresql:///briefs"
    assert libpq_url("postgresql+psycopg:///briefs?host=/run/postgresql&user=app") == url


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://u:p w-secret1@h/db", "w-secret1"),
        ("postgresql://u:a%zz-secret2@h/db", "zz-secret2"),
        ("postgresql://h/db?password=a b-secret3", "b-secret3"),
        ("postgresql://h/db?pass%77ord=a%zz-secret4", "zz-secret4"),
        ("postgresql://h/db?sslpassword=x y-secret5", "y-secret5"),
    ],
)
def test_an_unparseable_url_is_refused_without_its_password(url: str, secret: str) -> None:
    # libpq's message quotes the token it could not read: the password, or part of it.
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL") as err:
        check_database_url(url)
    assert secret not in str(err.value)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://u@h/db?sslpassword=ssl-secret-9", "ssl-secret-9"),
        ("postgresql://u@h/db?pass%77ord=pct-secret-10", "pct-secret-10"),
        ("postgresql:///db?host=h&password=nohost-secret-11", "nohost-secret-11"),
    ],
)
def test_every_password_libpq_reads_is_masked(url: str, secret: str) -> None:
    check_database_url(url)  # registers what libpq reads as a password, however the URL spells it
    assert secret not in logs.redact(f"using {url}")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # A CR/LF made the HTTP client refuse to build: every brief job failed, retried until lost.
        ("http://127.0.0.1:1/v1\r\nX-Injected: y", "whitespace or control characters"),
        ("file:///etc/passwd", "not an http(s) URL"),
        ("garbage", "not an http(s) URL"),
        ("http://u:pw-secret-12@h:99999/v1", "Port out of range"),
        ("https:///v1", "no host"),
    ],
)
def test_an_unusable_llm_base_url_is_refused_at_startup(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match="OPENAI_BASE_URL is unusable") as err:
        Settings(_env_file=None, openai_base_url=url)  # type: ignore[call-arg]
    [error] = err.value.errors()
    assert says in error["msg"]
    assert "pw-secret-12" not in error["msg"]  # what `briefs` prints (never the input value)


def test_a_usable_llm_base_url_is_kept() -> None:
    for url in ("https://api.example.com/v1", "http://127.0.0.1:8080/v1", "http://u:p@[::1]:9/v1"):
        assert Settings(_env_file=None, openai_base_url=f" {url} ").openai_base_url == url  # type: ignore[call-arg]
    assert Settings(_env_file=None, openai_base_url="").openai_base_url is None  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        # Each was resolved against the working directory: ../../../../etc made /etc/pgdata, and
        # every process started elsewhere got a database of its own. A newline reached initdb.
        ("../../../../etc", "must be an absolute path"),
        ("data", "must be an absolute path"),
        ("/tmp/a\nb", "contains control characters"),
    ],
)
def test_an_unusable_data_dir_is_refused(value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=f"BRIEFS_DATA_DIR {says}"):
        Settings(_env_file=None, data_dir=value)  # type: ignore[call-arg]


def test_an_empty_data_dir_is_the_default_and_home_is_expanded() -> None:
    default = Settings(_env_file=None).data_dir  # type: ignore[call-arg]
    assert Settings(_env_file=None, data_dir="").data_dir == default  # type: ignore[call-arg]
    assert Settings(_env_file=None, data_dir="~/briefs").data_dir == Path.home() / "briefs"  # type: ignore[call-arg]



@pytest.mark.parametrize("key", ["sk-abc\r\nX-Injected: 1", "sk-ünïcode-secret", "sk abc", "sk-\x1b[31mabc"])
def test_an_api_key_that_cannot_be_a_header_is_refused_unechoed(
    key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: each LLM call failed, stored as "connection: cannot reach the LLM" (CR/LF) or as an
    # internal error with a traceback in the log (non-ASCII).
    from briefs.app.cli import main

    monkeypatch.setenv("BRIEFS_ENV_FILE", "")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("OPENAI_API_KEY", key)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("briefs: error: invalid configuration: OPENAI_API_KEY: ")
    assert "abc" not in err and "secret" not in err


def test_a_blank_api_key_means_no_llm() -> None:
    settings = Settings(_env_file=None, openai_api_key="  ")  # type: ignore[call-arg]
    assert settings.openai_api_key is None and not settings.llm_enabled
    key = Settings(_env_file=None, openai_api_key=" sk-ok_123 ").openai_api_key  # type: ignore[call-arg]
    assert key is not None and key.get_secret_value() == "sk-ok_123"


@pytest.mark.parametrize(
    ("prices", "says"),
    [
        ("{not json", "BRIEFS_LLM_PRICES is not valid JSON"),
        ("[1, 2]", "BRIEFS_LLM_PRICES must be a JSON object"),
        ('{"m": 1}', "'m' must be"),
        ('{"m": {"input": 1}}', "'m' must be"),
        ('{"m": {"input": 1, "output": 2, "cached": 1}}', "'m' must be"),
        ('{"m": {"input": "1", "output": 2}}', "'m' input must be a number"),
        ('{"m": {"input": true, "output": 2}}', "'m' input must be a number"),
        ('{"m": {"input": 1, "output": -2}}', "'m' output must be a finite number"),
        ('{"m": {"input": 1e400, "output": 2}}', "'m' input must be a finite number"),
        ('{"m": {"input": 1, "output": NaN}}', "'m' output must be a finite number"),
        ('{"m": {"input": 10000000000000000000000000000, "output": 2}}', "'m' input must be a finite number"),
        ('{"": {"input": 1, "output": 2}}', "a model name must be"),
        ("{" + ",".join(f'"m{i}": {{"input": 1, "output": 1}}' for i in range(501)) + "}", "at most 500"),
    ],
)
def test_bad_llm_prices_are_refused_on_one_line(prices: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says) as err:
        Settings(_env_file=None, llm_prices=prices)
    message = next(e["msg"] for e in err.value.errors())
    assert "\n" not in message and "BRIEFS_LLM_PRICES" in message


def test_llm_prices_budget_and_currency_are_read() -> None:
    settings = Settings(_env_file=None, llm_prices='{"gpt-x": {"input": 0.15, "output": 0.6}, "free": '
                                                  '{"input": 0, "output": 0}}', llm_daily_budget="2.5")
    assert settings.llm_prices == {"gpt-x": {"input": 0.15, "output": 0.6}, "free": {"input": 0.0, "output": 0.0}}
    assert settings.llm_daily_budget == 2.5 and settings.llm_currency == "USD"
    assert Settings(_env_file=None, llm_daily_budget="").llm_daily_budget is None
    assert Settings(_env_file=None).llm_prices == {}


@pytest.mark.parametrize("budget", ["0", "-1", "inf", "nan", "1e400", "ten"])
def test_bad_daily_budgets_are_refused_by_name(budget: str) -> None:
    with pytest.raises(ValidationError, match="llm_daily_budget"):
        Settings(_env_file=None, llm_daily_budget=budget)


def test_bad_currency_is_refused() -> None:
    with pytest.raises(ValidationError, match="BRIEFS_LLM_CURRENCY"):
        Settings(_env_file=None, llm_currency="a currency name far too long")
