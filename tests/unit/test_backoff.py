"""The one backoff policy, tested once: ceilings, jitter bounds, hostile failure counts."""

from __future__ import annotations

import math

import pytest

from briefs.backoff import RECONNECT, Backoff, job_retry


def test_the_ceiling_doubles_from_base_to_cap() -> None:
    policy = Backoff(base=0.5, cap=8.0, jitter=0)
    assert [policy.ceiling(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert policy.ceiling(0) == policy.ceiling(-5) == 0.5  # no retry count below the first


@pytest.mark.parametrize("attempt", [10**6, 2**63, 10**100])
def test_any_failure_count_gives_the_cap_never_an_overflow(attempt: int) -> None:
    assert Backoff(base=5.0, cap=3600.0).delay(attempt, rng=lambda: 0.0) == 3600.0


@pytest.mark.parametrize(("jitter", "low", "high"), [(0.0, 4.0, 4.0), (0.5, 2.0, 4.0), (1.0, 0.0, 4.0)])
def test_jitter_takes_at_most_its_share_off_the_ceiling(jitter: float, low: float, high: float) -> None:
    policy = Backoff(base=1.0, cap=100.0, jitter=jitter)
    assert policy.delay(3, rng=lambda: 0.0) == high
    assert math.isclose(policy.delay(3, rng=lambda: 1.0), low)
    assert all(low <= policy.delay(3) <= high for _ in range(200))


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0, "cap": 1}, {"base": -1, "cap": 1}, {"base": 1, "cap": math.inf}, {"base": math.nan, "cap": 1},
     {"base": 1, "cap": 1, "jitter": 1.5}, {"base": 1, "cap": 1, "jitter": -0.1}],
)
def test_a_policy_that_could_not_wait_sensibly_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)


def test_the_named_policies() -> None:
    assert job_retry(5.0, 3600.0) == Backoff(5.0, 3600.0, 0.5)
    assert RECONNECT.ceiling(1) == 0.25 and RECONNECT.ceiling(100) == 30.0
