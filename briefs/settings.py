"""Settings: the only place environment variables are read.

Standard names (``DATABASE_URL``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``) keep
their usual spelling; everything else is ``BRIEFS_*``. A ``.env`` file is read too
(see :func:`env_file`: ``BRIEFS_ENV_FILE``, or a ``.env`` in the working directory
that only its owner can write); it may set exactly these variables, nothing else
(unknown names are ignored). Durations are in seconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Bounds every numeric setting is held to, so that no value reaches PostgreSQL (intervals,
# timestamps, int and bigint columns, LIMIT) or asyncio as something they cannot hold:
# inf, NaN and 1e308 are refused with the setting's name instead of failing at the first job.
MAX_SECONDS = 10 * 366 * 86400.0  # any duration: ten years
MIN_INTERVAL = 0.01  # a loop's period: 1e-9 made an idle worker spin on claim queries (74% of a core)
MAX_COUNT = 100_000  # slots, pool connections, concurrency, items in a brief
MAX_WORKER_ID_CHARS = 200
MIN_ADMIN_TOKEN_CHARS = 16
MAX_PRICED_MODELS = 500  # models in BRIEFS_LLM_PRICES
MAX_PRICE = 1e12  # any price per million tokens, and the daily budget


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("briefs"))


ENV_FILE_VARIABLE = "BRIEFS_ENV_FILE"


class EnvFileError(ValueError):
    """The .env file the operator named cannot be used (the message says why)."""


def env_file(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The ``.env`` file to read, or None.

    ``BRIEFS_ENV_FILE`` names it explicitly (it must exist; empty means none). Otherwise
    ``.env`` in the working directory is read only when it is a regular file of this
    user's (or root's) that nobody else can write: a stray or planted ``.env`` in a
    shared folder (``/tmp``) must not redirect the database or the LLM endpoint.
    """
    environ = os.environ if environ is None else environ
    named = environ.get(ENV_FILE_VARIABLE)
    if named is not None:
        if not named.strip():
            return None
        path = Path(named).expanduser()
        if not path.is_file():
            raise EnvFileError(f"{ENV_FILE_VARIABLE}={named!r} is not a file")
        return path
    path = (cwd or Path.cwd()) / ".env"
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        _ignored(path, "it is not a regular file")
        return None
    if info.st_uid not in (os.getuid(), 0):
        _ignored(path, "another user owns it")
        return None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        _ignored(path, "others can write to it")
        return None
    return path


