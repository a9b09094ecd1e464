"""The LLM client: JSON-schema replies from an OpenAI-compatible chat-completions API.

``LLMClient.complete(messages, Schema)`` sends the conversation with
``response_format={"type": "json_object"}``, tells the model which JSON schema
to follow, and returns the reply validated as ``Schema`` together with token
usage. The request goes through the SDK's low-level ``post`` (its client, auth,
timeouts and error types; not ``chat.completions.create``'s parameter transform),
on an HTTP client from :func:`make_http_client`; see the comments there for why.

The SDK retries what HTTP tells it (408, 409, 429, 5xx, timeouts, connection errors,
``Retry-After``, ``x-should-retry``), but never a 429 ``insufficient_quota``; this module
retries a reply it cannot use. Both draw on one budget of ``settings.llm_max_retries``
retries, wait with a full-jitter :class:`~briefs.backoff.Backoff` unless the server said
how long, and log each retry; every HTTP attempt is counted in ``briefs_llm_calls_total``
and each failed one in ``briefs_llm_errors_total`` by kind (see "Retries" below).

Limits are the deployment's, shared out per process: ``settings.llm_rpm`` (requests per minute)
and ``settings.llm_tpm`` (prompt and completion tokens per minute) are the provider's limits for
every worker together, and each process paces itself at its share, the limit over
``settings.workers_expected``, so the deployment stays under them instead of learning them from
429s. Every ``LLMClient`` in a process shares one :class:`Limits`
(``settings.llm_concurrency`` requests in flight, a request bucket and a post-paid token bucket,
each holding about one second's worth of its share), owned by :data:`PROCESS_LIMITS` unless the
client is given its own with ``limits=``.

Errors are ``LLMError``; ``permanent`` tells the caller whether trying the same
request later can help. Messages never contain the API key.

Every HTTP attempt first asks the client's circuit breaker (:mod:`briefs.circuit`; by default the
process's circuit of this configuration, :data:`briefs.circuit.PROCESS_CIRCUITS`) and reports its
outcome to it. While the circuit is open no request is sent: the call fails at once with
``kind="circuit_open"`` (not permanent) and ``briefs_llm_circuit_refused_total`` counts it; the SDK
does not retry while it is open either.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import math
import re
import select
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Generic, NamedTuple, TypeVar

import httpcore2  # httpx2's connection pool
import httpx2  # the openai SDK's HTTP client (a dependency of openai 3.x)
import openai
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from briefs import circuit, metrics
from briefs.backoff import Backoff
from briefs.circuit import PROCESS_CIRCUITS, CircuitBreaker, SharedCircuit
from briefs.render import clean, clip
from briefs.settings import Settings, redact_url

__all__ = [
    "DEFAULT_BASE_URL",
    "PROCESS_LIMITS",
    "TOKENS_MAX",
    "ExecutiveSummary",
    "LLMClient",
    "LLMError",
    "LLMResult",
    "Limits",
    "ProcessLimits",
    "ProjectBrief",
    "TokenBucket",
    "call_cost",
    "instructions",
    "token_count",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BACKOFF_CAP = 20.0
MAX_REPLY_BYTES = 1_000_000  # a larger chat.completion is not parsed: malformed
REPLY_ITEM_CHARS = 1000  # a reply's list item is cut to this (the schema asks for short items)

T = TypeVar("T", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# Reply schemas
# ---------------------------------------------------------------------------------------------


def _cleaned(limit: int) -> BeforeValidator:
    """A reply string made storable before validation: NUL, lone surrogates and control characters
    dropped (``render.clean``), whitespace-only counted as empty, cut to ``limit`` characters.
    Non-strings pass through untouched, so a wrong type still fails validation."""

    def apply(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return clip(clean(value).strip(), limit)

    return BeforeValidator(apply)


ReplyItem = Annotated[str, _cleaned(REPLY_ITEM_CHARS)]  # empty items are dropped by render.section_from_llm


class ProjectBrief(BaseModel):
    """One project's section of a brief."""

    summary: Annotated[str, _cleaned(2000)] = Field(min_length=1, max_length=2000)
    highlights: list[ReplyItem] = Field(default_factory=list, max_length=10)
    risks: list[ReplyItem] = Field(default_factory=list, max_length=10)
    next_steps: list[ReplyItem] = Field(default_factory=list, max_length=10)


class ExecutiveSummary(BaseModel):
    """The top of a brief, across all of a user's projects."""

    summary: Annotated[str, _cleaned(4000)] = Field(min_length=1, max_length=4000)
    priority_actions: list[ReplyItem] = Field(default_factory=list, max_length=10)


# ---------------------------------------------------------------------------------------------
# Errors, results, metrics
# ---------------------------------------------------------------------------------------------


ERROR_KINDS = frozenset(
    {"auth", "quota", "rate_limit", "server", "timeout", "connection", "malformed", "rejected", "disabled",
     "circuit_open"}
)


