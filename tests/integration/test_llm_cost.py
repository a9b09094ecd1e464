"""LLM cost accounting and the daily budget: real Postgres, the real worker, FakeLLM's token counts."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from briefs import email as brief_email
from briefs import metrics
from briefs.render import BUDGET_NOTICE
from tests.fakellm import FakeLLM, default_responder
from tests.integration.test_generator import NAMES, seed_five

PRICES = {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}


def _cost(prompt: int, completion: int, price: dict[str, float]) -> float:
    return (prompt * price["input"] + completion * price["output"]) / 1_000_000


async def _spend_today(h: Any, cost: str, *, days_ago: int = 0) -> None:
    """Another user's brief, finished today (or ``days_ago``) at ``cost``."""
    async with h.db.raw() as conn:
        await conn.execute("INSERT INTO users (email, name) VALUES ('spender@example.com', 'Spender')")
        await conn.execute(
            """INSERT INTO daily_briefs (user_id, brief_date, status, cost, completed_at)
               SELECT id, current_date, 'completed', %s::numeric, now() - make_interval(days => %s)
               FROM users WHERE email = 'spender@example.com'""",
            (cost, days_ago),
        )


async def test_every_section_and_the_brief_cost_what_their_tokens_are_priced_at(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    settings = h.settings(fake_llm, llm_prices=PRICES, llm_currency="EUR")
    counted = metrics.LLM_COST.labels("gpt-4o-mini")._value.get()
    await h.enqueue(uid)
    await h.run(settings)

    brief = await h.brief(uid)
    price = PRICES["gpt-4o-mini"]
    sections = await h.sections(brief["id"])
    assert [s["name"] for s in sections] == NAMES
    total = 0.0
    for s in sections:
        meta = s["metadata"]
        assert meta["source"] == "llm" and meta["prompt_tokens"] > 0 and meta["completion_tokens"] > 0
        assert meta["cost"] == pytest.approx(_cost(meta["prompt_tokens"], meta["completion_tokens"], price))
        assert meta["cost_model"] == "gpt-4o-mini" and meta["currency"] == "EUR"
        total += meta["cost"]
    meta = brief["metadata"]
    summary_cost = _cost(meta["summary_prompt_tokens"], meta["summary_completion_tokens"], price)
    assert meta["summary_cost"] == pytest.approx(summary_cost)
    assert isinstance(brief["cost"], Decimal) and float(brief["cost"]) == pytest.approx(total + summary_cost)
    assert float(brief["cost"]) == pytest.approx(_cost(brief["prompt_tokens"], brief["completion_tokens"], price))
    assert meta["cost_currency"] == "EUR"
    [job] = await h.jobs("generate_daily_brief")
    assert job["result"]["cost"] == pytest.approx(float(brief["cost"]))
    assert metrics.LLM_COST.labels("gpt-4o-mini")._value.get() - counted == pytest.approx(float(brief["cost"]))


async def test_a_fixed_usage_is_priced_exactly(briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, llm_prices={"gpt-4o-mini": {"input": 2, "output": 4}}))

    brief = await h.brief(uid)
    assert brief["prompt_tokens"] == 6000 and brief["completion_tokens"] == 3000  # five sections and the summary
    assert brief["cost"] == Decimal("0.024")


async def test_a_model_without_a_price_counts_its_tokens_and_an_unknown_cost(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    unpriced = metrics.LLM_UNPRICED._value.get()
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, llm_prices={"another-model": {"input": 1, "output": 1}}))
    assert metrics.LLM_UNPRICED._value.get() - unpriced == len(NAMES) + 1

    brief = await h.brief(uid)
    assert brief["status"] == "completed"
    assert brief["prompt_tokens"] > 0 and brief["completion_tokens"] > 0
    assert brief["cost"] is None  # unknown, not 0
    for s in await h.sections(brief["id"]):
        assert s["metadata"]["prompt_tokens"] > 0 and s["metadata"]["cost"] is None
        assert s["metadata"]["cost_model"] is None
    assert brief["metadata"]["summary_cost"] is None


