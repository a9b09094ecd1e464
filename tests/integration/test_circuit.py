"""The LLM circuit breaker end to end: real PostgreSQL, the real worker, the real SDK against FakeLLM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from briefs.app.cli import main
from briefs.circuit import CircuitBreaker, CircuitConfig, SharedCircuit, circuit_key
from briefs.llm import LLMClient
from briefs.settings import Settings
from tests.fakellm import FakeLLM, Fault


class Clock:
    """Epoch seconds that move only when told (the breaker's cooldowns without sleeping)."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _no_circuits_left(database_url: str) -> Iterator[None]:
    yield
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM llm_circuit")


def shared(settings: Settings, clock: Clock | None = None, *, cache_seconds: float = 1.5,
           **config: Any) -> SharedCircuit:
    breaker = CircuitBreaker(CircuitConfig(**config), clock=clock) if clock else CircuitBreaker(CircuitConfig(**config))
    return SharedCircuit.of(settings, breaker, cache_seconds=cache_seconds)


def client(settings: Settings, circuit: SharedCircuit) -> dict[str, object]:
    return {"llm": LLMClient(settings, backoff_base=0.01, backoff_cap=0.05, circuit=circuit)}


def projects(seed: Any, name: str, n: int) -> int:
    uid = seed.user(name)
    today = datetime.now(UTC).date()
    for i in range(n):
        seed.busy_project(uid, f"{name} project {i:02d}", today)
    return uid


def refused(purpose: str) -> float:
    return REGISTRY.get_sample_value("briefs_llm_circuit_refused_total", {"purpose": purpose}) or 0.0


async def circuit_row(h: Any, settings: Settings) -> dict[str, Any]:
    [row] = await h.rows("SELECT * FROM llm_circuit WHERE circuit_key = %s", circuit_key(settings))
    return row


async def test_a_failing_provider_gets_a_handful_of_calls_and_briefs_are_on_time(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    first, second = projects(brief_seed, "Ada", 20), projects(brief_seed, "Bob", 3)
    fake_llm.fail_when(lambda body: True, Fault.status(500))
    settings = h.settings(fake_llm)
    circuit = shared(settings)  # the defaults: open after 5 failures in a row
    await h.enqueue(first)
    await h.run(settings, services=client(settings, circuit))

    calls = fake_llm.calls
    assert calls <= 5 + settings.llm_brief_concurrency  # the run that opened it, and what was in flight
    brief = await h.brief(first)
    assert brief["status"] == "partial" and brief["completed_at"] is not None
    sections = await h.sections(brief["id"])
    assert len(sections) == 20 and {s["metadata"]["source"] for s in sections} == {"fallback"}
    assert sum(s["metadata"]["error_kind"] == "circuit_open" for s in sections) >= 20 - calls
    meta = brief["metadata"]
    assert meta["llm_circuit"]["state"] == "open" and "500" in meta["llm_circuit"]["reason"]
    assert meta["note"].startswith("the LLM provider is unavailable (circuit open since ")
    assert meta["note"].endswith("this brief was written without AI")
    assert meta["summary_source"] == "fallback" and meta["summary_error_kind"] == "circuit_open"
    [job] = await h.jobs()
    assert job["status"] == "completed" and job["attempts"] == 1
    row = await circuit_row(h, settings)
    assert row["state"] == "open" and not row["sticky"] and row["next_probe_at"] > row["since"]

    # A second brief, due now, while the circuit is open: not a single call, written and marked.
    before = refused("project_brief"), refused("executive_summary")
    await h.enqueue(second)
    await h.run(settings, services=client(settings, circuit))
    assert fake_llm.calls == calls
    assert (refused("project_brief") - before[0], refused("executive_summary") - before[1]) == (3, 1)
    other = await h.brief(second)
    assert other["completed_at"] is not None and other["metadata"]["llm_requests"] == 0
    assert other["metadata"]["llm_circuit"]["state"] == "open"
    assert {s["metadata"]["error_kind"] for s in await h.sections(other["id"])} == {"circuit_open"}


async def test_another_process_honours_the_open_circuit_it_reads(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    uid = projects(brief_seed, "Ada", 2)
    fake_llm.fail_when(lambda body: True, Fault.status(503))
    settings = h.settings(fake_llm)
    opener = shared(settings, failures=1)
    await h.enqueue(uid)
    await h.run(settings, services=client(settings, opener))
    assert (await circuit_row(h, settings))["state"] == "open"
    calls = fake_llm.calls

    fake_llm.reset()  # the provider is fine again, but the circuit's cooldown is not over
    other_process = shared(settings)  # a fresh breaker, closed: only the table says open
    uid2 = projects(brief_seed, "Bob", 2)
    await h.enqueue(uid2)
    await h.run(settings, services=client(settings, other_process))
    assert fake_llm.calls == 0 and calls > 0
    assert (await h.brief(uid2))["metadata"]["llm_circuit"]["state"] == "open"


async def test_after_the_cooldown_one_probe_goes_out_and_success_closes(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    clock = Clock()
    settings = h.settings(fake_llm, llm_max_retries=0)
    circuit = shared(settings, clock, failures=1, cooldown=60)
    fake_llm.fail_when(lambda body: True, Fault.status(500))
    uid = projects(brief_seed, "Ada", 1)
    await h.enqueue(uid)
    await h.run(settings, services=client(settings, circuit))
    assert fake_llm.calls == 1 and circuit.breaker.state == "open"

    fake_llm.reset()
    clock.now += 59
    uid2 = projects(brief_seed, "Bob", 1)
    await h.enqueue(uid2)
    await h.run(settings, services=client(settings, circuit))
    assert fake_llm.calls == 0  # still cooling down

    clock.now += 1
    uid3 = projects(brief_seed, "Cy", 1)
    await h.enqueue(uid3)
    await h.run(settings, services=client(settings, circuit))
    # The probe (the project's section) succeeded and closed the circuit; then the summary went too.
    assert fake_llm.calls == 2
    assert circuit.breaker.state == "closed"
    brief = await h.brief(uid3)
    assert brief["status"] == "completed" and "llm_circuit" not in brief["metadata"]
    assert (await circuit_row(h, settings))["state"] == "closed"


async def test_credentials_refused_open_until_reset(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM, cli: Any
) -> None:
    h = briefs_harness
    clock = Clock()
    fake_llm.expected_key = "another-key"  # every request: 401
    settings = h.settings(fake_llm)
    circuit = shared(settings, clock, cache_seconds=0)  # reads the row at every brief (a reset shows at once)
    uid = projects(brief_seed, "Ada", 3)
    await h.enqueue(uid)
    await h.run(settings, services=client(settings, circuit))
    calls = fake_llm.calls
    assert calls <= settings.llm_brief_concurrency  # the first 401 opens it: only what was in flight
    row = await circuit_row(h, settings)
    assert row["state"] == "open" and row["sticky"] and row["next_probe_at"] is None
    assert "401" in row["reason"]

    clock.now += 30 * 86_400  # no automatic probe, however long
    uid2 = projects(brief_seed, "Bob", 1)
    await h.enqueue(uid2)
    await h.run(settings, services=client(settings, circuit))
    assert fake_llm.calls == calls

    code, out, _ = await cli(settings, "status", "--json")
    assert code == 0
    status = json.loads(out)["llm_circuit"]
    assert status["state"] == "open" and status["sticky"] and "401" in status["reason"]
    assert status["since"] and status["next_probe_at"] is None
    code, out, _ = await cli(settings, "status")
    assert "LLM circuit: open since" in out and "briefs llm reset" in out

    code, out, _ = await cli(settings, "llm", "reset")
    assert code == 0 and "closed" in out
    assert (await circuit_row(h, settings))["state"] == "closed"
    fake_llm.expected_key = None
    uid3 = projects(brief_seed, "Cy", 1)
    await h.enqueue(uid3)
    await h.run(settings, services=client(settings, circuit))
    assert fake_llm.calls == calls + 2  # the process adopted the reset: the project and the summary
    assert circuit.breaker.state == "closed"
    code, out, _ = await cli(settings, "status", "--json")
    assert json.loads(out)["llm_circuit"]["state"] == "closed"


async def test_a_brief_far_from_its_notify_at_is_deferred_without_spending_an_attempt(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    settings = h.settings(fake_llm)
    circuit = shared(settings, failures=1)
    circuit.breaker.record("failure", "503 Service Unavailable")  # open: next probe in 30 s
    uid = projects(brief_seed, "Ada", 2)
    notify_at = datetime.now(UTC) + timedelta(hours=3)
    await h.enqueue(uid, notify_at=notify_at, max_attempts=1)
    await h.run(settings, services=client(settings, circuit))

    assert fake_llm.calls == 0
    assert await h.rows("SELECT id FROM daily_briefs WHERE user_id = %s", uid) == []
    [job] = await h.jobs()
    assert job["status"] == "pending" and job["attempts"] == 0  # its only attempt is still there
    assert "deferred" in job["last_error"] and "circuit" in job["last_error"]
    probe = circuit.breaker.snapshot().next_probe_at
    assert probe is not None
    assert abs(job["run_at"].timestamp() - probe) < 5  # runs again when the probe is due

    # When it runs again near its notify_at with the circuit still open, it is written now, marked.
    await h.rows("UPDATE queue_jobs SET run_at = now(), notify_at = now(), "
                 "payload = jsonb_set(payload, '{notify_at}', to_jsonb(now()::text)) RETURNING id")
    await h.run(settings, services=client(settings, circuit))
    [job] = await h.jobs()
    assert job["status"] == "completed" and job["attempts"] == 1
    assert (await h.brief(uid))["metadata"]["llm_circuit"]["state"] == "open"
    assert fake_llm.calls == 0


async def test_malformed_replies_do_not_open_the_circuit(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    settings = h.settings(fake_llm)
    circuit = shared(settings, failures=2, min_calls=4)
    fake_llm.fail_when(lambda body: True, Fault.content("Sure! Here it is: not JSON at all"))
    uid = projects(brief_seed, "Ada", 4)
    await h.enqueue(uid)
    await h.run(settings, services=client(settings, circuit))
    assert fake_llm.calls == 5 * (settings.llm_max_retries + 1)  # every call, every retry: sent
    assert circuit.breaker.state == "closed"
    brief = await h.brief(uid)
    assert "llm_circuit" not in brief["metadata"]
    assert {s["metadata"]["error_kind"] for s in await h.sections(brief["id"])} == {"malformed"}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(database_url: str, capsys: Any, monkeypatch: Any) -> Any:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in list(os.environ):
        if name.startswith(("BRIEFS_", "OPENAI_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir("/")  # no .env
    monkeypatch.setenv("DATABASE_URL", database_url)

    async def run(settings: Settings, *args: str) -> tuple[int, str, str]:
        """The command in a thread of its own (it runs its own event loop)."""
        assert settings.openai_api_key is not None and settings.openai_base_url is not None
        monkeypatch.setenv("OPENAI_API_KEY", settings.openai_api_key.get_secret_value())
        monkeypatch.setenv("OPENAI_BASE_URL", settings.openai_base_url)
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run
