"""The LLM client's pace through the real openai SDK talking HTTP to tests.fakellm.FakeLLM.

``briefs.llm`` gets the still :class:`~tests.unit.test_llm_pacing.FakeClock`: waits for a rate token
last until the test moves the clock, and the fake server moves it while it "works" on a request, so
the time of an HTTP request, as ``briefs.llm`` measures it, is exactly what the test made it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from briefs import llm
from briefs.llm import Limits, LLMClient, ProjectBrief
from briefs.settings import Settings
from tests.fakellm import FakeLLM, Fault, count_tokens, default_responder
from tests.unit.test_llm_pacing import FakeClock

SERVER_SECONDS = 2.5  # what one request takes at the fake provider, on the fake clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock()
    monkeypatch.setattr(llm, "time", fake)
    yield fake


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeLLM]:
    def working(body: dict[str, Any]) -> str:
        clock.advance(SERVER_SECONDS)
        return default_responder(body)

    with FakeLLM() as server:
        server.responder = working
        yield server


def client(fake: FakeLLM, limits: Limits) -> LLMClient:
    settings = Settings(_env_file=None, openai_api_key="test-key", openai_base_url=fake.base_url,  # type: ignore[call-arg]
                        llm_max_retries=3, llm_timeout=5.0, model="gpt-4o-mini")
    return LLMClient(settings, limits=limits, backoff_base=0.01)


def messages(project: str = "Apollo") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You write short daily project briefs."},
        {"role": "user", "content": f"Project: {project}\nActivity: 3 tasks closed, 1 opened."},
    ]


def counted(body: dict[str, Any]) -> int:
    """The tokens FakeLLM reports for a request it answered normally: its words, prompt and reply."""
    return sum(count_tokens(m["content"]) for m in body["messages"]) + count_tokens(default_responder(body))


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_request_seconds_is_the_http_request_without_the_wait_for_a_rate_token(
    fake: FakeLLM, clock: FakeClock
) -> None:
    limits = Limits(4, 600)  # 10 a second, 10 held
    for _ in range(10):  # spend the burst: the next request waits for a token
        (await limits.slot()).release()
    async with client(fake, limits) as llm_client:
        call = asyncio.create_task(llm_client.complete(messages(), ProjectBrief))
        await turns()
        assert fake.calls == 0 and not call.done()  # waiting for a token: the clock stands still
        clock.advance(100.0)  # a long wait, as the call sees it
        result = await call
    assert fake.calls == 1 and result.attempts == 1
    assert result.request_seconds == pytest.approx(SERVER_SECONDS, abs=0.01)
    assert result.latency >= 100.0 + SERVER_SECONDS  # the call's latency has the wait; the request's has not


async def test_request_seconds_is_the_mean_over_the_calls_requests(fake: FakeLLM, clock: FakeClock) -> None:
    fake.script(Fault.status(500))  # answered at once: no time on the fake clock
    async with client(fake, Limits(4)) as llm_client:
        result = await llm_client.complete(messages(), ProjectBrief)
    assert result.attempts == 2 and fake.calls == 2
    assert result.request_seconds == pytest.approx(SERVER_SECONDS / 2, abs=0.01)


async def test_a_reply_debits_its_tokens_and_a_failed_request_debits_none(fake: FakeLLM, clock: FakeClock) -> None:
    fake.responder = None  # the clock stands still throughout: nothing is refilled
    limits = Limits(4, tpm=600_000)  # 10,000 a second, 10,000 held
    tokens = limits.gates().tokens
    assert tokens is not None and tokens.capacity == 10_000
    async with client(fake, limits) as llm_client:
        first = await llm_client.complete(messages("Apollo"), ProjectBrief)
        used = counted(fake.requests[0])
        assert used == first.prompt_tokens + first.completion_tokens > 0
        assert tokens.balance == pytest.approx(10_000 - used, abs=0.5)

        fake.script(Fault.status(500))  # an error reply reports no usage
        second = await llm_client.complete(messages("Zephyr"), ProjectBrief)
    assert second.attempts == 2 and fake.calls == 3
    assert tokens.balance == pytest.approx(10_000 - used - counted(fake.requests[2]), abs=0.5)


async def test_a_reply_that_overdraws_the_tokens_holds_the_next_request_until_refilled(
    fake: FakeLLM, clock: FakeClock
) -> None:
    fake.usage = {"prompt_tokens": 110, "completion_tokens": 20, "total_tokens": 130}
    limits = Limits(4, tpm=6_000)  # 100 a second, 100 held
    async with client(fake, limits) as llm_client:
        await llm_client.complete(messages(), ProjectBrief)  # 100 - 130: 30 in debt
        waiting = asyncio.create_task(llm_client.complete(messages("Zephyr"), ProjectBrief))
        await turns()
        assert fake.calls == 1 and not waiting.done()  # not sent while in debt
        clock.advance(0.5)  # 50 refilled: paid off
        result = await waiting
    assert fake.calls == 2 and result.prompt_tokens == 110
