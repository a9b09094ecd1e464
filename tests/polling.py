"""Poll until something holds: the suite's one helper for it, blocking and asyncio forms.

``wait_for(condition, timeout, what)`` calls ``condition()`` until its value is truthy and
returns that value. After ``timeout`` seconds it fails with an ``AssertionError`` naming
``what`` and the last value seen, so a failure says what was still missing::

    wait_for(lambda: statuses(url), 60, "5,000 completed jobs", accept=lambda s: s == {"completed": 5000})

``accept`` (default ``bool``) decides whether a value is the one waited for; with it the
condition can return the whole observation (a status map, an HTTP answer) and the failure
shows it. ``wait_for_async`` is the same for a running event loop: it sleeps with
``asyncio.sleep`` and awaits the condition's value when it is awaitable, so a plain function,
an ``async def`` or a lambda returning a coroutine all work.

The timeout only bounds how long a test waits before failing instead of hanging: it is never
the thing tested, so give it a generous value.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

SHOWN_CHARS = 500  # of the last value's repr in a failure message


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    accept: Callable[[Any], object] = bool,
    interval: float = 0.05,
) -> Any:
    """Call ``condition()`` every ``interval`` seconds until ``accept`` takes its value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if accept(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, what, value))
        time.sleep(interval)


async def wait_for_async(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "the condition",
    *,
    accept: Callable[[Any], object] = bool,
    interval: float = 0.02,
) -> Any:
    """:func:`wait_for` without blocking the event loop; an awaitable value of ``condition()`` is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if accept(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(timeout, what, value))
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: str, value: Any) -> str:
    shown = repr(value)
    if len(shown) > SHOWN_CHARS:
        shown = f"{shown[:SHOWN_CHARS]}… ({len(shown):,} chars)"
    return f"timed out after {timeout:g}s waiting for {what}; last value seen: {shown}"
