"""The handler registry: ``job_type`` → coroutine.

Built-in types: ``noop`` (smoke checks, benchmarks, drills), ``generate_daily_brief``
and ``send_brief_email``. More can be plugged in with ``BRIEFS_HANDLER_MODULES``:
a comma-separated list of modules, each exporting ``HANDLERS: dict[str, Handler]``.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from briefs.errors import PermanentError
from briefs.settings import Settings
from worker.queue import short_repr
from worker.runner import Handler, JobContext


async def noop(ctx: JobContext) -> dict[str, Any] | None:
    """Payload ``{"sleep_ms": int, "fail": bool}``, both optional.

    A payload that can never run (not an object, a value of the wrong type, a sleep
    longer than the job's timeout) fails at once, permanently.
    """
    payload = ctx.job.payload
    if not isinstance(payload, dict):
        raise PermanentError(f"noop: payload must be a JSON object, got {type(payload).__name__}")
    sleep_ms = payload.get("sleep_ms", 0)
    fail = payload.get("fail", False)
    if not isinstance(sleep_ms, int) or isinstance(sleep_ms, bool) or sleep_ms < 0:
        raise PermanentError(f"noop: sleep_ms must be a non-negative integer, got {short_repr(sleep_ms)}")
    if sleep_ms >= ctx.settings.job_timeout * 1000:
        raise PermanentError(
            f"noop: sleep_ms {short_repr(sleep_ms)} is not shorter than the job timeout "
            f"({ctx.settings.job_timeout:g}s, BRIEFS_JOB_TIMEOUT)"
        )
    if not isinstance(fail, bool):
        raise PermanentError(f"noop: fail must be true or false, got {short_repr(fail)}")
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    if fail:
        raise RuntimeError("noop was asked to fail")
    return None


def builtin_handlers() -> dict[str, Handler]:
    from worker import brief_handlers

    return {"noop": Handler(noop), **brief_handlers.HANDLERS}


def build_handlers(settings: Settings) -> dict[str, Handler]:
    handlers = builtin_handlers()
    for name in settings.handler_modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PermanentError(f"BRIEFS_HANDLER_MODULES: cannot import {name!r}: {exc}") from exc
        extra = getattr(module, "HANDLERS", None)
        if not isinstance(extra, dict):
            raise PermanentError(f"BRIEFS_HANDLER_MODULES: {name!r} has no HANDLERS dict")
        handlers.update(extra)
    return handlers
