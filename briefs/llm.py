"""The LLM client: JSON-schema replies from an OpenAI-compatible chat-completions API.

``LLMClient.complete(messages, Schema)`` sends the conversation with
``response_format={"type": "json_object"}``, tells the model which JSON schema
to follow, and returns the reply validated as ``Schema`` together with token
usage. Retries are done here, not in the SDK (which is built with
``max_retries=0``), so backoff, ``Retry-After`` handling, logging and metrics
are under our control.

Limits are process-wide: every ``LLMClient`` in a process shares one
``asyncio.Semaphore(settings.llm_concurrency)`` and, when ``settings.llm_rpm > 0``,
one requests-per-minute token bucket (one of each per event loop, because asyncio
primitives are bound to the loop that first waits on them).

Errors are ``LLMError``; ``permanent`` tells the caller whether trying the same
request later can help. Messages never contain the API key.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import random
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import openai
from pydantic import BaseModel, Field, ValidationError

from briefs import metrics
from briefs.settings import Settings, redact_url

if TYPE_CHECKING:
    import httpx2  # the openai SDK's HTTP client

__all__ = [
    "DEFAULT_BASE_URL",
    "ExecutiveSummary",
    "LLMClient",
    "LLMError",
    "LLMResult",
    "ProjectBrief",
    "TokenBucket",
    "concurrency_limiter",
    "parse_retry_after",
    "rate_limiter",
    "reset_stats",
    "stats",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_CAP = 20.0
RETRY_AFTER_CAP = 60.0

T = TypeVar("T", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# Reply schemas
# ---------------------------------------------------------------------------------------------


class ProjectBrief(BaseModel):
    """One project's section of a brief."""

    summary: str = Field(min_length=1, max_length=2000)
    highlights: list[str] = Field(default_factory=list, max_length=10)
    risks: list[str] = Field(default_factory=list, max_length=10)
    next_steps: list[str] = Field(default_factory=list, max_length=10)


class ExecutiveSummary(BaseModel):
    """The top of a brief, across all of a user's projects."""

    summary: str = Field(min_length=1, max_length=4000)
    priority_actions: list[str] = Field(default_factory=list, max_length=10)


# ---------------------------------------------------------------------------------------------
# Errors, results, metrics
# ---------------------------------------------------------------------------------------------


class LLMError(Exception):
    """A completion that failed.

    ``permanent`` is True when retrying the same request cannot help: the API rejected
    it (4xx other than 408/409/429), the reply still failed validation after all
    retries, or the client is disabled. ``status`` is the last HTTP status, if any.
    """

    def __init__(self, message: str, *, permanent: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.status = status

    def __repr__(self) -> str:
        return f"LLMError({self.message!r}, permanent={self.permanent}, status={self.status})"


@dataclass
class LLMResult(Generic[T]):
    value: T  # the validated reply
    prompt_tokens: int  # summed over every attempt that reported usage
    completion_tokens: int
    model: str  # as reported by the API (falls back to the requested model)
    attempts: int  # HTTP requests made, 1 = no retry
    latency: float  # seconds from the call to the result, waits included


# Process-wide counters; a later change exports them to Prometheus.
stats: dict[str, int] = {}


def reset_stats() -> None:
    stats.clear()
    stats.update(
        calls=0,  # complete() invocations
        requests=0,  # HTTP attempts
        retries=0,
        successes=0,
        errors=0,  # complete() invocations that raised LLMError
        prompt_tokens=0,
        completion_tokens=0,
    )


reset_stats()


# ---------------------------------------------------------------------------------------------
# Process-wide limits
# ---------------------------------------------------------------------------------------------


class TokenBucket:
    """An async token bucket: ``capacity`` tokens, refilled at ``rate`` tokens per second."""

    def __init__(self, capacity: float, rate: float) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError("TokenBucket needs capacity >= 1 and rate > 0")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()  # waiters are served in arrival order

    @classmethod
    def per_minute(cls, rpm: int) -> TokenBucket:
        return cls(capacity=rpm, rate=rpm / 60.0)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self) -> None:
        async with self._lock:
            self._refill()
            while self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1


# loop -> {("sem", n) | ("rpm", n): primitive}. Weak so closed loops (e.g. one per test) go away.
_Registry = dict[tuple[str, int], Any]
_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Registry] = weakref.WeakKeyDictionary()


def _loop_limits() -> _Registry:
    loop = asyncio.get_running_loop()
    registry = _limits.get(loop)
    if registry is None:
        registry = _limits[loop] = {}
    return registry


def concurrency_limiter(limit: int) -> asyncio.Semaphore:
    """The process-wide semaphore for ``limit`` concurrent requests on the running loop."""
    registry = _loop_limits()
    key = ("sem", limit)
    if key not in registry:
        registry[key] = asyncio.Semaphore(limit)
    return registry[key]


def rate_limiter(rpm: int) -> TokenBucket | None:
    """The process-wide requests-per-minute bucket on the running loop; None when ``rpm`` is 0."""
    if rpm <= 0:
        return None
    registry = _loop_limits()
    key = ("rpm", rpm)
    if key not in registry:
        registry[key] = TokenBucket.per_minute(rpm)
    return registry[key]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

