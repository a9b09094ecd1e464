"""LLMClient against the real openai SDK talking HTTP to tests.fakellm.FakeLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
from prometheus_client import REGISTRY

from briefs import llm
from briefs.backoff import Backoff
from briefs.llm import (
    ExecutiveSummary,
    Limits,
    LLMClient,
    LLMError,
    ProjectBrief,
    TokenBucket,
)
from briefs.settings import Settings
from tests.fakellm import FakeLLM, Fault, count_tokens, default_responder

KEY = "test-key"


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def llm_samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every briefs_llm_* Prometheus sample of the process, by name and labels."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for metric in REGISTRY.collect() if metric.name.startswith("briefs_llm")
            for sample in metric.samples}


class Meter:
    """The LLM metrics counted since the meter was made (the registry is process-wide)."""

    def __init__(self) -> None:
        self.start = llm_samples()

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return llm_samples().get(key, 0.0) - self.start.get(key, 0.0)


@pytest.fixture
def meter() -> Meter:
    return Meter()


def make_settings(fake: FakeLLM | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": KEY,
        "openai_base_url": fake.base_url if fake else None,
        "llm_max_retries": 3,
        "llm_timeout": 5.0,
        "llm_concurrency": 8,
        "llm_rpm": 0,
        "model": "gpt-4o-mini",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def make_client(fake: FakeLLM | None, **overrides: Any) -> LLMClient:
    return LLMClient(make_settings(fake, **overrides), backoff_base=0.01)


def brief_messages(project: str = "Apollo") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You write short daily project briefs."},
        {"role": "user", "content": f"Project: {project}\nActivity: 3 tasks closed, 1 opened."},
    ]


async def test_good_reply_is_parsed_and_tokens_counted(fake: FakeLLM, meter: Meter) -> None:
    messages = brief_messages("Apollo")
    original = json.dumps(messages)
    async with make_client(fake) as client:
        result = await client.complete(messages, ProjectBrief)

    assert isinstance(result.value, ProjectBrief)
    assert "Apollo" in result.value.summary
    assert result.value.next_steps == ["Review Apollo priorities"]
    assert result.attempts == 1
    assert result.model == "gpt-4o-mini"
    assert result.latency > 0

    assert fake.calls == 1
    body = fake.requests[0]
    sent_words = sum(count_tokens(m["content"]) for m in body["messages"])
    assert result.prompt_tokens == sent_words
    assert result.completion_tokens == count_tokens(default_responder(body))

    assert body["response_format"] == {"type": "json_object"}
    assert body["model"] == "gpt-4o-mini"
    system = body["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("You write short daily project briefs.")
    assert "JSON schema name: ProjectBrief" in system["content"]
    assert '"next_steps"' in system["content"]  # the JSON schema itself
    assert fake.headers[0]["authorization"] == f"Bearer {KEY}"
    assert json.dumps(messages) == original  # caller's messages untouched

    assert meter("briefs_llm_latency_seconds_count", purpose="brief") == 1  # complete() calls
    assert meter("briefs_llm_calls_total", purpose="brief") == 1  # HTTP requests
    assert meter("briefs_llm_tokens_total", kind="prompt") == result.prompt_tokens
    assert meter("briefs_llm_tokens_total", kind="completion") == result.completion_tokens


async def test_executive_summary_and_system_message_added_when_missing(fake: FakeLLM) -> None:
    prompt = "Summarise:\nProject: Apollo\nProject: Zeus\n"
    async with make_client(fake) as client:
        messages = [{"role": "user", "content": prompt}]
        result = await client.complete(messages, ExecutiveSummary, purpose="summary")
    assert result.value.priority_actions == ["Follow up on Apollo", "Follow up on Zeus"]
    sent = fake.requests[0]["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert "JSON schema name: ExecutiveSummary" in sent[0]["content"]


async def test_reply_in_code_fences_is_tolerated(fake: FakeLLM) -> None:
    fake.script(Fault.content('```json\n{"summary": "fenced", "highlights": ["a"]}\n```'))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.value.summary == "fenced"
    assert result.attempts == 1


def retries_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "briefs.llm" and hasattr(r, "llm_delay")]


async def test_429_with_retry_after_is_retried_by_the_sdk(fake: FakeLLM, meter: Meter,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    fake.script(Fault.status(429, retry_after=0.05))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2 and fake.calls == 2
    # The SDK's retry loop sent the second request (its retry count header), not a new call of ours.
    assert [h["x-stainless-retry-count"] for h in fake.headers] == ["0", "1"]
    [retry] = retries_logged(caplog)
    assert retry.llm_delay == pytest.approx(0.05) and retry.llm_status == 429  # type: ignore[attr-defined]
    assert meter("briefs_llm_calls_total", purpose="brief") == 2
    assert meter("briefs_llm_errors_total", purpose="brief", kind="rate_limit") == 1
    assert meter("briefs_llm_latency_seconds_count", purpose="brief") == 1


async def test_retry_after_ms_header_is_honoured(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    fake.script(Fault.status(503, retry_after_ms=30))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2
    assert [r.llm_delay for r in retries_logged(caplog)] == [pytest.approx(0.03)]  # type: ignore[attr-defined]


async def test_without_retry_after_the_sdk_waits_our_backoff(fake: FakeLLM,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    fake.script(Fault.status(500), Fault.status(502), Fault.disconnect())
    async with make_client(fake) as client:  # backoff_base 0.01: ceilings 0.01, 0.02, 0.04
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 4 and fake.calls == 4
    delays = [r.llm_delay for r in retries_logged(caplog)]  # type: ignore[attr-defined]
    assert len(delays) == 3 and all(0 <= d <= 0.01 * 2**i for i, d in enumerate(delays))


async def test_x_should_retry_false_stops_retrying(fake: FakeLLM) -> None:
    fake.fail_when(lambda body: True, Fault.status(503, headers={"x-should-retry": "false"}))
    async with make_client(fake, llm_max_retries=3) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert fake.calls == 1
    assert (info.value.kind, info.value.permanent, info.value.attempts) == ("server", False, 1)
    assert str(info.value) == "LLM request failed after 1 attempt: 503 Service Unavailable"


async def test_x_should_retry_true_retries_even_a_400(fake: FakeLLM) -> None:
    fake.script(Fault.status(400, headers={"x-should-retry": "true"}))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2 and fake.calls == 2


async def test_a_retry_after_over_two_minutes_is_not_waited_for(fake: FakeLLM) -> None:
    fake.fail_when(lambda body: True, Fault.status(429, retry_after=600))
    async with make_client(fake, llm_max_retries=3) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert fake.calls == 1
    assert (info.value.kind, info.value.permanent, info.value.status) == ("rate_limit", False, 429)


async def test_500_twice_then_ok(fake: FakeLLM) -> None:
    fake.script(Fault.status(500), Fault.status(500))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 3
    assert fake.calls == 3
    # Error responses carry no usage: tokens are those of the one good reply.
    assert result.prompt_tokens == sum(count_tokens(m["content"]) for m in fake.requests[-1]["messages"])


async def test_500_every_time_is_a_transient_error(fake: FakeLLM, meter: Meter) -> None:
    fake.fail_when(lambda body: True, Fault.status(502))
    async with make_client(fake, llm_max_retries=2) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert not info.value.permanent
    assert info.value.status == 502
    assert "502 Bad Gateway" in str(info.value)
    assert fake.calls == 3
    assert meter("briefs_llm_errors_total", purpose="brief", kind="transient") == 1  # the call
    assert meter("briefs_llm_errors_total", purpose="brief", kind="server") == 3  # its requests


async def test_401_is_permanent_and_never_leaks_the_key(fake: FakeLLM) -> None:
    fake.script(Fault.status(401))  # the fake echoes the key in its error message, like the real API
    async with make_client(fake) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    err = info.value
    assert err.permanent
    assert err.status == 401
    assert fake.calls == 1
    assert str(err) == "LLM request rejected: 401 Unauthorized (check OPENAI_API_KEY)"
    printed = "".join(traceback.format_exception(err))
    assert KEY not in printed
    assert KEY not in repr(err)


@pytest.mark.parametrize("status", [400, 403, 404, 422])
async def test_other_4xx_are_permanent(fake: FakeLLM, status: int) -> None:
    fake.script(Fault.status(status, message=f"bad thing; key was {KEY}"))
    async with make_client(fake) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert info.value.permanent
    assert str(status) in str(info.value)
    assert KEY not in str(info.value)
    assert fake.calls == 1


async def test_429_insufficient_quota_is_permanent_after_one_request(fake: FakeLLM, meter: Meter) -> None:
    fake.fail_when(lambda body: True, Fault.status(429, message="You exceeded your current quota",
                                                   error_code="insufficient_quota", retry_after=0.01))
    async with make_client(fake, llm_max_retries=3) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert (info.value.permanent, info.value.kind, info.value.attempts) == (True, "quota", 1)
    assert "429" in str(info.value) and "quota" in str(info.value)
    assert fake.calls == 1
    assert meter("briefs_llm_errors_total", purpose="brief", kind="quota") == 1


async def test_truncated_json_then_ok(fake: FakeLLM) -> None:
    fake.script(Fault.truncated())
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2
    assert fake.calls == 2


async def test_non_json_content_then_ok(fake: FakeLLM) -> None:
    fake.script(Fault.content("not json at all"))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2
    # Usage of the bad reply counts too.
    per_request = [sum(count_tokens(m["content"]) for m in r["messages"]) for r in fake.requests]
    assert result.prompt_tokens == sum(per_request)


async def test_schema_breaking_every_time_becomes_permanent(fake: FakeLLM, meter: Meter,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    fake.fail_when(lambda body: True, Fault.schema_breaking())
    async with make_client(fake, llm_max_retries=3) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert info.value.permanent and info.value.attempts == 4
    assert str(info.value).startswith("malformed LLM reply: does not match ProjectBrief")
    assert str(info.value).endswith("(after 4 attempts)")
    assert fake.calls == 4
    # Each retry is a new request of ours (the SDK saw four good HTTP replies), logged as a retry.
    assert [h["x-stainless-retry-count"] for h in fake.headers] == ["0"] * 4
    assert [r.llm_attempt for r in retries_logged(caplog)] == [1, 2, 3]  # type: ignore[attr-defined]
    assert meter("briefs_llm_errors_total", purpose="brief", kind="malformed") == 4


async def test_retries_of_both_kinds_share_one_budget(fake: FakeLLM) -> None:
    fake.script(Fault.status(500), Fault.truncated(), Fault.status(503), Fault.content("no"))
    async with make_client(fake, llm_max_retries=3) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert fake.calls == info.value.attempts == 4
    assert info.value.kind == "malformed"
    fake.reset()
    fake.script(Fault.status(500), Fault.truncated(), Fault.status(503))
    async with make_client(fake, llm_max_retries=3) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == fake.calls == 4


async def test_slow_reply_times_out_and_is_retried(fake: FakeLLM) -> None:
    fake.script(Fault.delay(2), Fault.delay(2))  # a reply at all would be a result, not this error
    async with make_client(fake, llm_timeout=0.3, llm_max_retries=1) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert not info.value.permanent
    assert str(info.value) == "LLM request failed after 2 attempts: timed out after 0.3s"
    assert fake.calls == 2


@pytest.mark.parametrize("status", [200, 429])
async def test_a_reply_trickling_in_is_cut_at_the_attempt_deadline_and_retried(fake: FakeLLM, status: int) -> None:
    # Every read is quicker than llm_timeout, yet the whole reply does not come within 2 * 0.3 + 1 s.
    fake.fail_when(lambda body: True, Fault.trickle(0.1, status))
    async with make_client(fake, llm_timeout=0.3, llm_max_retries=1) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert (info.value.kind, info.value.permanent) == ("timeout", False)
    assert str(info.value) == "LLM request failed after 2 attempts: no complete response within 1.6s"
    assert fake.calls == 2


async def test_slow_reply_then_ok(fake: FakeLLM) -> None:
    fake.script(Fault.delay(2))
    async with make_client(fake, llm_timeout=0.3) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2


async def test_dropped_connection_then_ok(fake: FakeLLM) -> None:
    fake.script(Fault.disconnect())
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 2


async def test_fail_when_rule_hits_only_matching_requests(fake: FakeLLM) -> None:
    fake.fail_when(lambda body: "Project: Doom" in json.dumps(body), Fault.status(500))
    async with make_client(fake, llm_max_retries=1) as client:
        good, bad = await asyncio.gather(
            client.complete(brief_messages("Apollo"), ProjectBrief),
            client.complete(brief_messages("Doom"), ProjectBrief),
            return_exceptions=True,
        )
    assert isinstance(good, llm.LLMResult)
    assert isinstance(bad, LLMError) and not bad.permanent
    assert fake.calls == 3


async def test_concurrency_limit_is_process_wide(fake: FakeLLM) -> None:
    fake.latency = 0.2
    first = make_client(fake, llm_concurrency=2)
    second = make_client(fake, llm_concurrency=2)  # a different instance shares the limit
    assert first.limits is second.limits is llm.PROCESS_LIMITS.get(make_settings(fake, llm_concurrency=2))
    try:
        results = await asyncio.gather(
            *(c.complete(brief_messages(f"P{i}"), ProjectBrief) for i, c in enumerate([first, second] * 3))
        )
    finally:
        await first.aclose()
        await second.aclose()
    assert len(results) == 6 and fake.calls == 6
    assert fake.max_in_flight == 2


async def test_limits_passed_in_are_the_ones_used(fake: FakeLLM) -> None:
    fake.latency = 0.05
    limits = Limits(concurrency=1)  # owned by the caller, shared by the clients it is given to
    clients = [LLMClient(make_settings(fake, llm_concurrency=8), limits=limits) for _ in range(2)]
    try:
        await asyncio.gather(*(c.complete(brief_messages(), ProjectBrief) for c in clients * 2))
    finally:
        for client in clients:
            await client.aclose()
    assert fake.calls == 4 and fake.max_in_flight == 1


async def test_no_api_key_raises_without_any_request(fake: FakeLLM) -> None:
    client = make_client(fake, openai_api_key=None)
    assert not client.enabled
    with pytest.raises(LLMError) as info:
        await client.complete(brief_messages(), ProjectBrief)
    assert info.value.permanent
    assert "no API key" in str(info.value)
    assert fake.calls == 0
    await client.aclose()


async def test_caller_http_client_is_used_and_left_open(fake: FakeLLM) -> None:
    # openai 3.x is built on httpx2, not httpx: the client handed in must be an httpx2.AsyncClient.
    async with httpx2.AsyncClient() as http:
        client = LLMClient(make_settings(fake), http_client=http, backoff_base=0.01)
        result = await client.complete(brief_messages(), ProjectBrief)
        await client.aclose()
        assert not http.is_closed
    assert result.attempts == 1
    with pytest.raises(LLMError, match="closed") as info:
        await client.complete(brief_messages(), ProjectBrief)
    assert info.value.permanent


async def test_rpm_limit_is_shared_by_the_clients_of_a_process(fake: FakeLLM) -> None:
    # llm_rpm=1: a bucket of one token, refilled after a minute. The first request takes it; another
    # client's request must wait for the refill and is not sent meanwhile.
    async with make_client(fake, llm_rpm=1) as first, make_client(fake, llm_rpm=1) as second:
        await first.complete(brief_messages(), ProjectBrief)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(second.complete(brief_messages(), ProjectBrief), timeout=0.3)
    assert fake.calls == 1


async def test_rpm_bucket_paces_requests() -> None:
    bucket = TokenBucket(capacity=2, rate=1 / 60)  # a burst of 2, then one a minute
    await bucket.acquire()
    await bucket.acquire()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(bucket.acquire(), timeout=0.05)
    with pytest.raises(ValueError):
        Limits(concurrency=0)


def test_backoff_is_full_jitter_up_to_the_cap() -> None:
    client = LLMClient(make_settings(None), backoff_base=0.5)
    assert client.backoff == Backoff(base=0.5, cap=llm.BACKOFF_CAP, jitter=1.0)


def test_idle_connection_check_sees_a_server_side_close() -> None:
    """The cheap idle-connection probe is active with the installed httpx2 and answers correctly."""
    import socket

    from briefs.llm import _socket_readable, fast_pool_checks, make_http_client

    assert fast_pool_checks(make_http_client(100))
    left, right = socket.socketpair()
    try:
        assert _socket_readable(left) is False  # idle and open: reusable
        right.close()
        assert _socket_readable(left) is True  # the peer closed it: the pool must drop it
    finally:
        left.close()


# --------------------------------------------------------------------------- error kinds


@pytest.mark.parametrize(
    ("fault", "kind", "permanent"),
    [
        (Fault.status(401), "auth", True),
        (Fault.status(403), "auth", True),
        (Fault.status(429, error_code="insufficient_quota"), "quota", True),
        (Fault.status(429), "rate_limit", False),
        (Fault.status(503), "server", False),
        (Fault.status(400), "rejected", True),
        (Fault.status(404), "rejected", True),
        (Fault.disconnect(), "connection", False),
        (Fault.delay(2), "timeout", False),
        (Fault.content("not json"), "malformed", True),
        (Fault.schema_breaking(), "malformed", True),
    ],
)
async def test_every_failure_has_a_kind_and_counts_its_requests(fake: FakeLLM, fault: Fault, kind: str,
                                                                  permanent: bool) -> None:
    fake.fail_when(lambda body: True, fault)
    async with make_client(fake, llm_max_retries=1, llm_timeout=0.3) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    err = info.value
    assert (err.kind, err.permanent) == (kind, permanent)
    assert err.attempts == fake.calls == (1 if permanent and kind != "malformed" else 2)
    assert err.kind in repr(err)
    if kind == "auth" and fault.status_code == 401:
        assert "check OPENAI_API_KEY" in str(err)


async def test_disabled_client_error_kind() -> None:
    client = make_client(None, openai_api_key=None)
    with pytest.raises(LLMError) as info:
        await client.complete(brief_messages(), ProjectBrief)
    assert info.value.kind == "disabled" and info.value.attempts == 0


# --------------------------------------------------------------------------- hostile replies


async def test_reply_strings_are_cleaned_and_clipped_lone_surrogates_included(fake: FakeLLM) -> None:
    fake.script(Fault.content(
        '{"summary": "ok\\u0000 \\ud800\\u001b[2Jdone", "risks": ["' + "r" * 5000 + '", " \\u0007 "]}'))
    async with make_client(fake) as client:
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 1
    assert result.value.summary == "ok done"
    assert len(result.value.risks[0]) == llm.REPLY_ITEM_CHARS and result.value.risks[1] == ""


@pytest.mark.parametrize(
    "content",
    [
        '{"summary": NaN}',
        '{"summary": "s", "risks": [' + ", ".join(['"r"'] * 10_000) + "]}",
        '{"summary": "s", "highlights": [{"nested": {"deep": [1, 2]}}]}',
        "[" * 50_000 + "]" * 50_000,
        '{"summary": ""}',
    ],
    ids=["nan", "10000 items", "nested objects", "deep nesting", "empty"],
)
async def test_malformed_shapes_are_malformed_errors(fake: FakeLLM, content: str) -> None:
    fake.fail_when(lambda body: True, Fault.content(content))
    async with make_client(fake, llm_max_retries=0) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert info.value.kind == "malformed" and info.value.permanent


async def test_a_huge_reply_body_is_not_parsed(fake: FakeLLM) -> None:
    fake.fail_when(lambda body: True, Fault.content('{"summary": "' + "x" * (llm.MAX_REPLY_BYTES + 10) + '"}'))
    async with make_client(fake, llm_max_retries=0) as client:
        with pytest.raises(LLMError, match="too large") as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert info.value.kind == "malformed"


# --------------------------------------------------------------------------- proxies from the environment


class RecordingProxy:
    """A tiny HTTP proxy on 127.0.0.1 that records what it was asked: CONNECT tunnels (what an https
    URL gets) and absolute-form forwarding (what an http URL gets; sent on with Connection: close)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()

    def __enter__(self) -> RecordingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        self.seen.append((method, target))
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target)
            upstream = socket.create_connection((url.hostname or "", url.port or 80))
            kept = [h for h in lines[1:] if h.split(":", 1)[0].lower() not in ("connection", "proxy-connection")]
            path = url.path + (f"?{url.query}" if url.query else "")
            new_head = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"])
            upstream.sendall(new_head.encode("latin-1") + b"\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        done = threading.Event()

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            done.set()

        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        pipe(upstream, client)
        done.wait(0.5)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingProxy]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with RecordingProxy() as proxy:
        yield proxy


