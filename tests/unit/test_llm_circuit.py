"""LLMClient and its circuit breaker: the real SDK over HTTP to FakeLLM, the breaker on an injected clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from briefs.circuit import CircuitBreaker, CircuitConfig, SharedCircuit
from briefs.llm import LLMClient, LLMError, ProjectBrief
from briefs.settings import Settings
from tests.fakellm import FakeLLM, Fault

MESSAGES = [{"role": "user", "content": "Project: Atlas\nWhat happened?"}]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def client(fake: FakeLLM, clock: Clock, *, retries: int = 3, **config: Any) -> LLMClient:
    settings = Settings(_env_file=None, openai_api_key="test-key", openai_base_url=fake.base_url,  # type: ignore[call-arg]
                        llm_max_retries=retries, llm_timeout=5.0)
    circuit = SharedCircuit.of(settings, CircuitBreaker(CircuitConfig(**config), clock=clock))
    return LLMClient(settings, backoff_base=0.01, backoff_cap=0.02, circuit=circuit)


def refused() -> float:
    return REGISTRY.get_sample_value("briefs_llm_circuit_refused_total", {"purpose": "brief"}) or 0.0


async def test_an_open_circuit_stops_the_retries_and_sends_nothing_more(fake: FakeLLM) -> None:
    fake.fail_when(lambda body: True, Fault.status(500))
    async with client(fake, Clock(), retries=10, failures=3) as llm:
        with pytest.raises(LLMError) as first:
            await llm.complete(MESSAGES, ProjectBrief)
        assert fake.calls == 3 and first.value.kind == "server"  # the SDK stopped retrying once it opened
        before = refused()
        with pytest.raises(LLMError) as second:
            await llm.complete(MESSAGES, ProjectBrief)
        assert fake.calls == 3
        assert second.value.kind == "circuit_open" and not second.value.permanent and second.value.attempts == 0
        assert "circuit open since" in str(second.value)
        assert refused() == before + 1


async def test_half_open_sends_exactly_one_probe(fake: FakeLLM) -> None:
    clock = Clock()
    fake.script(Fault.status(503))
    async with client(fake, clock, retries=0, failures=1, cooldown=10) as llm:
        with pytest.raises(LLMError):
            await llm.complete(MESSAGES, ProjectBrief)
        clock.now += 10
        fake.latency = 0.3  # the probe is still in flight when the others ask
        results = await asyncio.gather(*(llm.complete(MESSAGES, ProjectBrief) for _ in range(5)),
                                       return_exceptions=True)
        assert fake.calls == 2  # the failure, then one probe
        kinds = sorted(r.kind if isinstance(r, LLMError) else "ok" for r in results)
        assert kinds == ["circuit_open"] * 4 + ["ok"]
        assert llm.circuit is not None and llm.circuit.breaker.state == "closed"
        fake.latency = 0
        await llm.complete(MESSAGES, ProjectBrief)
        assert fake.calls == 3


async def test_malformed_replies_and_rate_limits_do_not_open_it(fake: FakeLLM) -> None:
    async with client(fake, Clock(), retries=2, failures=2, min_calls=2) as llm:
        fake.fail_when(lambda body: True, Fault.content("not JSON at all"))
        for _ in range(4):
            with pytest.raises(LLMError) as err:
                await llm.complete(MESSAGES, ProjectBrief)
            assert err.value.kind == "malformed"
        assert fake.calls == 12
        fake.reset()
        for _ in range(3):
            fake.script(Fault.status(429, retry_after=0.01), Fault.status(429, retry_after=0.01))
            await llm.complete(MESSAGES, ProjectBrief)  # two rate-limited attempts, then the reply
        assert fake.calls == 9
        assert llm.circuit is not None and llm.circuit.breaker.state == "closed"


async def test_a_401_opens_it_for_good(fake: FakeLLM) -> None:
    clock = Clock()
    fake.expected_key = "another-key"
    async with client(fake, clock) as llm:
        with pytest.raises(LLMError) as err:
            await llm.complete(MESSAGES, ProjectBrief)
        assert err.value.kind == "auth" and fake.calls == 1
        clock.now += 365 * 86_400
        with pytest.raises(LLMError) as again:
            await llm.complete(MESSAGES, ProjectBrief)
        assert again.value.kind == "circuit_open" and fake.calls == 1
        assert llm.circuit is not None
        llm.circuit.breaker.reset()
        fake.expected_key = None
        await llm.complete(MESSAGES, ProjectBrief)
        assert fake.calls == 2