_SK_RE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-*]+")
_FENCE_RE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_RETRYABLE_4XX = frozenset({408, 409, 429})


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _strip_fences(text: str) -> str:
    match = _FENCE_RE.match(text)
    return match.group(1) if match else text


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())) or "<root>"
    return f"{where}: {error.get('msg')}"


def _usage(completion: Any) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a response; zeros when it reported none."""
    usage = getattr(completion, "usage", None)
    prompt = getattr(usage, "prompt_tokens", None)
    done = getattr(usage, "completion_tokens", None)
    return (prompt if isinstance(prompt, int) else 0, done if isinstance(done, int) else 0)


class _Malformed(Exception):
    """The API answered, but not with a usable reply."""


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _instructions(schema: type[BaseModel]) -> str:
    """The JSON reply instructions for a schema (built once: the JSON schema is costly to compute)."""
    return (
        "Reply with one JSON object and nothing else: no prose, no code fences.\n"
        f"JSON schema name: {schema.__name__}\n"
        f"JSON schema: {json.dumps(schema.model_json_schema(), separators=(',', ':'))}"
    )


class LLMClient:
    """JSON-schema completions with retries and process-wide limits.

    ``http_client`` is passed to the SDK; this SDK version (openai 3.x) is built on
    ``httpx2``, so it must be an ``httpx2.AsyncClient`` (a legacy ``httpx.AsyncClient``
    is accepted only if ``httpx`` is installed). A client passed in is not closed by
    :meth:`aclose`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http_client: httpx2.AsyncClient | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self.settings = settings
        self.enabled: bool = settings.llm_enabled
        self.model: str = settings.model
        self.max_retries = settings.llm_max_retries
        self.timeout = settings.llm_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        key = settings.openai_api_key
        self._key = key.get_secret_value() if self.enabled and key is not None else ""
        self._owns_http = http_client is None
        self._openai: openai.AsyncOpenAI | None = None
        if self.enabled:
            # Everything explicit: with api_key/base_url None the SDK would read OPENAI_API_KEY /
            # OPENAI_BASE_URL from the environment behind Settings' back.
            self._openai = openai.AsyncOpenAI(
                api_key=self._key,
                base_url=settings.openai_base_url or DEFAULT_BASE_URL,
                timeout=settings.llm_timeout,
                max_retries=0,
                http_client=http_client,
            )

    def __repr__(self) -> str:
        return f"LLMClient(model={self.model!r}, enabled={self.enabled})"

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        client, self._openai = self._openai, None
        if client is not None and self._owns_http:
            await client.close()

    # -- public -------------------------------------------------------------------------------

    async def complete(
        self, messages: list[dict[str, Any]], schema: type[T], *, purpose: str = "brief"
    ) -> LLMResult[T]:
        """Send ``messages`` and return the reply validated as ``schema``.

        Raises :class:`LLMError`; ``permanent`` says whether a later retry could help.
        """
        stats["calls"] += 1
        started = time.monotonic()
        try:
            result = await self._complete(messages, schema, purpose)
        except LLMError as exc:
            stats["errors"] += 1
            metrics.LLM_ERRORS.labels(purpose, "permanent" if exc.permanent else "transient").inc()
            raise
        finally:
            metrics.LLM_LATENCY.labels(purpose).observe(time.monotonic() - started)
        stats["successes"] += 1
        return result

    # -- internals -------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return _SK_RE.sub(r"\1***", text)

    def build_messages(self, messages: list[dict[str, Any]], schema: type[BaseModel]) -> list[dict[str, Any]]:
        """``messages`` with the JSON instructions appended to the (last) system message."""
        instructions = _instructions(schema)
        out = [dict(m) for m in messages]
        for message in reversed(out):
            if message.get("role") == "system" and isinstance(message.get("content"), str):
                message["content"] = f"{message['content'].rstrip()}\n\n{instructions}"
                break
        else:
            out.insert(0, {"role": "system", "content": instructions})
        return out

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** (attempt - 1)))
        delay = random.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        return delay

    async def _send(self, messages: list[dict[str, Any]], purpose: str) -> Any:
        assert self._openai is not None
        bucket = rate_limiter(self.settings.llm_rpm)
        async with concurrency_limiter(self.settings.llm_concurrency):
            # The rate token is taken once a slot is held, so the pace is that of requests actually sent.
            if bucket is not None:
                await bucket.acquire()
            stats["requests"] += 1
            metrics.LLM_CALLS.labels(purpose).inc()
            # The SDK's timeout applies per phase (connect, each read...); this bounds the whole
            # request so a server trickling bytes cannot hold a slot forever.
            async with asyncio.timeout(self.timeout * 2 + 1):
                return await self._openai.chat.completions.create(
                    model=self.model,
                    messages=messages,  # type: ignore[arg-type]
                    response_format={"type": "json_object"},
                )

    def _parse(self, completion: Any, schema: type[T]) -> T:
        choices = getattr(completion, "choices", None)
        if not choices:
            raise _Malformed(f"no choices in response ({type(completion).__name__})")
        choice = choices[0]
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str) or not content.strip():
            refusal = getattr(message, "refusal", None)
            if refusal:
                raise _Malformed(f"model refused: {_short(str(refusal))}")
            raise _Malformed("empty message content")
        finish = getattr(choice, "finish_reason", None)
        text = _strip_fences(content)
        try:
            return schema.model_validate_json(text)
        except ValidationError as err:
            errors = err.errors(include_url=False, include_input=False)
            if errors and errors[0].get("type") == "json_invalid":
                cut = " (finish_reason=length)" if finish == "length" else ""
                raise _Malformed(f"content is not valid JSON{cut}: {_short(text, 80)!r}") from None
            detail = "; ".join(_describe(e) for e in errors[:3])
            raise _Malformed(f"does not match {schema.__name__}: {detail}") from None

    async def _complete(self, messages: list[dict[str, Any]], schema: type[T], purpose: str) -> LLMResult[T]:
        if not self.enabled:
            raise LLMError("LLM disabled: no API key (set OPENAI_API_KEY)", permanent=True)
        if self._openai is None:
            raise LLMError("LLM client is closed", permanent=True)

        request = self.build_messages(messages, schema)
        started = time.monotonic()
        prompt_tokens = completion_tokens = 0
        attempts_allowed = self.max_retries + 1
        problem = ""
        malformed = False
        status: int | None = None

        for attempt in range(1, attempts_allowed + 1):
            retry_after: float | None = None
            malformed = False
            status = None
            try:
                completion = await self._send(request, purpose)
            except openai.APIStatusError as err:
                status = err.status_code
                if self._is_permanent(err):
                    raise LLMError(self._rejected_message(err), permanent=True, status=status) from None
                retry_after = parse_retry_after(err.response.headers)
                problem = _status_text(status)
            except openai.APITimeoutError:
                problem = f"timed out after {self.timeout:g}s"
            except TimeoutError:
                problem = f"no complete response within {self.timeout * 2 + 1:g}s"
            except openai.APIConnectionError as err:
                cause = err.__cause__
                problem = f"connection error ({type(cause).__name__ if cause else 'unknown'})"
            except openai.APIResponseValidationError:
                malformed = True
                problem = "response envelope failed validation"
            except openai.APIError as err:
                problem = f"API error: {self._redact(_short(str(err)))}"
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                # The SDK parses the HTTP body with json.loads and lets the error escape as is.
                malformed = True
                problem = f"truncated or invalid JSON response body ({type(err).__name__})"
            else:
                used_prompt, used_completion = _usage(completion)
                prompt_tokens += used_prompt
                completion_tokens += used_completion
                stats["prompt_tokens"] += used_prompt
                stats["completion_tokens"] += used_completion
                metrics.LLM_TOKENS.labels("prompt").inc(used_prompt)
                metrics.LLM_TOKENS.labels("completion").inc(used_completion)
                try:
                    value = self._parse(completion, schema)
                except _Malformed as err:
                    malformed = True
                    problem = str(err)
                else:
                    return LLMResult(
                        value=value,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        model=str(getattr(completion, "model", None) or self.model),
                        attempts=attempt,
                        latency=time.monotonic() - started,
                    )

            if attempt >= attempts_allowed:
                break
            delay = self._backoff(attempt, retry_after)
            stats["retries"] += 1
            log.warning(
                "LLM %s call failed (%s); retry %d/%d in %.2fs",
                purpose,
                problem,
                attempt,
                self.max_retries,
                delay,
                extra={
                    "llm_purpose": purpose,
                    "llm_status": status,
                    "llm_attempt": attempt,
                    "llm_delay": delay,
                },
            )
            await asyncio.sleep(delay)

        tries = f"{attempts_allowed} attempt{'s' if attempts_allowed != 1 else ''}"
        if malformed:
            raise LLMError(f"malformed LLM reply: {problem} (after {tries})", permanent=True)
        raise LLMError(f"LLM request failed after {tries}: {problem}", permanent=False, status=status)

    @staticmethod
    def _is_permanent(err: openai.APIStatusError) -> bool:
        status = err.status_code
        if status == 429 and err.code == "insufficient_quota":
            return True  # out of credit: retrying will not help until someone pays
        return 400 <= status < 500 and status not in _RETRYABLE_4XX

    def _rejected_message(self, err: openai.APIStatusError) -> str:
        status = err.status_code
        text = f"LLM request rejected: {_status_text(status)}"
        if status == 401:
            return f"{text} (check OPENAI_API_KEY)"
        if status == 403:
            return f"{text} (the API key may not have access to model {self.model!r})"
        if status == 429:
            return f"{text}: insufficient quota (check the account's billing)"
        if status == 404:
            base = str(self._openai.base_url) if self._openai else ""
            return f"{text} (check model {self.model!r} and base URL {redact_url(self._redact(base))})"
        detail = ""
        body = err.body
        if isinstance(body, Mapping):
            detail = str(body.get("message") or "")
        elif isinstance(body, str):
            detail = body
        detail = self._redact(_short(detail)) if detail else ""
        return f"{text}: {detail}" if detail else text
