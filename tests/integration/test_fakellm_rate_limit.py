"""FakeLLM's provider-like rate limit: plain HTTP, the openai SDK, and the service's LLM client.

The limits are token buckets refilled continuously; every test picks a refill slow enough that
nothing it does in a few seconds can earn a token by accident, and waits only as long as the 429
itself asks (its ``retry-after-ms``), so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from briefs.llm import LLMClient, ProjectBrief
from briefs.settings import Settings
from tests import fakellm
from tests.fakellm import FakeLLM, Fault

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def post(fake: FakeLLM, messages: list[dict[str, Any]] | None = None) -> httpx.Response:
    body = {"model": "fake-model", "messages": messages or MESSAGES}
    return httpx.post(f"{fake.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30)


def at_once(fake: FakeLLM, count: int) -> list[httpx.Response]:
    """``count`` requests released together from as many threads."""
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        barrier.wait(30)
        return post(fake)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def assert_refusal(response: httpx.Response) -> int:
    """A provider's rate-limit answer; returns its exact wait in ms."""
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "rate_limit_exceeded"
    assert error["code"] == "rate_limit_exceeded"
    wait_ms = float(response.headers["retry-after-ms"])
    assert wait_ms > 0 and wait_ms == int(wait_ms)
    assert int(response.headers["Retry-After"]) == max(1, math.ceil(wait_ms / 1000))
    return int(wait_ms)


def test_ten_at_once_with_a_burst_of_two_refuses_exactly_eight(fake: FakeLLM) -> None:
    fake.rate_limit(6, burst=2)  # one token every 10 s: none comes back during the burst
    responses = at_once(fake, 10)

    assert sorted(r.status_code for r in responses) == [200] * 2 + [429] * 8
    waits = [assert_refusal(r) for r in responses if r.status_code == 429]
    assert all(wait <= 10_000 for wait in waits)  # at most one refill period for the next token
    assert fake.refused == 8
    assert fake.calls == 10  # refused requests are HTTP requests too


def test_a_refused_request_succeeds_after_waiting_its_retry_after(fake: FakeLLM) -> None:
    fake.rate_limit(30, burst=1)  # one every 2 s: the second request comes well before the next token
    assert post(fake).status_code == 200
    refused = post(fake)
    wait_ms = assert_refusal(refused)
    assert refused.headers["Retry-After"] == str(math.ceil(wait_ms / 1000))  # whole seconds, rounded up

    time.sleep(wait_ms / 1000)
    answer = post(fake)
    assert answer.status_code == 200
    assert answer.json()["object"] == "chat.completion"
    assert fake.refused == 1


def test_the_default_burst_is_one_seconds_worth_and_at_least_one(
    fake: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake's clock stands still, so nothing refills between the requests however slow the machine is.
    monkeypatch.setattr(fakellm, "time", SimpleNamespace(monotonic=lambda: 1_000.0, time=time.time))
    fake.rate_limit(120)  # two per second: a burst of two
    assert [post(fake).status_code for _ in range(4)] == [200, 200, 429, 429]
    fake.rate_limit(6)  # a tenth per second: still one request may go
    assert [post(fake).status_code for _ in range(3)] == [200, 429, 429]
    assert fake.refused == 4


@pytest.mark.parametrize("off", [None, 0, -5])
def test_none_or_a_non_positive_rpm_turns_the_limit_off(fake: FakeLLM, off: float | None) -> None:
    fake.rate_limit(6, burst=1)
    assert [post(fake).status_code for _ in range(2)] == [200, 429]
    fake.rate_limit(off)
    assert {r.status_code for r in at_once(fake, 12)} == {200}
    assert fake.refused == 1


def test_reset_clears_the_refused_count_and_refills_the_buckets(fake: FakeLLM) -> None:
    fake.rate_limit(6, burst=1)
    assert [post(fake).status_code for _ in range(3)] == [200, 429, 429]
    assert fake.refused == 2
    fake.reset()
    assert fake.refused == 0 and fake.calls == 0
    assert [post(fake).status_code for _ in range(2)] == [200, 429]  # the limit stays set, the bucket full
    assert fake.refused == 1


def test_a_refusal_answers_at_once_and_consumes_no_scripted_fault(fake: FakeLLM) -> None:
    fake.rate_limit(6, burst=1)
    fake.script(Fault.status(500))
    assert post(fake).status_code == 500  # the admitted request gets the scripted fault
    fake.script(Fault.content('{"text": "scripted"}'))
    assert_refusal(post(fake))
    fake.rate_limit(None)
    assert post(fake).json()["choices"][0]["message"]["content"] == '{"text": "scripted"}'


def test_a_wrong_key_is_refused_401_not_rate_limited(fake: FakeLLM) -> None:
    fake.expected_key = "the-right-key"
    fake.rate_limit(6, burst=1)
    assert [post(fake).status_code for _ in range(3)] == [401, 401, 401]
    assert fake.refused == 0


def test_tokens_per_minute_are_debited_after_the_reply(fake: FakeLLM) -> None:
    # "hello there" and the reply {"text": "ok"}: 2 + 2 counted tokens. A bucket of 3 lets the first
    # request in, then owes one token; the next needs one whole token again: two at one token a second.
    fake.rate_limit(None, tpm=60, token_burst=3)
    assert post(fake).status_code == 200
    refused = post(fake)
    wait_ms = assert_refusal(refused)
    assert "tokens" in refused.json()["error"]["message"]
    assert wait_ms <= 2000
    time.sleep(wait_ms / 1000)
    assert post(fake).status_code == 200
    assert fake.refused == 1


def test_the_openai_sdk_waits_what_the_429_says_and_succeeds(fake: FakeLLM) -> None:
    # One request every 2 s: the SDK's own first backoff (0.5 s less jitter) would be refused again,
    # so a single refusal means its retry waited for retry-after-ms.
    fake.rate_limit(30, burst=1)
    client = openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=2)
    try:
        for _ in range(2):
            reply = client.chat.completions.create(model="fake-model", messages=MESSAGES)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == '{"text": "ok"}'
    finally:
        client.close()
    assert fake.refused == 1
    assert fake.calls == 3


async def test_the_services_llm_client_honours_the_retry_after_too(fake: FakeLLM) -> None:
    fake.rate_limit(30, burst=1)
    settings = Settings(_env_file=None, openai_api_key=KEY, openai_base_url=fake.base_url,  # type: ignore[call-arg]
                        llm_max_retries=2, llm_timeout=10.0)
    messages = [{"role": "system", "content": "You write short daily project briefs."},
                {"role": "user", "content": "Project: Apollo\nActivity: 3 tasks closed."}]
    async with LLMClient(settings, backoff_base=0.01) as client:
        results = [await client.complete(messages, ProjectBrief) for _ in range(2)]
    assert [r.attempts for r in results] == [1, 2]
    assert fake.refused == 1
    assert fake.calls == 3
