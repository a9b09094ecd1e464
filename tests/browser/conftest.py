"""Browser tests: real headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) against a
real ``briefs web`` process over the test database.

Every page a test opens is watched: a Content-Security-Policy violation reported on the console (an inline
script or style slipped in), an uncaught script error, or any dialog (``alert`` from injected markup) fails
the test. Skipped, with the reason, when Chromium is not installed (CI installs it).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.helpers import REPO, clean_env
from tests.polling import wait_for

CHROMIUM = Path("/usr/bin/chromium")
DOCS = REPO / "docs"
SECRET_KEY = "browser-test-secret-" + "k" * 24


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _briefs_cmd() -> list[str]:
    script = Path(sys.executable).with_name("briefs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "briefs"]


@dataclass
class ConsoleServer:
    """``briefs web`` in a child process: its URL, its admin token, its log."""

    url: str
    token: str
    database_url: str
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_burst(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``briefs worker --burst``: another process drains what is runnable now, then exits."""
        done = subprocess.run(
            [*_briefs_cmd(), "worker", "--burst"], cwd=REPO, env=clean_env(self.database_url, LOG_LEVEL="INFO"),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
        assert done.returncode == 0, f"the burst worker failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return done


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def console_server(database_url: str) -> Iterator[ConsoleServer]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt install chromium): the browser tests need it")
    port, token = _free_port(), secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}"
    env = clean_env(database_url, ADMIN_TOKEN=token, SECRET_KEY=SECRET_KEY, PUBLIC_URL=url, LOG_LEVEL="INFO")
    log = tempfile.NamedTemporaryFile(prefix="briefs-web-", suffix=".log", delete=False)
    proc = subprocess.Popen([*_briefs_cmd(), "web", "--port", str(port)], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    server = ConsoleServer(url, token, database_url, Path(log.name), proc)
    try:
        wait_for(lambda: proc.poll() is not None or _ready(url), 30, "the console to answer /readyz")
        assert proc.poll() is None, f"briefs web exited early ({proc.returncode}):\n{server.log()}"
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="session")
async def browser(console_server: ConsoleServer) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Watched:
    """What the page reported that no page of the console may ever report."""

    csp: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def on_console(self, message: Any) -> None:
        text = message.text
        if "Content Security Policy" in text or "Content-Security-Policy" in text:
            self.csp.append(text)

    def on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")

    def assert_clean(self) -> None:
        assert self.dialogs == [], f"a dialog opened (injected script ran): {self.dialogs}"
        assert self.csp == [], f"CSP violations reported: {self.csp}"
        assert self.errors == [], f"uncaught script errors: {self.errors}"


@pytest.fixture
async def watched() -> Watched:
    return Watched()


@pytest.fixture
async def page(browser: Any, console_server: ConsoleServer, clean_db: str, watched: Watched) -> AsyncIterator[Any]:
    """A fresh browser context (no cookies) over empty tables; every page event is watched."""
    context = await browser.new_context(base_url=console_server.url, viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    tab.on("console", watched.on_console)
    tab.on("pageerror", lambda exc: watched.errors.append(str(exc)))
    tab.on("dialog", watched.on_dialog)
    try:
        yield tab
    finally:
        await context.close()
    watched.assert_clean()


async def login(page: Any, server: ConsoleServer, next_path: str = "/") -> None:
    """Log in through the login form, as an operator does."""
    await page.goto(next_path)
    assert "/login" in page.url, f"an unauthenticated visit should land on the login page, got {page.url}"
    await page.fill("input[name=token]", server.token)
    await page.click("form[action='/login'] button[type=submit]")
    await page.wait_for_url(f"{server.url}{next_path}")


def sql(url: str, statement: str, params: Any = None) -> list[dict[str, Any]]:
    """One statement on a connection of its own (another process than the server, as far as it knows)."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []


def screenshot_path(name: str) -> Path:
    """Where a test saves a page's picture: ``docs/<name>`` (the README's pictures) when
    ``BRIEFS_UPDATE_SCREENSHOTS=1``, else the temporary directory (the page is still drawn whole)."""
    if os.environ.get("BRIEFS_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        return DOCS / name
    return Path(tempfile.gettempdir()) / f"briefs-{name}"
