"""Process plumbing for the entry points: signals and the asyncio main."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


def install_stop_signals(soft: Callable[[], None], hard: Callable[[], None]) -> None:
    """First SIGTERM/SIGINT calls ``soft`` (graceful stop); a second calls ``hard`` (exit now)."""
    loop = asyncio.get_running_loop()
    count = 0

    def handle(signame: str) -> None:
        nonlocal count
        count += 1
        if count == 1:
            log.info("%s received: shutting down gracefully (send again to exit at once)", signame)
            soft()
        else:
            log.warning("%s received again: exiting now", signame)
            hard()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig.name)


def exit_now(code: int = 1) -> None:
    """Leave without running cleanup (second signal)."""
    logging.shutdown()
    os._exit(code)