async def test_http_proxy_from_the_environment_is_used(fake: FakeLLM, proxy_env: RecordingProxy,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy_env.url)
    async with make_client(fake) as client:
        assert llm.fast_pool_checks(client._openai._client)  # type: ignore[union-attr]
        result = await client.complete(brief_messages(), ProjectBrief)
    assert result.attempts == 1 and fake.calls == 1
    assert proxy_env.seen == [("POST", f"{fake.base_url}/chat/completions")]


async def test_https_proxy_from_the_environment_gets_a_connect(fake: FakeLLM, proxy_env: RecordingProxy,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy_env.url)
    base = fake.base_url.replace("http://", "https://")  # the fake speaks no TLS: the handshake fails after CONNECT
    async with make_client(fake, openai_base_url=base, llm_max_retries=0) as client:
        with pytest.raises(LLMError) as info:
            await client.complete(brief_messages(), ProjectBrief)
    assert info.value.kind == "connection"
    port = fake.base_url.split(":")[2].split("/")[0]
    assert proxy_env.seen == [("CONNECT", f"127.0.0.1:{port}")]


async def test_no_proxy_bypasses_the_proxy(fake: FakeLLM, proxy_env: RecordingProxy,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy_env.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with make_client(fake) as client:
        await client.complete(brief_messages(), ProjectBrief)
    assert fake.calls == 1 and proxy_env.seen == []