class LLMError(Exception):
    """A completion that failed.

    ``permanent`` is True when retrying the same request cannot help: the API rejected
    it (4xx other than 408/409/429), the reply still failed validation after all
    retries, or the client is disabled. ``status`` is the last HTTP status, if any.
    ``kind`` says what went wrong last, for health reports: ``auth`` (401/403), ``quota``
    (429 insufficient_quota), ``rate_limit`` (429), ``server`` (5xx, 408/409),
    ``timeout``, ``connection``, ``malformed`` (the reply was unusable), ``rejected``
    (another 4xx), ``disabled`` (no API key, or the client is closed) or ``circuit_open`` (the
    circuit breaker refused to send it: the provider is failing; see :mod:`briefs.circuit`). ``attempts`` is
    the number of HTTP requests made, retries included.
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        status: int | None = None,
        kind: str = "server",
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.status = status
        self.kind = kind if kind in ERROR_KINDS else "server"
        self.attempts = attempts

    def __repr__(self) -> str:
        return (f"LLMError({self.message!r}, permanent={self.permanent}, status={self.status}, "
                f"kind={self.kind!r}, attempts={self.attempts})")


def status_kind(status: int, code: str | None = None) -> str:
    """The ``LLMError.kind`` of an HTTP error status."""
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "quota" if code == "insufficient_quota" else "rate_limit"
    if status >= 500 or status in (408, 409):
        return "server"
    return "rejected"


@dataclass
class LLMResult(Generic[T]):
    value: T  # the validated reply
    prompt_tokens: int  # summed over every attempt that reported usage
    completion_tokens: int
    model: str  # as reported by the API (falls back to the requested model)
    attempts: int  # HTTP requests made, 1 = no retry
    latency: float  # seconds from the call to the result, waits included
    # Mean seconds per HTTP request of the call, from sending it to its reply read: no wait for a slot or
    # a rate token, no backoff sleep. What the provider takes per request, for the scheduler's planning.
    request_seconds: float = 0.0


@dataclass
class _Tally:
    """What a call has used so far, over its attempts."""

    started: float  # time.monotonic() at the call
    prompt_tokens: int = 0
    completion_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# Limits: the deployment's, shared out per process
# ---------------------------------------------------------------------------------------------


BURST_SECONDS = 1.0  # a bucket holds this many seconds' worth of its rate (see TokenBucket.per_minute)


class TokenBucket:
    """An async token bucket: at most ``capacity`` tokens, refilled at ``rate`` tokens per second.

    Two ways to pay. :meth:`acquire` is prepaid: it waits for one token and takes it (requests).
    :meth:`settle` and :meth:`debit` are post-paid: a caller goes ahead once the balance is not
    negative, and what it used, known only from the reply, is debited afterwards; the balance may go
    into debt, and later callers wait until the refill has paid it off (tokens of a completion).
    Waiters are served in arrival order.
    """

    def __init__(self, capacity: float, rate: float) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError("TokenBucket needs capacity >= 1 and rate > 0")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()  # waiters are served in arrival order

    @classmethod
    def per_minute(cls, per_minute: float) -> TokenBucket:
        """A bucket paced at ``per_minute`` tokens a minute that holds ``BURST_SECONDS`` worth of it (at least 1).

        Not a whole minute's worth: providers enforce a per-minute limit over shorter intervals too
        (a minute's requests sent in its first second are refused even though the minute's total is
        within the limit), so a process that bursts its whole minute at once meets 429s. Holding one
        second's worth keeps the pace even, while a rate under one a second still lets one through."""
        rate = per_minute / 60.0
        return cls(capacity=max(rate * BURST_SECONDS, 1.0), rate=rate)

    @property
    def balance(self) -> float:
        """The tokens there are now (negative: the debt still to be refilled)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self) -> None:
        """Wait for a token and take it."""
        async with self._lock:
            self._refill()
            while self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1

    async def settle(self) -> None:
        """Wait until the bucket is not in debt (balance >= 0); nothing is taken (see :meth:`debit`)."""
        async with self._lock:
            self._refill()
            while self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
                self._refill()

    def debit(self, tokens: float) -> None:
        """Take ``tokens`` already used, going into debt if there are not that many."""
        self._refill()
        self._tokens -= tokens


class _Gates(NamedTuple):
    """One event loop's primitives of a :class:`Limits`."""

    semaphore: asyncio.Semaphore
    requests: TokenBucket | None  # prepaid, one token per HTTP request
    tokens: TokenBucket | None  # post-paid, the tokens each reply reports


