"""The LLM circuit breaker: stop sending traffic to a provider that is failing.

:class:`CircuitBreaker` is the per-process decision-maker, pure logic on an injectable clock
(epoch seconds; :func:`time.time` by default):

- **closed**: every call goes. It opens after ``failures`` provider failures in a row, or when
  at least ``min_calls`` of the last ``window`` calls are known and ``failure_rate`` of them
  failed, or after ``rate_limited_run`` rate-limited replies (429 with a Retry-After) in a row;
- **open**: no call goes. After a cooldown (``cooldown`` seconds, doubled at every reopening
  up to ``cooldown_cap``) the next call is let through as the probe (**half-open**);
- **half-open**: exactly one probe is in flight; the others are refused. Success closes the
  circuit, a failure reopens it with the next, longer, cooldown. A probe that never reports
  (its task was cancelled) frees its place after ``probe_timeout`` seconds.

What counts (:func:`classify`, on ``LLMError.kind``): only the provider's failures do — connection
errors, timeouts, 5xx (and 408/409), 401/403, and 429 ``insufficient_quota``, which opens the circuit
at once (no call can succeed until someone pays; it probes after the cooldown like any other). A 429 with Retry-After is
rate limiting, paced by the client: a few of them change nothing, a long run of them opens. A 2xx
reply that arrived whole is a success, even when it is unusable (malformed JSON, a schema mismatch:
the model's fault, not the provider's), and so is a 400/404 (the provider answered). **401/403** open
the circuit with no automatic probe (``sticky``): it stays open until an operator resets it
(``briefs llm reset``) or a process starts with another key or base URL — the circuit is keyed by a
fingerprint of both (:func:`circuit_key`), so a new configuration starts with a circuit of its own.

Several worker processes share one provider, so the state is also kept in the ``llm_circuit`` table
(migration 0009), one row per configuration. :class:`SharedCircuit` pairs a process's breaker with its
row: :meth:`SharedCircuit.refresh` (cached for ``CACHE_SECONDS``, so at most one cheap primary-key
read per process every second and a half) first writes the transitions this process made and has not
written yet, then adopts a row some other process (or ``briefs llm reset``) wrote since. A process that
finds the row open therefore refuses calls too. Each process makes its own half-open probe once the
row's ``next_probe_at`` passes (with P processes, at most P probes per cooldown); the first to succeed
writes ``closed`` and the others adopt it on their next read. ``briefs status``, ``/healthz``, the
console and ``briefs_llm_circuit_state`` read the row (:func:`read_status`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from briefs import metrics
from briefs.db import Database
from briefs.settings import Settings, redact_url

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # briefs_llm_circuit_state

# Outcomes of one HTTP attempt, as the breaker sees them.
SUCCESS, FAILURE, RATE_LIMITED, QUOTA, AUTH = "success", "failure", "rate_limited", "quota", "auth"
_OUTCOMES = {"auth": AUTH, "quota": QUOTA, "server": FAILURE, "timeout": FAILURE, "connection": FAILURE,
             "rate_limit": RATE_LIMITED, "rejected": SUCCESS}  # malformed: its arrival counted already

CACHE_SECONDS = 1.5  # how stale a process's view of the shared row may be
REASON_CHARS = 300
DEFAULT_PROVIDER = "https://api.openai.com/v1"


@dataclass(frozen=True)
class CircuitConfig:
    failures: int = 5  # provider failures in a row that open the circuit
    window: int = 20  # the last calls the failure rate is taken over ...
    min_calls: int = 10  # ... once at least this many are known
    failure_rate: float = 0.5
    rate_limited_run: int = 30  # 429s (rate limiting) in a row that open it
    cooldown: float = 30.0  # seconds before the first probe; doubled at every reopening ...
    cooldown_cap: float = 600.0  # ... up to this
    probe_timeout: float = 180.0  # a probe that never reported back frees its place after this


def classify(kind: str | None) -> str | None:
    """What an ``LLMError.kind`` (or an attempt's failure kind) means to the breaker; None: nothing."""
    return _OUTCOMES.get(kind or "")


def circuit_key(settings: Settings) -> str:
    """The circuit's id for this configuration: a fingerprint of the base URL and the API key (the key
    itself is never stored). Another key or base URL is another circuit."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key is not None else ""
    base = settings.openai_base_url or DEFAULT_PROVIDER
    return hashlib.sha256(f"{base}\n{key}".encode()).hexdigest()[:32]


def provider_of(settings: Settings) -> str:
    """The provider as shown to operators (the base URL, credentials removed)."""
    return redact_url(settings.openai_base_url or DEFAULT_PROVIDER)


def _iso(epoch: float | None) -> str | None:
    if epoch is None or not math.isfinite(epoch):
        return None
    try:
        return datetime.fromtimestamp(epoch, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class CircuitState:
    """A breaker's state as it is shown and shared (instants in epoch seconds)."""

    state: str
    reason: str | None
    since: float
    next_probe_at: float | None
    sticky: bool = False
    opened_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "since": _iso(self.since),
                "next_probe_at": _iso(self.next_probe_at), "sticky": self.sticky, "opened_count": self.opened_count}

    def describe(self) -> str:
        """One line for people: ``open since 2026-…Z (reason); next probe at …`` ."""
        if self.state == CLOSED:
            return "closed"
        since = _iso(self.since) or "?"
        text = f"{self.state.replace('_', '-')} since {since}" + (f" ({self.reason})" if self.reason else "")
        if self.sticky:
            return text + "; no automatic probe: fix the key, then `briefs llm reset`"
        probe = _iso(self.next_probe_at)
        return text + (f"; next probe at {probe}" if probe and self.state == OPEN else "")


