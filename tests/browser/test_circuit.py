"""The overview's LLM panel shows the circuit breaker's state, kept up to date by the live stats."""

from __future__ import annotations

from typing import Any

from playwright.async_api import expect

from tests.browser.conftest import ConsoleServer, login


async def test_the_llm_panel_shows_the_circuit(page: Any, console_server: ConsoleServer) -> None:
    await login(page, console_server, "/")
    state = page.locator("#llm [data-field='llm.circuit.state']")
    await expect(page.locator("#overview .live")).to_be_visible(timeout=5_000)  # the live stats are in
    # The console runs without an API key: no circuit, and the live update says so in the same words.
    await expect(state).to_have_text("disabled")
    await expect(state).to_have_class("status status-unknown")
    await expect(page.locator("#llm [data-field='llm.circuit.detail']")).to_have_text("disabled")