class Limits:
    """Request limits shared by every :class:`LLMClient` holding this object: at most ``concurrency``
    requests in flight and, paced at this process's share of the deployment's limits:

    - when ``rpm > 0``, at most ``rpm / workers_expected`` requests started per minute (a token bucket);
    - when ``tpm > 0``, at most ``tpm / workers_expected`` prompt and completion tokens per minute,
      post-paid: a request starts while the token bucket is not in debt, and each reply's reported
      usage is debited from it afterwards (:meth:`debit`), so one call may overdraw it and the next
      ones wait until the refill has covered it.

    Each bucket holds about one second's worth of its share (:meth:`TokenBucket.per_minute`): the
    provider enforces its per-minute limits over shorter intervals too.

    asyncio primitives belong to the event loop that first waits on them, so each running loop gets
    its own semaphore and buckets (a service has one loop; tests and benchmarks run several in turn).
    """

    def __init__(self, concurrency: int, rpm: int = 0, *, tpm: int = 0, workers_expected: int = 1) -> None:
        if concurrency < 1 or rpm < 0 or tpm < 0 or workers_expected < 1:
            raise ValueError("Limits needs concurrency >= 1, rpm >= 0, tpm >= 0 and workers_expected >= 1")
        self.concurrency = concurrency
        self.rpm = rpm  # the deployment's limits
        self.tpm = tpm
        self.workers_expected = workers_expected
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gates] = (
            weakref.WeakKeyDictionary()  # weak: a closed loop's primitives go with it
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.llm_concurrency, settings.llm_rpm, tpm=settings.llm_tpm,
                   workers_expected=settings.workers_expected)

    @staticmethod
    def key_of(settings: Settings) -> tuple[int, int, int, int]:
        """What :meth:`from_settings` makes limits of: (concurrency, rpm, tpm, workers_expected)."""
        return settings.llm_concurrency, settings.llm_rpm, settings.llm_tpm, settings.workers_expected

    @property
    def key(self) -> tuple[int, int, int, int]:
        return self.concurrency, self.rpm, self.tpm, self.workers_expected

    @property
    def rpm_share(self) -> float:
        """Requests per minute this process may start (0: no limit)."""
        return self.rpm / self.workers_expected

    @property
    def tpm_share(self) -> float:
        """Tokens per minute this process may use (0: no limit)."""
        return self.tpm / self.workers_expected

    def __repr__(self) -> str:
        return (f"Limits(concurrency={self.concurrency}, rpm={self.rpm}, tpm={self.tpm}, "
                f"workers_expected={self.workers_expected})")

    def gates(self) -> _Gates:
        """The running loop's semaphore and buckets (made on first use)."""
        loop = asyncio.get_running_loop()
        gates = self._per_loop.get(loop)
        if gates is None:
            gates = self._per_loop[loop] = _Gates(
                asyncio.Semaphore(self.concurrency),
                TokenBucket.per_minute(self.rpm_share) if self.rpm else None,
                TokenBucket.per_minute(self.tpm_share) if self.tpm else None,
            )
        return gates

    async def slot(self) -> asyncio.Semaphore:
        """Wait for a free request slot, then for a rate token, then until the token bucket is out of
        debt; the caller releases the returned semaphore.

        The buckets are waited on once a slot is held, so the pace is that of requests actually sent. A
        waiter cancelled at any step gives its slot back."""
        gates = self.gates()
        await gates.semaphore.acquire()
        try:
            if gates.requests is not None:
                await gates.requests.acquire()
            if gates.tokens is not None:
                await gates.tokens.settle()
        except BaseException:  # cancelled while waiting: give the slot back
            gates.semaphore.release()
            raise
        return gates.semaphore

    def debit(self, tokens: int) -> None:
        """Charge the tokens a reply reported (prompt and completion) to the running loop's token bucket.

        At most a minute's worth of this process's share: a reply's usage is the provider's word (or a
        hostile server's), and one claiming two billion tokens must not stall every call of the process
        for a day; no single request can use more than the provider's per-minute limit anyway."""
        bucket = self.gates().tokens
        if bucket is not None and tokens > 0:
            bucket.debit(min(tokens, self.tpm_share))


class ProcessLimits:
    """The owner of the process's :class:`Limits`: an ``LLMClient`` made without ``limits=`` takes them
    from :data:`PROCESS_LIMITS`, so all of a process's clients share one concurrency limit and one pace.

    They are made from the first client's settings. Settings asking for other values (a test, a
    benchmark scenario) get new limits, shared from then on; clients made before keep the old ones.
    """

    def __init__(self) -> None:
        self._limits: Limits | None = None
        self._lock = threading.Lock()

    def get(self, settings: Settings) -> Limits:
        with self._lock:
            limits = self._limits
            if limits is None or limits.key != Limits.key_of(settings):
                limits = self._limits = Limits.from_settings(settings)
            return limits


PROCESS_LIMITS = ProcessLimits()


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


def _strip_fences(text: str) -> str:
    match = _FENCE_RE.match(text)
    return match.group(1) if match else text


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())) or "<root>"
    return f"{where}: {error.get('msg')}"