async def test_a_brief_without_llm_calls_costs_nothing(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    await h.enqueue(uid)
    await h.run(h.settings(llm_prices=PRICES))
    brief = await h.brief(uid)
    assert brief["prompt_tokens"] == 0 and brief["cost"] == 0


async def test_a_spent_daily_budget_writes_the_next_brief_without_ai(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    await _spend_today(h, "1.5")
    await h.enqueue(uid)
    with caplog.at_level(logging.WARNING, logger="briefs.generator"):
        await h.run(h.settings(fake_llm, llm_prices=PRICES, llm_daily_budget=1.5))

    assert fake_llm.requests == []  # not one LLM call
    brief = await h.brief(uid)
    assert brief["status"] == "completed" and brief["cost"] == 0 and brief["prompt_tokens"] == 0
    sections = await h.sections(brief["id"])
    assert {s["metadata"]["reason"] for s in sections} == {"daily budget reached"}
    meta = brief["metadata"]
    assert meta["mode"] == "deterministic" and meta["summary_reason"] == "daily budget reached"
    assert meta["llm_budget"] == {"budget": 1.5, "spent": 1.5, "currency": "USD",
                                  "day": datetime.now(UTC).date().isoformat()}
    assert "daily LLM budget (1.5 USD) was reached" in meta["note"]
    assert BUDGET_NOTICE in brief["summary_markdown"]
    assert "No LLM is configured" not in brief["summary_markdown"]
    budget_lines = [r for r in caplog.records if "daily budget" in r.getMessage()]
    assert len(budget_lines) == 1 and str(uid) in budget_lines[0].getMessage()

    # The email says it too (text and HTML).
    mail_settings = h.settings(fake_llm, smtp_url="smtp://127.0.0.1:25", secret_key="k" * 32)
    async with h.db.raw() as conn:
        loaded = await brief_email.load(conn, uid, brief["brief_date"], lock=False)
    assert loaded is not None and loaded.over_budget
    mail = brief_email.build_email(brief_email.EmailConfig.from_settings(mail_settings), loaded, datetime.now(UTC))
    assert BUDGET_NOTICE in mail.text and "daily AI budget has been reached" in mail.html
    assert "No LLM is configured" not in mail.text


async def test_a_budget_reached_during_a_brief_does_not_stop_it(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    first = seed_five(brief_seed)
    settings = h.settings(fake_llm, llm_prices=PRICES, llm_daily_budget=1e-9)  # spent by the first call
    await h.enqueue(first)
    await h.run(settings)
    brief = await h.brief(first)
    assert brief["status"] == "completed" and float(brief["cost"]) > 1e-9
    assert {s["metadata"]["source"] for s in await h.sections(brief["id"])} == {"llm"}
    assert brief["metadata"]["summary_source"] == "llm" and "llm_budget" not in brief["metadata"]
    calls = len(fake_llm.requests)
    assert calls == len(NAMES) + 1

    second = seed_five(brief_seed)
    await h.enqueue(second)
    await h.run(settings)
    assert len(fake_llm.requests) == calls  # the next brief: the budget is spent
    assert (await h.brief(second))["metadata"]["mode"] == "deterministic"


async def test_a_budget_spent_by_another_process_mid_brief_does_not_stop_it(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    """At the first section's call, another worker's brief spends the whole budget: this brief still uses
    the LLM to its end (the budget is checked once, at its start)."""
    h = briefs_harness
    uid = seed_five(brief_seed)
    spent = threading.Event()

    def respond(body: dict[str, Any]) -> str:
        if not spent.is_set():
            spent.set()
            with psycopg.connect(h.database_url, autocommit=True) as conn:
                conn.execute("INSERT INTO users (email, name) VALUES ('other@example.com', 'Other')")
                conn.execute("""INSERT INTO daily_briefs (user_id, brief_date, status, cost, completed_at)
                                SELECT id, current_date, 'completed', 50, now() FROM users
                                WHERE email = 'other@example.com'""")
        return default_responder(body)

    fake_llm.responder = respond
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, llm_prices=PRICES, llm_daily_budget=1, llm_brief_concurrency=1))
    assert spent.is_set()
    brief = await h.brief(uid)
    assert len(fake_llm.requests) == len(NAMES) + 1  # every section and the summary
    assert brief["status"] == "completed" and brief["metadata"]["mode"] == "llm"
    assert {s["metadata"]["source"] for s in await h.sections(brief["id"])} == {"llm"}


async def test_the_next_utc_day_uses_the_llm_again(briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    await _spend_today(h, "100", days_ago=1)  # yesterday's spend does not count today
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, llm_prices=PRICES, llm_daily_budget=1))
    brief = await h.brief(uid)
    assert len(fake_llm.requests) == len(NAMES) + 1
    assert brief["metadata"]["mode"] == "llm" and float(brief["cost"]) > 0
