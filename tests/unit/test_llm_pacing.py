"""The LLM client's pace: each process's share of the deployment's limits, one second's burst, post-paid tokens.

``briefs.llm`` reads its clock through ``time.monotonic``; these tests give it a :class:`FakeClock` that
stands still unless moved, so a waiter that is blocked stays blocked whatever the machine's speed, and
moving the clock is what lets it through. (The event loop's own clock is left alone.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from briefs import llm
from briefs.llm import Limits, ProcessLimits, TokenBucket
from briefs.settings import Settings
from tests.polling import wait_for_async


class FakeClock:
    """A ``time`` stand-in for ``briefs.llm``: still unless :meth:`advance` d, plus a microsecond per reading
    (so the interval between two readings is never zero, and a bucket never refills by itself)."""

    TICK = 1e-6

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        self.now += self.TICK
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(llm, "time", fake)
    yield fake


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"openai_api_key": "test-key", "llm_concurrency": 8}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def goes_through(limits: Limits) -> bool:
    """Whether a request may start now: its ``slot()`` finishes without waiting (the slot is given back).

    A ``slot()`` that does not wait never suspends, so two turns of the loop are plenty; one that waits
    cannot finish while the fake clock stands still, so it is cancelled (which gives its slot back)."""
    task = asyncio.create_task(limits.slot())
    for _ in range(3):
        await asyncio.sleep(0)
    if task.done():
        task.result().release()
        return True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return False


async def burst(limits: Limits, most: int = 1_000) -> int:
    """How many requests may start at once, the clock standing still (up to ``most``)."""
    for started in range(most):
        if not await goes_through(limits):
            return started
    return most


async def test_each_process_paces_at_its_share_of_the_deployments_rpm(clock: FakeClock) -> None:
    alone = Limits(8, 120)  # 120 a minute, one process: 2 a second
    shared = Limits(8, 120, workers_expected=2)  # the same deployment limit over two processes: 1 a second
    assert alone.rpm_share == 120 and shared.rpm_share == 60
    assert (alone.gates().requests, shared.gates().requests) != (None, None)
    assert [await burst(alone), await burst(shared)] == [2, 1]
    clock.advance(1.0)
    assert [await burst(alone), await burst(shared)] == [2, 1]
    clock.advance(0.5)
    assert [await burst(alone), await burst(shared)] == [1, 0]


async def test_the_token_share_is_split_the_same_way() -> None:
    shared = Limits(8, tpm=120_000, workers_expected=3)
    assert shared.tpm_share == 40_000
    tokens = shared.gates().tokens
    assert tokens is not None and tokens.rate == pytest.approx(40_000 / 60)
    assert shared.gates().requests is None  # rpm 0: no request limit
    assert Limits(8).gates()[1:] == (None, None)  # neither limit: only the concurrency


async def test_the_burst_is_one_seconds_worth_not_a_minutes(clock: FakeClock) -> None:
    limits = Limits(1_000, 6_000)  # 100 a second
    assert await burst(limits) == 100
    clock.advance(0.25)
    assert await burst(limits) == 25
    assert await burst(Limits(8, 1)) == 1  # under one a second: still one at a time, never none
    assert TokenBucket.per_minute(6_000).capacity == 100
    assert TokenBucket.per_minute(1).capacity == 1
    assert TokenBucket.per_minute(30_000).capacity == 500  # tokens: one second's worth
    assert TokenBucket.per_minute(30).capacity == 1  # a call may always start on a full bucket


async def test_a_debit_into_debt_blocks_new_requests_until_the_refill_covers_it(clock: FakeClock) -> None:
    limits = Limits(8, tpm=6_000)  # 100 tokens a second, 100 held
    tokens = limits.gates().tokens
    assert tokens is not None and tokens.capacity == 100
    assert await burst(limits, 50) == 50  # nothing is taken when a request starts: tokens are post-paid
    limits.debit(90)  # a reply within the balance: still not in debt
    assert await goes_through(limits)
    limits.debit(40)  # 10 - 40: 30 in debt
    assert tokens.balance == pytest.approx(-30, abs=0.01)
    assert not await goes_through(limits)
    clock.advance(0.2)  # 20 refilled: still 10 in debt
    assert not await goes_through(limits)
    clock.advance(0.1)  # paid off
    assert await goes_through(limits)
    assert await goes_through(limits)  # and stays so until the next reply is debited
    limits.debit(0)  # a failed request reports no usage: nothing to pay
    assert await goes_through(limits)


async def test_a_reply_claiming_billions_of_tokens_costs_at_most_a_minute(clock: FakeClock) -> None:
    limits = Limits(8, tpm=6_000, workers_expected=2)  # this process: 3,000 a minute, 50 a second
    tokens = limits.gates().tokens
    assert tokens is not None
    limits.debit(2**31 - 1)  # a hostile or broken usage report
    assert tokens.balance == pytest.approx(50 - 3_000, abs=0.01)  # one minute's share, not 1.4 years of it
    assert not await goes_through(limits)
    clock.advance(59.0)  # 2,950 refilled: paid off
    assert await goes_through(limits)


async def test_waiters_for_the_debt_go_in_arrival_order(clock: FakeClock) -> None:
    limits = Limits(8, tpm=6_000)
    limits.debit(103)  # 3 in debt: each waiter sleeps 30 ms between readings of the (still) clock
    done: list[str] = []
    first = asyncio.create_task(limits.slot(), name="first")
    second = asyncio.create_task(limits.slot(), name="second")
    for task in (first, second):
        task.add_done_callback(lambda t: done.append(t.get_name()))
    for _ in range(3):
        await asyncio.sleep(0)
    assert done == []
    clock.advance(1.0)
    await wait_for_async(lambda: len(done) == 2, 10, "both waiters through")
    assert done == ["first", "second"]
    first.result().release()
    second.result().release()


async def test_a_waiter_cancelled_while_in_debt_gives_its_slot_back(clock: FakeClock) -> None:
    limits = Limits(1, tpm=6_000)  # one request in flight at most
    limits.debit(200)
    waiter = asyncio.create_task(limits.slot())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.advance(2.0)  # debt paid off
    assert await goes_through(limits)  # the only slot is free again


def test_limits_keep_their_positional_form_and_check_their_values() -> None:
    limits = Limits(4, 60)
    assert (limits.concurrency, limits.rpm, limits.tpm, limits.workers_expected) == (4, 60, 0, 1)
    assert limits.rpm_share == 60 and limits.tpm_share == 0
    assert repr(Limits(2, 10, tpm=5, workers_expected=3)) == "Limits(concurrency=2, rpm=10, tpm=5, workers_expected=3)"
    for bad in ({"tpm": -1}, {"workers_expected": 0}):
        with pytest.raises(ValueError):
            Limits(4, 60, **bad)


def test_the_process_limits_are_rebuilt_when_the_pace_settings_change() -> None:
    owner = ProcessLimits()
    first = owner.get(settings(llm_rpm=600))
    assert owner.get(settings(llm_rpm=600)) is first
    by_tpm = owner.get(settings(llm_rpm=600, llm_tpm=90_000))
    assert by_tpm is not first and by_tpm.tpm == 90_000
    by_workers = owner.get(settings(llm_rpm=600, llm_tpm=90_000, workers_expected=3))
    assert by_workers is not by_tpm and (by_workers.rpm_share, by_workers.tpm_share) == (200, 30_000)
    assert owner.get(settings(llm_rpm=600, llm_tpm=90_000, workers_expected=3)) is by_workers
    assert owner.get(settings(llm_rpm=600, llm_tpm=90_000, workers_expected=3, llm_concurrency=2)) is not by_workers
    assert Limits.from_settings(settings(llm_tpm=7, workers_expected=2)).key == (8, 0, 7, 2)