def _usage(data: dict[str, Any]) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a reply's envelope; zeros when it reported none.

    Each count is an int in 0 .. 2**31 - 1 (what the brief's integer columns hold); a negative
    count is read as 0 (it would also break the Prometheus counter), a larger one as the maximum.
    """
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))


TOKENS_MAX = 2**31 - 1  # daily_briefs.prompt_tokens / completion_tokens are integer columns


def token_count(value: Any) -> int:
    """A count read from a reply or a stored row: an int clamped to 0 .. TOKENS_MAX; anything else is 0."""
    return min(max(value, 0), TOKENS_MAX) if type(value) is int else 0


def call_cost(prices: Mapping[str, Mapping[str, float]], models: Sequence[str | None], prompt_tokens: int,
              completion_tokens: int) -> tuple[str | None, float | None]:
    """The priced model and the cost of a call's tokens by ``prices`` (``settings.llm_prices``: model ->
    input/output price per million tokens), looking up each of ``models`` in turn (the model the API
    reported, then the one requested); ``(None, None)`` when none has a price: the cost is unknown, not 0."""
    for model in models:
        price = prices.get(model) if model else None
        if price is not None:
            return model, (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1_000_000
    return None, None


class _Unusable(Exception):
    """A 2xx reply we could not use: malformed (``kind="malformed"``), or its body did not arrive
    whole (``"timeout"``, ``"connection"``). The SDK never sees these; :meth:`LLMClient._complete` retries them."""

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


_JSON_OBJECT = {"type": "json_object"}


async def _read_capped(response: httpx2.Response) -> bytes:
    """The body of a streamed 2xx reply, read only up to just past ``MAX_REPLY_BYTES`` (decoded size: a
    compressed bomb counts as what it inflates to); the connection is released either way."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY_BYTES:
                break
    finally:
        await response.aclose()
    return b"".join(chunks)