class CircuitBreaker:
    """See the module docstring. ``version`` grows with every transition this breaker makes itself
    (not with one it adopts), so its owner knows what to write to the shared row."""

    def __init__(self, config: CircuitConfig | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config or CircuitConfig()
        self.clock = clock
        self.version = 0
        self._lock = threading.Lock()
        self._state = CircuitState(CLOSED, None, clock(), None)
        self._failures = 0  # provider failures in a row
        self._limited = 0  # rate-limited replies in a row
        self._recent: deque[bool] = deque(maxlen=self.config.window)  # True: a failure
        self._probe_at: float | None = None  # when the half-open probe went out

    @property
    def state(self) -> str:
        return self._state.state

    def snapshot(self) -> CircuitState:
        return self._state

    def blocked(self) -> bool:
        """Whether a call now would be refused (without claiming the probe)."""
        with self._lock:
            state, now = self._state, self.clock()
            if state.state == CLOSED:
                return False
            if state.state == OPEN:
                return state.next_probe_at is None or now < state.next_probe_at
            return self._probe_at is not None and now - self._probe_at < self.config.probe_timeout

    def allow(self) -> bool:
        """Whether a call may go now; in half-open, the one that may is the probe."""
        with self._lock:
            state, now = self._state, self.clock()
            if state.state == CLOSED:
                return True
            if state.state == OPEN:
                if state.next_probe_at is None or now < state.next_probe_at:
                    return False
                self._set(CircuitState(HALF_OPEN, state.reason, state.since, None, False, state.opened_count))
            elif self._probe_at is not None and now - self._probe_at < self.config.probe_timeout:
                return False
            self._probe_at = now
            return True

    def record(self, outcome: str | None, reason: str | None = None) -> None:
        """The outcome of a call that was let through (:func:`classify`); None changes nothing."""
        with self._lock:
            state = self._state.state
            if outcome == SUCCESS:
                self._failures = self._limited = 0
                self._recent.append(False)
                if state != CLOSED:
                    self._close()
            elif outcome == AUTH:
                if not (state == OPEN and self._state.sticky):  # calls in flight report theirs too
                    self._open(reason or "credentials refused", sticky=True)
            elif outcome == QUOTA:
                if state != OPEN:
                    self._open(reason or "insufficient quota")
            elif outcome == FAILURE:
                self._failures += 1
                self._recent.append(True)
                if state == HALF_OPEN or (state == CLOSED and self._tripped()):
                    self._open(reason or "provider failing")
            elif outcome == RATE_LIMITED:
                self._limited += 1
                if state == HALF_OPEN or (state == CLOSED and self._limited >= self.config.rate_limited_run):
                    self._open(reason or f"rate limited {self._limited} times in a row")

    def abandon(self) -> None:
        """A let-through call ended without a verdict (cancelled): its probe place is free again."""
        with self._lock:
            self._probe_at = None

    def reset(self) -> None:
        """Close the circuit now (an operator's reset)."""
        with self._lock:
            self._close()

    def adopt(self, shared: CircuitState) -> None:
        """Take the shared row's state (written by another process, or a reset). A half-open row means
        another process is probing: here it is open until that probe's time is up."""
        with self._lock:
            self._failures = self._limited = 0
            self._recent.clear()
            self._probe_at = None
            if shared.state == HALF_OPEN:
                shared = CircuitState(OPEN, shared.reason, shared.since, self.clock() + self.config.probe_timeout,
                                      shared.sticky, shared.opened_count)
            self._state = shared
            metrics.LLM_CIRCUIT_STATE.set(STATE_VALUES[shared.state])

    def _tripped(self) -> bool:
        config, recent = self.config, self._recent
        if self._failures >= config.failures:
            return True
        return len(recent) >= config.min_calls and sum(recent) / len(recent) >= config.failure_rate

    def _open(self, reason: str, *, sticky: bool = False) -> None:
        now, old = self.clock(), self._state
        count = old.opened_count + 1
        since = old.since if old.state != CLOSED else now
        cooldown = min(self.config.cooldown_cap, self.config.cooldown * 2 ** min(count - 1, 30))
        sticky = sticky or (old.sticky and old.state != CLOSED)
        reason = reason[:REASON_CHARS]
        self._set(CircuitState(OPEN, reason, since, None if sticky else now + cooldown, sticky, count))
        self._probe_at = None
        log.warning("LLM circuit open: %s (%s)", reason,
                    "until reset or reconfigured" if sticky else f"next probe in {cooldown:g}s")

    def _close(self) -> None:
        was = self._state.state
        self._failures = self._limited = 0
        self._recent.clear()
        self._probe_at = None
        self._set(CircuitState(CLOSED, None, self.clock(), None))
        if was != CLOSED:
            log.warning("LLM circuit closed: the provider answers again")

    def _set(self, state: CircuitState) -> None:
        self._state = state
        self.version += 1
        metrics.LLM_CIRCUIT_STATE.set(STATE_VALUES[state.state])


# --------------------------------------------------------------------------- the shared row

_COLUMNS = """state, left(reason, 500) AS reason, extract(epoch FROM since)::float8 AS since,
              extract(epoch FROM next_probe_at)::float8 AS next_probe_at, sticky, opened_count, generation,
              left(provider, 500) AS provider, left(updated_by, 200) AS updated_by,
              extract(epoch FROM updated_at)::float8 AS updated_at"""

_SAVE = """
INSERT INTO llm_circuit AS c (circuit_key, provider, state, reason, since, next_probe_at, sticky, opened_count,
                              updated_by)
VALUES (%(key)s, %(provider)s, %(state)s, %(reason)s, to_timestamp(%(since)s), to_timestamp(%(next)s),
        %(sticky)s, %(opened)s, %(by)s)
ON CONFLICT (circuit_key) DO UPDATE
SET provider = excluded.provider, state = excluded.state, reason = excluded.reason, since = excluded.since,
    next_probe_at = excluded.next_probe_at, sticky = excluded.sticky, opened_count = excluded.opened_count,
    generation = c.generation + 1, updated_by = excluded.updated_by, updated_at = now()
RETURNING generation
"""

_RESET = """
UPDATE llm_circuit
SET state = 'closed', reason = NULL, next_probe_at = NULL, sticky = false, opened_count = 0, since = now(),
    generation = generation + 1, updated_by = %(by)s, updated_at = now()
WHERE (%(key)s::text IS NULL OR circuit_key = %(key)s) AND state <> 'closed'
RETURNING circuit_key
"""


def _finite(value: Any, default: float | None) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else default


def _state_of(row: dict[str, Any]) -> CircuitState:
    """A row as a state; every value checked (the table is read by other versions too)."""
    state = str(row.get("state")) if row.get("state") in STATE_VALUES else OPEN
    opened = row.get("opened_count")
    return CircuitState(state, row.get("reason"), _finite(row.get("since"), 0.0) or 0.0,
                        _finite(row.get("next_probe_at"), None), row.get("sticky") is True,
                        opened if isinstance(opened, int) and opened >= 0 else 0)


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def load_row(conn: psycopg.AsyncConnection[Any], key: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {_COLUMNS} FROM llm_circuit WHERE circuit_key = %s", (key,))
    return await cur.fetchone()


async def reset(conn: psycopg.AsyncConnection[Any], key: str | None, by: str) -> list[str]:
    """Close the circuit of ``key`` (every circuit when None); the keys that were not closed. The
    processes adopt it at their next read (within :data:`CACHE_SECONDS`)."""
    cur = await conn.execute(_RESET, {"key": key, "by": by[:200]})
    return [str(k) for (k,) in await cur.fetchall()]


async def read_status(conn: psycopg.AsyncConnection[Any], settings: Settings) -> dict[str, Any]:
    """The circuit of ``settings``' provider as ``briefs status``, /healthz and the console show it."""
    if not settings.llm_enabled:
        return {"state": "disabled", "reason": "no OPENAI_API_KEY", "since": None, "next_probe_at": None,
                "sticky": False, "provider": None, "updated_by": None, "updated_at": None, "detail": "disabled"}
    row = await load_row(conn, circuit_key(settings))
    state = _state_of(row) if row is not None else CircuitState(CLOSED, None, time.time(), None)
    return {**state.to_dict(), "provider": provider_of(settings),
            "updated_by": row.get("updated_by") if row else None,
            "updated_at": _iso(_finite(row.get("updated_at"), None)) if row else None,
            "detail": state.describe()}


class SharedCircuit:
    """A process's breaker and the shared row of its configuration (see the module docstring)."""

    def __init__(self, key: str, provider: str, breaker: CircuitBreaker | None = None,
                 *, cache_seconds: float = CACHE_SECONDS) -> None:
        self.key = key
        self.provider = provider
        self.breaker = breaker or CircuitBreaker()
        self.cache_seconds = cache_seconds
        self.updated_by = process_name()
        self._seen = 0  # the row's generation last read or written
        self._written = 0  # the breaker's version last written
        self._read_at = -math.inf  # time.monotonic() of the last read

    @classmethod
    def of(cls, settings: Settings, breaker: CircuitBreaker | None = None, **kwargs: Any) -> SharedCircuit:
        return cls(circuit_key(settings), provider_of(settings), breaker, **kwargs)

    async def refresh(self, db: Database, *, force: bool = False) -> CircuitState:
        """Write this process's unwritten transitions, then adopt a newer row (at most once per
        ``cache_seconds`` unless ``force``); the breaker's state after that."""
        if self.breaker.version != self._written or force or time.monotonic() - self._read_at >= self.cache_seconds:
            self._read_at = time.monotonic()
            async with db.raw() as conn:
                await self.sync(conn)
        return self.breaker.snapshot()

    async def publish(self, db: Database) -> None:
        """Write the breaker's transitions not written yet (nothing to do: no statement)."""
        if self.breaker.version != self._written:
            async with db.raw() as conn:
                await self._write(conn)

    async def sync(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.breaker.version != self._written:
            await self._write(conn)
            return
        row = await load_row(conn, self.key)
        if row is not None and isinstance(row.get("generation"), int) and row["generation"] > self._seen:
            self._seen = row["generation"]
            if self.breaker.version == self._written:  # no transition of ours meanwhile
                self.breaker.adopt(_state_of(row))

    async def _write(self, conn: psycopg.AsyncConnection[Any]) -> None:
        version, state = self.breaker.version, self.breaker.snapshot()
        self._written = version  # a concurrent publish of the same version writes nothing more
        cur = await conn.execute(_SAVE, {
            "key": self.key, "provider": self.provider[:500], "state": state.state, "reason": state.reason,
            "since": state.since, "next": state.next_probe_at, "sticky": state.sticky,
            "opened": min(state.opened_count, 2**31 - 1), "by": self.updated_by})
        row = await cur.fetchone()
        if row is not None:
            self._seen = max(self._seen, int(row[0]))


class ProcessCircuits:
    """The process's :class:`SharedCircuit` per configuration (like the process-wide LLM limits)."""

    def __init__(self) -> None:
        self._circuits: dict[str, SharedCircuit] = {}
        self._lock = threading.Lock()

    def get(self, settings: Settings) -> SharedCircuit:
        key = circuit_key(settings)
        with self._lock:
            found = self._circuits.get(key)
            if found is None:
                found = self._circuits[key] = SharedCircuit(key, provider_of(settings))
            return found


    def clear(self) -> None:
        """Forget every circuit (tests: a later server on a reused port must not inherit one)."""
        with self._lock:
            self._circuits.clear()


PROCESS_CIRCUITS = ProcessCircuits()