def _ignored(path: Path, why: str) -> None:
    warnings.warn(f"ignoring {path}: {why} (name the file with {ENV_FILE_VARIABLE} to use it)", stacklevel=3)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIEFS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        allow_inf_nan=False,
    )

    # Standard names.
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(default=None, validation_alias=AliasChoices("OPENAI_BASE_URL"))

    # Storage and database.
    data_dir: Path = Field(default_factory=_default_data_dir)
    db_pool_size: int = Field(default=10, ge=1, le=MAX_COUNT)

    # LLM.
    model: str = "gpt-4o-mini"
    llm_timeout: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    llm_max_retries: int = Field(default=4, ge=0, le=MAX_COUNT)
    llm_concurrency: int = Field(default=8, ge=1, le=MAX_COUNT)
    llm_brief_concurrency: int = Field(default=4, ge=1, le=MAX_COUNT)
    # The provider's limits for the whole deployment (0 = unlimited): each worker process paces itself at its
    # share, the limit over workers_expected, and the scheduler plans the briefs' starts by them.
    llm_rpm: int = Field(default=0, ge=0, le=1_000_000)  # requests per minute
    llm_tpm: int = Field(default=0, ge=0, le=1_000_000_000)  # tokens (prompt and completion) per minute
    workers_expected: int = Field(default=1, ge=1, le=MAX_COUNT)  # worker processes sharing the LLM limits
    # Cost accounting: model -> {"input": price, "output": price} per million tokens (JSON); a model
    # missing from it has its tokens counted and its cost reported as unknown (never 0).
    llm_prices: Annotated[dict[str, dict[str, float]], NoDecode] = Field(default_factory=dict)
    llm_currency: str = "USD"  # the prices' and the budget's currency (a label)
    llm_daily_budget: float | None = Field(default=None, gt=0, le=MAX_PRICE)  # per UTC day; unset: no limit

    # Worker.
    worker_concurrency: int = Field(default=10, ge=1, le=MAX_COUNT)
    worker_id: str | None = None
    poll_interval: float = Field(default=5.0, ge=MIN_INTERVAL, le=MAX_SECONDS)
    lease_seconds: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    shutdown_grace: float = Field(default=25.0, ge=0, le=MAX_SECONDS)
    job_timeout: float = Field(default=600.0, gt=0, le=MAX_SECONDS)
    max_attempts: int = Field(default=5, ge=1, le=MAX_COUNT)
    retry_base: float = Field(default=5.0, gt=0, le=MAX_SECONDS)
    retry_max: float = Field(default=3600.0, gt=0, le=MAX_SECONDS)
    retention_days: float = Field(default=7.0, ge=0, le=MAX_SECONDS / 86400)
    handler_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Scheduler.
    scheduler_interval: float = Field(default=300.0, ge=MIN_INTERVAL, le=MAX_SECONDS)
    scheduler_page_size: int = Field(default=1000, ge=1, le=MAX_COUNT)
    # The tick plans every occurrence in its window for each user on a page: ten years of lookahead
    # was 7,300 occurrences a user (2.5 s and 130 MB for five users). Days are plenty.
    # Two hours and ten minutes: a brief is seen at least max_lead (2 h) ahead with five-minute ticks.
    lookahead: float = Field(default=7800.0, gt=0, le=2 * 86400.0)
    catch_up: float = Field(default=6 * 3600.0, ge=0, le=7 * 86400.0)  # as far back as `briefs enqueue --date` goes
    generation_buffer: float = Field(default=300.0, ge=0, le=86400.0)
    # Capacity-aware starts (scheduler/capacity.py): each brief starts as late as the LLM capacity allows for
    # it to be done by its notify_at, at least generation_buffer and at most max_lead ahead (and never before
    # the tick sees it: lookahead - scheduler_interval ahead). Off: every brief starts generation_buffer ahead.
    capacity_planning: bool = True
    max_lead: float = Field(default=7200.0, ge=0, le=86400.0)
    capacity_margin: float = Field(default=0.8, ge=0.05, le=1.0)  # the share of the LLM capacity planned on
    # What one LLM call takes until briefs have measured it (the last hour's briefs, when there are any).
    llm_call_seconds: float = Field(default=5.0, gt=0, le=600.0)
    llm_tokens_per_call: int = Field(default=2000, ge=1, le=10_000_000)

    # Limits on what one job, one brief and one prompt may hold (hostile or just huge data).
    # a job's JSON payload, checked at enqueue
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # projects in one brief; the rest summarised as a count
    brief_max_projects: int = Field(default=50, ge=1, le=MAX_COUNT)
    brief_max_tasks: int = Field(default=25, ge=1, le=MAX_COUNT)  # tasks per bucket (today, overdue, …) of one project
    # characters of any one title, name, description or note
    brief_max_text: int = Field(default=500, ge=20, le=1_000_000)
    prompt_max_chars: int = Field(default=32_000, ge=2_000, le=10_000_000)  # characters of one LLM prompt
    # characters of one stored brief's Markdown
    brief_max_chars: int = Field(default=200_000, ge=10_000, le=100_000_000)

    # Email.
    smtp_url: SecretStr | None = None
    smtp_allow_insecure: bool = False  # allow a password over plain SMTP (a local relay only)
    email_from: str = "briefs@localhost"
    public_url: str | None = None
    secret_key: SecretStr | None = None  # signs unsubscribe links; email is refused without it (demo aside)

    # Operations.
    health_port: int | None = Field(default=None, ge=1, le=65535)
    health_host: str = "0.0.0.0"  # all interfaces: what Procfile platforms route $PORT to
    log_format: str = "text"
    log_level: str = "INFO"

    # The console and HTTP API (``briefs web``, ``briefs run``).
    admin_token: SecretStr | None = None  # unset: a random one per process, and 127.0.0.1 only
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8000, ge=0, le=65535)  # 0: any free port (printed at start)
    metrics_public: bool = False  # /metrics without the admin token (for a scraper inside the network)

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        value = value.lower()
        if value not in {"text", "json"}:
            raise ValueError("BRIEFS_LOG_FORMAT must be 'text' or 'json'")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value not in LOG_LEVELS:
            raise ValueError(f"BRIEFS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        return value

    @field_validator("handler_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, value: object) -> object:
        # Empty means the default. A relative path would name a different directory (and so a
        # different embedded database) for each working directory a process starts in.
        if isinstance(value, str) and not value.strip():
            return _default_data_dir()
        if isinstance(value, str | Path):
            text = str(value)
            if any(not c.isprintable() for c in text):
                raise ValueError("BRIEFS_DATA_DIR contains control characters")
            if not Path(text).expanduser().is_absolute():
                raise ValueError("BRIEFS_DATA_DIR must be an absolute path (or start with ~)")
            return Path(text).expanduser()
        return value

    @field_validator("openai_api_key")
    @classmethod
    def _openai_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        # It goes into an HTTP header: with a newline every call failed as "cannot reach the LLM",
        # with a non-ASCII character as an internal error with a traceback. Never echoed.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if not key:
            return None
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise ValueError("OPENAI_API_KEY must be one token of printable ASCII characters (no spaces or newlines)")
        return SecretStr(key)

    @field_validator("openai_base_url")
    @classmethod
    def _openai_base_url(cls, value: str | None) -> str | None:
        # Checked here, once: a URL the HTTP client cannot even build (a CR/LF, file://) used to fail
        # every brief job at the LLM client's construction, retried until the job was lost.
        if value is None or not value.strip():
            return None
        value = value.strip()
        if any(c.isspace() or not c.isprintable() for c in value):
            problem: str | None = "it contains whitespace or control characters"
        else:
            problem = http_url_problem(value)
        if problem:
            raise ValueError(f"OPENAI_BASE_URL is unusable ({problem}); expected e.g. https://api.openai.com/v1")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        # Sent in every LLM request and shown in its errors: an empty one failed every call (a 400
        # per section, all falling back), a huge one was repeated in every log line about them.
        value = value.strip()
        if not value or len(value) > 200 or not value.isprintable():
            raise ValueError("BRIEFS_MODEL must be a model name: 1 to 200 printable characters on one line")
        return value

    @field_validator("llm_prices", mode="before")
    @classmethod
    def _llm_prices(cls, value: object) -> object:
        return parse_prices(value)

    @field_validator("llm_currency")
    @classmethod
    def _llm_currency(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 10 or not value.isprintable():
            raise ValueError("BRIEFS_LLM_CURRENCY must be a short label: 1 to 10 printable characters (e.g. USD)")
        return value

    @field_validator("llm_daily_budget", mode="before")
    @classmethod
    def _llm_daily_budget(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, value: str | None) -> str | None:
        # It goes into every log line and queue_jobs.locked_by: one short printable line.
        if value is None or not value.strip():
            return None
        value = value.strip()
        if len(value) > MAX_WORKER_ID_CHARS or not value.isprintable():
            raise ValueError(
                f"BRIEFS_WORKER_ID must be one line of at most {MAX_WORKER_ID_CHARS} printable characters"
            )
        return value

    @field_validator("admin_token")
    @classmethod
    def _admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Compared with what browsers and curl send in a header: printable ASCII, one token, and long
        # enough that guessing it is hopeless. Never echoed.
        if value is None:
            return None
        token = value.get_secret_value().strip()
        if not token:
            return None
        if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
            raise ValueError("BRIEFS_ADMIN_TOKEN must be one token of printable ASCII characters (no spaces)")
        if not MIN_ADMIN_TOKEN_CHARS <= len(token) <= 1024:
            raise ValueError(
                f"BRIEFS_ADMIN_TOKEN must be {MIN_ADMIN_TOKEN_CHARS} to 1024 characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return SecretStr(token)

    @field_validator("health_port", mode="before")
    @classmethod
    def _empty_port(cls, value: object) -> object:
        return None if value in ("", "0", 0) else value

    def __init__(self, **values: Any) -> None:
        # The .env file is chosen per construction (see env_file), not fixed at import.
        if "_env_file" not in values:
            values["_env_file"] = env_file()
        super().__init__(**values)

    @cached_property
    def llm_enabled(self) -> bool:
        return bool(self.openai_api_key and self.openai_api_key.get_secret_value())


def parse_prices(value: object) -> dict[str, dict[str, float]]:
    """``BRIEFS_LLM_PRICES``: a JSON object (or a dict) of model name -> {"input": n, "output": n}, the price
    per million prompt and completion tokens: finite numbers >= 0. A ValueError says what is wrong, on one line."""
    name = "BRIEFS_LLM_PRICES"
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f'{name} is not valid JSON; expected e.g. {{"gpt-4o-mini": {{"input": 0.15, '
                             f'"output": 0.6}}}}') from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of model name -> {{\"input\": n, \"output\": n}}")
    if len(value) > MAX_PRICED_MODELS:
        raise ValueError(f"{name} prices {len(value)} models; at most {MAX_PRICED_MODELS}")
    prices: dict[str, dict[str, float]] = {}
    for model, price in value.items():
        if not isinstance(model, str) or not model.strip() or len(model) > 200 or not model.isprintable():
            raise ValueError(f"{name}: a model name must be 1 to 200 printable characters")
        if not isinstance(price, dict) or set(price) != {"input", "output"}:
            raise ValueError(f'{name}: {model[:80]!r} must be {{"input": n, "output": n}} (per million tokens)')
        prices[model.strip()] = {part: _price(price[part], f"{name}: {model[:80]!r} {part}") for part in price}
    return prices


def _price(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number")
    number = float(value) if not isinstance(value, int) or abs(value) <= MAX_PRICE else math.inf
    if not math.isfinite(number) or number < 0 or number > MAX_PRICE:
        raise ValueError(f"{where} must be a finite number from 0 to {MAX_PRICE:g}")
    return number


_SECRET_PARAM = re.compile(
    r"((?:^|[?&;\s])(?:sslpassword|password|passwd|pass|pwd|secret|token|api_key|apikey)=)([^&;\s]*)", re.I
)


def http_url_problem(value: str) -> str | None:
    """Why ``value`` is not a usable http(s) URL with a host (a bad port included), or None."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return str(exc)
    if parts.scheme.lower() not in ("http", "https"):
        return "not an http(s) URL"
    if not parts.hostname:
        return "no host"
    return None


def redact_url(url: str) -> str:
    """A URL (or libpq keyword conninfo) with every credential masked, safe for logs and error messages.

    Masks the password of ``user:password@host`` and the value of ``password=`` (and
    similar names) in the query string or in ``key=value`` conninfo. Linear in the input.
    """
    text = _SECRET_PARAM.sub(r"\1***", url)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" not in netloc:
        return text
    userinfo, host = netloc.rsplit("@", 1)
    if ":" not in userinfo:
        return text
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)
