"""The LLM circuit breaker's state machine, on an injected clock (no sleeping, no network)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from briefs.circuit import (
    AUTH,
    CLOSED,
    FAILURE,
    HALF_OPEN,
    OPEN,
    QUOTA,
    RATE_LIMITED,
    SUCCESS,
    CircuitBreaker,
    CircuitConfig,
    CircuitState,
    classify,
)
from briefs.jobs import DEFER_MARGIN, defer_delay


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **config: float) -> CircuitBreaker:
    return CircuitBreaker(CircuitConfig(**config), clock=clock)  # type: ignore[arg-type]


def test_opens_after_a_run_of_failures_and_refuses_calls(clock: Clock) -> None:
    b = breaker(clock, failures=5)
    for _ in range(4):
        assert b.allow()
        b.record(FAILURE, "500 Internal Server Error")
    assert b.state == CLOSED
    b.record(FAILURE, "500 Internal Server Error")
    assert b.state == OPEN and b.blocked() and not b.allow()
    state = b.snapshot()
    assert state.reason == "500 Internal Server Error" and state.since == clock.now
    assert state.next_probe_at == clock.now + 30


def test_a_success_breaks_the_run(clock: Clock) -> None:
    b = breaker(clock, failures=3, min_calls=100)
    for _ in range(10):
        b.record(FAILURE)
        b.record(FAILURE)
        b.record(SUCCESS)
    assert b.state == CLOSED


def test_opens_on_the_failure_rate_over_the_window(clock: Clock) -> None:
    b = breaker(clock, failures=100, window=10, min_calls=10, failure_rate=0.5)
    for _ in range(4):
        b.record(FAILURE)
        b.record(SUCCESS)
    assert b.state == CLOSED  # 8 calls known: not enough to judge
    b.record(FAILURE)
    assert b.state == CLOSED  # 5 of 9
    b.record(SUCCESS)
    assert b.state == CLOSED  # 5 of 10 ... reached only with the next failure
    b.record(FAILURE)
    assert b.state == OPEN


def test_half_open_lets_exactly_one_probe_through_and_success_closes(clock: Clock) -> None:
    b = breaker(clock, failures=1, cooldown=30)
    b.record(FAILURE)
    clock.advance(29)
    assert not b.allow()
    clock.advance(1)
    assert not b.blocked()
    assert b.allow()  # the probe
    assert b.state == HALF_OPEN and b.blocked()
    assert not b.allow() and not b.allow()
    b.record(SUCCESS)
    assert b.state == CLOSED and b.allow() and b.snapshot().opened_count == 0


def test_a_failed_probe_reopens_with_a_longer_cooldown_up_to_the_cap(clock: Clock) -> None:
    b = breaker(clock, failures=1, cooldown=10, cooldown_cap=35)
    b.record(FAILURE)
    first_since = b.snapshot().since
    waits = []
    for _ in range(4):
        state = b.snapshot()
        assert state.next_probe_at is not None
        waits.append(state.next_probe_at - clock.now)
        clock.advance(waits[-1])
        assert b.allow()
        b.record(FAILURE, "still down")
    assert waits == [10, 20, 35, 35]
    assert b.state == OPEN and b.snapshot().since == first_since  # open since the first opening


def test_a_probe_that_never_reports_frees_its_place(clock: Clock) -> None:
    b = breaker(clock, failures=1, cooldown=1, probe_timeout=60)
    b.record(FAILURE)
    clock.advance(1)
    assert b.allow()
    clock.advance(59)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()
    b.abandon()
    assert b.allow()


def test_rate_limiting_opens_only_after_a_long_run(clock: Clock) -> None:
    b = breaker(clock, rate_limited_run=30)
    for _ in range(29):
        b.record(RATE_LIMITED)
    assert b.state == CLOSED
    b.record(SUCCESS)
    for _ in range(29):
        b.record(RATE_LIMITED)
    assert b.state == CLOSED
    b.record(RATE_LIMITED)
    assert b.state == OPEN


def test_credentials_refused_open_with_no_automatic_probe_until_reset(clock: Clock) -> None:
    b = breaker(clock)
    b.record(AUTH, "401 Unauthorized")
    state = b.snapshot()
    assert state.state == OPEN and state.sticky and state.next_probe_at is None
    clock.advance(86_400 * 30)
    assert b.blocked() and not b.allow()
    assert "briefs llm reset" in state.describe()
    b.reset()
    assert b.state == CLOSED and b.allow()


def test_out_of_quota_opens_at_once_and_probes_after_the_cooldown(clock: Clock) -> None:
    b = breaker(clock, cooldown=30)
    b.record(QUOTA, "429 insufficient quota")
    state = b.snapshot()
    assert state.state == OPEN and not state.sticky and state.next_probe_at == clock.now + 30
    b.record(QUOTA, "429 insufficient quota")  # a call that was in flight: nothing changes
    assert b.snapshot() == state
    clock.advance(30)
    assert b.allow()


def test_what_counts() -> None:
    for kind in ("server", "timeout", "connection"):
        assert classify(kind) == FAILURE
    assert classify("quota") == QUOTA
    assert classify("auth") == AUTH
    assert classify("rate_limit") == RATE_LIMITED
    assert classify("rejected") == SUCCESS  # 400/404: the provider answered
    assert classify("malformed") is None  # the 2xx reply was counted a success when it arrived
    assert classify("disabled") is None and classify(None) is None and classify("bogus") is None


def test_adopting_a_row_written_elsewhere(clock: Clock) -> None:
    b = breaker(clock)
    b.adopt(CircuitState(OPEN, "500", clock.now - 5, clock.now + 10, False, 1))
    assert b.blocked() and b.version == 0  # adopted, nothing to write back
    b.adopt(CircuitState(HALF_OPEN, "500", clock.now - 5, None, False, 1))
    assert b.state == OPEN and b.blocked()  # another process is probing
    b.adopt(CircuitState(CLOSED, None, clock.now, None))
    assert b.allow()


def test_defer_delay() -> None:
    now = 1_800_000_000.0
    notify = datetime.fromtimestamp(now, UTC)
    probe_in_30 = CircuitState(OPEN, "500", now, now + 30)
    assert defer_delay(probe_in_30, notify, now, 60) is None  # due now: written now
    assert defer_delay(probe_in_30, None, now, 60) is None
    assert defer_delay(probe_in_30, notify + timedelta(seconds=60 + DEFER_MARGIN), now, 60) is None
    far = notify + timedelta(hours=2)
    assert defer_delay(probe_in_30, far, now, 60) == 30  # until the probe
    sticky = CircuitState(OPEN, "401", now, None, True)
    assert defer_delay(sticky, far, now, 60) == 7200 - 60 - DEFER_MARGIN  # until it must be written
    soon = CircuitState(OPEN, "500", now, now + 10_000)
    assert defer_delay(soon, far, now, 60) == 7200 - 60 - DEFER_MARGIN