def _envelope(content: bytes) -> dict[str, Any]:
    """The chat.completion object of a 2xx reply's body (a dict), or :class:`_Unusable`."""
    if len(content) > MAX_REPLY_BYTES:
        raise _Unusable(f"response body too large (over {MAX_REPLY_BYTES:,} bytes)")
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise _Unusable(f"truncated or invalid JSON response body ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise _Unusable(f"response envelope failed validation (a JSON {type(data).__name__}, not an object)")
    return data


# ---------------------------------------------------------------------------------------------
# The HTTP client under the SDK
# ---------------------------------------------------------------------------------------------
#
# Measured (bench/README-briefs.md): at 100 concurrent requests, httpcore2's pool bookkeeping is
# the largest CPU cost of the client stack. On every request and every response it re-checks each
# idle pooled connection for a server-side close ("is the socket readable?"), and the stock anyio
# backend answers each check by building anyio's whole socket-attribute table, getpeername()
# syscall included. _ProbedStream answers it with one poll() on the socket it looked up once.
# Only that question changes; the streams are anyio's, everything else is delegated.


def _socket_readable(sock: Any) -> bool:
    """True when a read would not block (data or EOF): an idle keep-alive connection the server closed."""
    fd = sock.fileno()
    if fd < 0:
        return True  # closed: as good as "the server went away"
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _ProbedStream(httpcore2.AsyncNetworkStream):
    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._sock = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:
        return _ProbedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._sock is not None:
            return _socket_readable(self._sock)
        return self._inner.get_extra_info(info)


class _ProbedBackend(httpcore2.AsyncNetworkBackend):
    def __init__(self, inner: httpcore2.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> _ProbedStream:
        return _ProbedStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Any = None) -> _ProbedStream:
        return _ProbedStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _probe_pool(transport: Any) -> bool:
    """Give one transport's connection pool the cheap idle-connection check; False if it is not laid
    out as expected (a future httpx2/httpcore2): then it keeps its stock checks."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, _ProbedBackend):
        return True
    if isinstance(pool, httpcore2.AsyncConnectionPool) and isinstance(backend, httpcore2.AsyncNetworkBackend):
        pool._network_backend = _ProbedBackend(backend)
        return True
    return False


ERROR_BODY_MAX = 64 * 1024  # bytes of an error reply's body that are read: any provider's message fits


class _CappedStream(httpx2.AsyncByteStream):
    """A response body that ends after ``limit`` bytes as received; the rest is never read (the
    connection is then closed, not reused)."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def __aiter__(self) -> Any:
        left = self._limit
        async for chunk in self._inner:
            if len(chunk) >= left:
                if left:
                    yield chunk[:left]
                return
            left -= len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


async def _cap_error_body(response: httpx2.Response) -> None:
    """Response hook: the SDK reads an error reply's body whole (for its message); only the first
    ``ERROR_BODY_MAX`` bytes of it exist for the SDK. A 2xx body is read capped by :func:`_read_capped`."""
    if not response.is_success and isinstance(response.stream, httpx2.AsyncByteStream):  # always, on an async client
        response.stream = _CappedStream(response.stream, ERROR_BODY_MAX)


def make_http_client(concurrency: int) -> httpx2.AsyncClient:
    """The SDK's default HTTP client (its timeouts, redirects, proxies from the environment), with a
    keep-alive pool at least as large as ``concurrency`` and the cheap idle-connection check.

    The client is built the ordinary way, so httpx2 reads ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``
    and ``NO_PROXY`` from the environment and mounts a proxy transport per scheme (passing our own
    ``transport=`` would make it ignore them). Then every transport's pool, the direct one and each
    proxy's, gets the cheap check. httpx2 has no parameter for a pool's network backend, so it is set
    on the pool; if a future httpx2/httpcore2 lays these out differently a transport is left as it is
    (same behaviour, without the saving). :func:`fast_pool_checks` says which one you got.
    """
    limits = httpx2.Limits(max_connections=max(1000, concurrency), max_keepalive_connections=max(100, concurrency))
    client = openai.DefaultAsyncHttpxClient(limits=limits, event_hooks={"response": [_cap_error_body]})
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    if not all([_probe_pool(t) for t in transports]):  # pragma: no cover - depends on the installed httpx2
        log.debug("httpx2 transport not as expected; keeping its stock idle-connection checks")
    if through := proxied(client):
        log.info("LLM requests to %s go through the proxy set in the environment", ", ".join(through))
    return client


def fast_pool_checks(client: httpx2.AsyncClient) -> bool:
    """Whether ``client`` (made by :func:`make_http_client`) uses the cheap idle-connection check."""
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    return isinstance(getattr(pool, "_network_backend", None), _ProbedBackend)


def proxied(client: httpx2.AsyncClient) -> list[str]:
    """The URL patterns ``client`` sends through a proxy (from the environment), for logs and tests."""
    return sorted(str(pattern.pattern) for pattern, t in client._mounts.items() if t is not None)


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------
#
# The SDK retries what HTTP tells it: 408, 409, 429 and 5xx replies, timeouts and connection
# errors, waiting what Retry-After / retry-after-ms ask (up to two minutes; a longer wait is not
# retried at all) and obeying x-should-retry. _SDKClient changes three of its AsyncAPIClient methods
# (openai 3.x, _base_client.py): _should_retry (a 429 insufficient_quota is never retried),
# _calculate_retry_timeout (without a Retry-After, the wait is our Backoff, not the SDK's) and
# _send_request (each HTTP attempt takes a limits slot, is counted and bounded: _attempt).
# What the SDK cannot judge, a 2xx reply we cannot use, LLMClient._complete retries itself.
# Both share one budget: settings.llm_max_retries retries in all.


@dataclass
class _Call:
    """One ``complete()`` call as its HTTP attempts see it (through :data:`_CALL`: the SDK's retry
    loop runs in the caller's task)."""

    purpose: str
    limits: Limits
    backoff: Backoff
    timeout: float  # the SDK's timeout, per phase (connect, each read...)
    deadline: float  # seconds one attempt may take in all, its body included
    max_retries: int
    requests: int = 0  # HTTP requests sent
    status: int | None = None  # of the last failed attempt
    kind: str = "server"
    problem: str = ""
    ends: float = 0.0  # loop time by which the current attempt must be over
    slot: asyncio.Semaphore | None = None  # held from a 2xx reply's headers until its body is read
    breaker: CircuitBreaker | None = None
    sent: float | None = None  # time.monotonic() when the current HTTP request was sent, until it is over
    request_time: float = 0.0  # seconds spent in HTTP requests: sent to failed or to the reply read

    def sending(self) -> None:
        """An HTTP request goes out now (its slot and rate token are held: their waits are not counted)."""
        self.sent = time.monotonic()

    def request_over(self) -> None:
        """The current HTTP request failed or its reply was read: add its time (once)."""
        sent, self.sent = self.sent, None
        if sent is not None:
            self.request_time += time.monotonic() - sent

    def request_seconds(self) -> float:
        """Mean seconds per HTTP request so far."""
        return self.request_time / self.requests if self.requests else 0.0

    def failed(self, kind: str, problem: str, status: int | None = None) -> None:
        self.kind, self.problem, self.status = kind, problem, status
        metrics.LLM_ERRORS.labels(self.purpose, kind).inc()
        if self.breaker is not None:
            self.breaker.record(circuit.classify(kind), problem)

    def answered(self) -> None:
        """A 2xx reply arrived whole: the provider works (whatever the model wrote)."""
        if self.breaker is not None:
            self.breaker.record(circuit.SUCCESS)

    def admit(self) -> None:
        """Raise :class:`_CircuitOpen` when the breaker refuses this attempt."""
        if self.breaker is not None and not self.breaker.allow():
            metrics.LLM_CIRCUIT_REFUSED.labels(self.purpose).inc()
            raise _CircuitOpen(self.breaker.snapshot().describe())

    def release(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()

    def retrying(self, delay: float) -> None:
        log.warning(
            "LLM %s call failed (%s); retry %d/%d in %.2fs", self.purpose, self.problem, self.requests,
            self.max_retries, delay,
            extra={"llm_purpose": self.purpose, "llm_status": self.status, "llm_attempt": self.requests,
                   "llm_delay": delay},
        )

    def tries(self) -> str:
        return f"{self.requests} attempt{'s' if self.requests != 1 else ''}"


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("briefs_llm_call", default=None)


class _CircuitOpen(openai.OpenAIError):
    """An attempt the circuit breaker refused (an OpenAIError: the SDK passes it on without retrying)."""


async def _attempt(call: _Call, request: httpx2.Request,
                   send: Callable[[], Awaitable[httpx2.Response]]) -> httpx2.Response:
    """One HTTP attempt of ``call``: a slot and the pace's go-ahead (:meth:`Limits.slot`), then counted,
    timed from here (:meth:`_Call.sending`), bounded by ``call.deadline`` (the SDK's timeouts apply per
    phase: a server trickling bytes would hold a slot forever), its failure recorded. A 2xx reply keeps
    the slot, and its time runs, until :meth:`LLMClient._post` has read its body."""
    slot = await call.limits.slot()
    try:
        call.admit()
    except _CircuitOpen:
        slot.release()
        raise
    call.requests += 1
    metrics.LLM_CALLS.labels(call.purpose).inc()
    call.ends = asyncio.get_running_loop().time() + call.deadline
    call.sending()
    response: httpx2.Response | None = None
    try:
        async with asyncio.timeout_at(call.ends):
            response = await send()
            if response.status_code == 429:
                await response.aread()  # the error code decides whether it is retried (_SDKClient._should_retry)
    except BaseException as err:
        slot.release()
        call.request_over()
        if response is not None:  # a 429 whose body did not arrive: the SDK never sees it, so close it here
            await response.aclose()
        if call.breaker is not None and not isinstance(err, Exception):  # cancelled: no verdict
            call.breaker.abandon()
        failure = _failure(call, err, request)
        if failure is err:
            raise
        raise failure from None
    if response.is_success:
        call.slot = slot
    else:
        slot.release()
        call.request_over()
        call.failed(status_kind(response.status_code, _error_code(response)), _status_text(response.status_code),
                    response.status_code)
    return response


def _failure(call: _Call, err: BaseException, request: httpx2.Request) -> BaseException:
    """What an attempt that raised ``err`` raises to the SDK, its failure recorded in ``call``."""
    if isinstance(err, TimeoutError):  # call.deadline passed
        call.failed("timeout", f"no complete response within {call.deadline:g}s")
        return httpx2.ReadTimeout(call.problem, request=request)  # the SDK retries a timeout
    if isinstance(err, httpx2.TimeoutException):
        call.failed("timeout", f"timed out after {call.timeout:g}s")
    elif isinstance(err, Exception):  # not a cancellation
        call.failed("connection", f"connection error ({type(err).__name__})")
    return err


def _error_code(response: httpx2.Response) -> str | None:
    """``error.code`` of an OpenAI-style error body already read (None when unread or not one)."""
    try:
        error = json.loads(response.content).get("error")
    except (httpx2.ResponseNotRead, ValueError, AttributeError, RecursionError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


class _SDKClient(openai.AsyncOpenAI):
    """The SDK's client with the retry changes above; outside ``complete()`` (no :data:`_CALL`) it is the SDK's."""

    async def _send_request(self, request: httpx2.Request, *, stream: bool, **kwargs: Any) -> httpx2.Response:
        send = super()._send_request
        call = _CALL.get()
        if call is None:
            return await send(request, stream=stream, **kwargs)
        return await _attempt(call, request, lambda: send(request, stream=stream, **kwargs))

    def _should_retry(self, response: httpx2.Response) -> bool:
        if response.status_code == 429 and _error_code(response) == "insufficient_quota":
            return False  # out of credit: retrying will not help until someone pays
        call = _CALL.get()
        if call is not None and call.breaker is not None and call.breaker.blocked():
            return False  # the circuit opened: the retry would be refused (no backoff to sit through)
        return super()._should_retry(response)

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any,
                                 response_headers: httpx2.Headers | None = None) -> float:
        call = _CALL.get()
        retry_after = self._parse_retry_after_header(response_headers)
        if call is None or (retry_after is not None and 0 < retry_after < math.inf):
            delay = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        else:
            delay = call.backoff.delay(call.requests)
        if call is not None:
            call.retrying(delay)
        return delay


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def instructions(schema: type[BaseModel]) -> str:
    """The JSON reply instructions for a schema (built once: the JSON schema is costly to compute)."""
    return (
        "Reply with one JSON object and nothing else: no prose, no code fences.\n"
        f"JSON schema name: {schema.__name__}\n"
        f"JSON schema: {json.dumps(schema.model_json_schema(), separators=(',', ':'))}"
    )


class LLMClient:
    """JSON-schema completions with retries, paced by the process's share of the limits (:class:`Limits`).

    ``http_client`` is passed to the SDK; this SDK version (openai 3.x) is built on
    ``httpx2``, so it must be an ``httpx2.AsyncClient`` (a legacy ``httpx.AsyncClient``
    is accepted only if ``httpx`` is installed). A client passed in is not closed by
    :meth:`aclose`; without one, :func:`make_http_client` makes it.

    One client per process is enough (the worker shares one through ``services["llm"]``):
    its connection pool keeps up to ``llm_concurrency`` connections alive between requests.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http_client: httpx2.AsyncClient | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = BACKOFF_CAP,
        limits: Limits | None = None,
        circuit: SharedCircuit | None = None,
    ) -> None:
        self.settings = settings
        self.limits = limits if limits is not None else PROCESS_LIMITS.get(settings)
        self.enabled: bool = settings.llm_enabled
        self.model: str = settings.model
        self.max_retries = settings.llm_max_retries
        self.timeout = settings.llm_timeout
        self.backoff = Backoff(base=backoff_base, cap=backoff_cap, jitter=1.0)  # full jitter
        key = settings.openai_api_key
        self._key = key.get_secret_value() if self.enabled and key is not None else ""
        self._owns_http = http_client is None
        self._openai: _SDKClient | None = None
        # The circuit breaker of this configuration (shared by the process's clients unless one is given).
        self.circuit: SharedCircuit | None = None
        if self.enabled:
            self.circuit = circuit if circuit is not None else PROCESS_CIRCUITS.get(settings)
            # Everything explicit: with api_key/base_url None the SDK would read OPENAI_API_KEY /
            # OPENAI_BASE_URL from the environment behind Settings' back.
            self._openai = _SDKClient(
                api_key=self._key,
                base_url=settings.openai_base_url or DEFAULT_BASE_URL,
                timeout=settings.llm_timeout,
                max_retries=settings.llm_max_retries,
                http_client=http_client if http_client is not None else make_http_client(settings.llm_concurrency),
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
        started = time.monotonic()
        try:
            result = await self._complete(messages, schema, purpose)
        except LLMError as exc:
            # briefs_llm_errors_total: kinds "permanent" and "transient" count calls that failed, every
            # other kind (LLMError.kind) counts failed HTTP requests and unusable replies (_Call.failed).
            metrics.LLM_ERRORS.labels(purpose, "permanent" if exc.permanent else "transient").inc()
            raise
        finally:
            metrics.LLM_LATENCY.labels(purpose).observe(time.monotonic() - started)
        return result

    # -- internals -------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        if self._key:
            text = text.replace(self._key, "***")
        return _SK_RE.sub(r"\1***", text)

    def build_messages(self, messages: list[dict[str, Any]], schema: type[BaseModel]) -> list[dict[str, Any]]:
        """``messages`` with the JSON instructions appended to the (last) system message."""
        text = instructions(schema)
        out = [dict(m) for m in messages]
        for message in reversed(out):
            if message.get("role") == "system" and isinstance(message.get("content"), str):
                message["content"] = f"{message['content'].rstrip()}\n\n{text}"
                break
        else:
            out.insert(0, {"role": "system", "content": text})
        return out

    async def _post(self, messages: list[dict[str, Any]], call: _Call) -> bytes:
        """One request through the SDK (which retries what it can, within what is left of the budget):
        the 2xx reply's body, read within the attempt's deadline."""
        assert self._openai is not None
        body = {"model": self.model, "messages": messages, "response_format": _JSON_OBJECT}
        try:
            # The SDK's documented low-level call ("custom/undocumented requests"): its client still
            # builds, authenticates and sends the request, applies its timeouts and retries, and turns
            # non-2xx replies into APIStatusError. What it skips is chat.completions.create()'s
            # type-driven transform of the parameters (a no-op for plain-string messages, yet a third
            # of the client's CPU: 2.0 → 1.35 ms per call measured) and the ChatCompletion model: the
            # reply's envelope is read by _envelope/_parse, its content validated there. Streamed, so
            # a huge body is never held whole: it is read up to MAX_REPLY_BYTES, then cut.
            response = await self._openai.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, stream=True,
                options={"max_retries": call.max_retries - call.requests},
            )
            async with asyncio.timeout_at(call.ends):
                content = await _read_capped(response)
            call.answered()
            return content
        except TimeoutError:
            raise _Unusable(f"no complete response within {call.deadline:g}s", kind="timeout") from None
        except httpx2.TimeoutException:
            raise _Unusable(f"timed out after {call.timeout:g}s", kind="timeout") from None
        except httpx2.TransportError as err:
            raise _Unusable(f"connection error ({type(err).__name__})", kind="connection") from None
        finally:
            call.request_over()
            call.release()

    def _parse(self, data: dict[str, Any], schema: type[T]) -> T:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _Unusable("no choices in response")
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            refusal = message.get("refusal")
            if refusal:
                raise _Unusable(f"model refused: {_short(str(refusal))}")
            raise _Unusable("empty message content")
        finish = choice.get("finish_reason")
        text = _strip_fences(content)
        try:
            return schema.model_validate_json(text)
        except ValidationError as err:
            errors = err.errors(include_url=False, include_input=False)
            if errors and errors[0].get("type") == "json_invalid":
                # pydantic's parser refuses what Python's json takes: a lone surrogate escape ("\ud800") in
                # an otherwise good reply. Parse it that way; the schema's validators clean such strings.
                try:
                    data = json.loads(text)
                except (ValueError, RecursionError):
                    cut = " (finish_reason=length)" if finish == "length" else ""
                    raise _Unusable(f"content is not valid JSON{cut}: {_short(text, 80)!r}") from None
                try:
                    return schema.model_validate(data)
                except ValidationError as again:
                    errors = again.errors(include_url=False, include_input=False)
            detail = "; ".join(_describe(e) for e in errors[:3])
            raise _Unusable(f"does not match {schema.__name__}: {detail}") from None

    async def _complete(self, messages: list[dict[str, Any]], schema: type[T], purpose: str) -> LLMResult[T]:
        """The SDK retries what HTTP tells it (:class:`_SDKClient`); this loop retries a 2xx reply we
        could not use, with the client's backoff, while the retry budget lasts."""
        if not self.enabled:
            raise LLMError("LLM disabled: no API key (set OPENAI_API_KEY)", permanent=True, kind="disabled")
        if self._openai is None:
            raise LLMError("LLM client is closed", permanent=True, kind="disabled")
        request = self.build_messages(messages, schema)
        call = _Call(purpose=purpose, limits=self.limits, backoff=self.backoff, timeout=self.timeout,
                     deadline=self.timeout * 2 + 1, max_retries=self.max_retries,
                     breaker=self.circuit.breaker if self.circuit is not None else None)
        result = _Tally(started=time.monotonic())
        token = _CALL.set(call)
        try:
            while True:
                try:
                    return await self._reply(request, schema, call, result)
                except _Unusable as err:
                    call.failed(err.kind, clean(str(err)))
                if call.requests > call.max_retries:
                    raise self._gave_up(call)
                delay = call.backoff.delay(call.requests)
                call.retrying(delay)
                await asyncio.sleep(delay)
        finally:
            _CALL.reset(token)

    async def _reply(self, request: list[dict[str, Any]], schema: type[T], call: _Call,
                     tally: _Tally) -> LLMResult[T]:
        """One SDK request and its reply validated, or :class:`LLMError` (the SDK gave up), or
        :class:`_Unusable` (a reply to retry)."""
        try:
            content = await self._post(request, call)
        except openai.APIStatusError as err:
            raise self._rejected(err, call) from None
        except _CircuitOpen as err:
            raise LLMError(f"LLM provider unavailable, request not sent: circuit {err}", kind="circuit_open",
                           attempts=call.requests) from None
        except openai.APIError as err:
            if not isinstance(err, openai.APIConnectionError):  # APITimeoutError is one too
                call.kind, call.problem = "server", f"API error: {self._redact(_short(str(err)))}"
            raise LLMError(f"LLM request failed after {call.tries()}: {call.problem}", kind=call.kind,
                           attempts=call.requests) from None
        data = _envelope(content)
        used_prompt, used_completion = _usage(data)  # a bad reply's tokens count too
        call.limits.debit(used_prompt + used_completion)  # the tokens per minute are post-paid
        tally.prompt_tokens += used_prompt
        tally.completion_tokens += used_completion
        metrics.LLM_TOKENS.labels("prompt").inc(used_prompt)
        metrics.LLM_TOKENS.labels("completion").inc(used_completion)
        value = self._parse(data, schema)
        model = data.get("model")
        return LLMResult(
            value=value,
            prompt_tokens=tally.prompt_tokens,
            completion_tokens=tally.completion_tokens,
            model=clip(clean(model), 200) if isinstance(model, str) and model.strip() else self.model,
            attempts=call.requests,
            latency=time.monotonic() - tally.started,
            request_seconds=call.request_seconds(),
        )

    @staticmethod
    def _gave_up(call: _Call) -> LLMError:
        """The error once the budget is spent on replies we could not use."""
        if call.kind == "malformed":
            return LLMError(f"malformed LLM reply: {call.problem} (after {call.tries()})", permanent=True,
                            kind="malformed", attempts=call.requests)
        return LLMError(f"LLM request failed after {call.tries()}: {call.problem}", kind=call.kind,
                        attempts=call.requests)

    def _rejected(self, err: openai.APIStatusError, call: _Call) -> LLMError:
        """The error for the HTTP error status the SDK gave up on."""
        status = err.status_code
        kind = status_kind(status, err.code if isinstance(err.code, str) else None)
        if self._is_permanent(err):
            return LLMError(self._rejected_message(err), permanent=True, status=status, kind=kind,
                            attempts=call.requests)
        return LLMError(f"LLM request failed after {call.tries()}: {_status_text(status)}", status=status,
                        kind=kind, attempts=call.requests)

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
