"""The handler registry: ``job_type`` → coroutine.

The worker's own type is ``noop`` (smoke checks, benchmarks, drills). The application's
handlers are handed in by whoever composes the process (the brief domain's come from
``briefs.jobs`` through ``briefs.app``); operators can plug in more with
``BRIEFS_HANDLER_MODULES``: a comma-separated list of modules, each exporting
``HANDLERS: dict[str, Handler]``.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Mapping
from typing import Any

from briefs.errors import PermanentError
from briefs.settings import Settings
from briefs.terminal import one_line
from worker.queue import MAX_JOB_TYPE_CHARS, short_repr
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
    """The worker's own handlers (``noop``)."""
    return {"noop": Handler(noop)}


def build_handlers(settings: Settings, *registries: Mapping[str, Handler]) -> dict[str, Handler]:
    """The built-in handlers, then each of ``registries``, then those of ``BRIEFS_HANDLER_MODULES``.

    A module that cannot be imported (whatever it raises, ``SystemExit`` included), or whose
    ``HANDLERS`` is not a dict of job type (a non-empty string) to :class:`Handler` with a
    finite positive timeout or none, is refused with one line naming it: the worker does not start.
    """
    handlers = builtin_handlers()
    for registry in registries:
        handlers.update(registry)
    for name in settings.handler_modules:
        shown = short_repr(name)
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit) as exc:  # any failure at import is the module's, not the worker's
            raise PermanentError(
                f"BRIEFS_HANDLER_MODULES: cannot import {shown}: {type(exc).__name__}: {one_line(str(exc), 200)}"
            ) from exc
        extra = getattr(module, "HANDLERS", None)
        if not isinstance(extra, dict):
            raise PermanentError(f"BRIEFS_HANDLER_MODULES: {shown} has no HANDLERS dict")
        for job_type, handler in extra.items():
            problem = _handler_problem(job_type, handler)
            if problem:
                raise PermanentError(f"BRIEFS_HANDLER_MODULES: {shown}: HANDLERS[{short_repr(job_type)}] {problem}")
        handlers.update(extra)
    return handlers


def _handler_problem(job_type: object, handler: object) -> str | None:
    if not isinstance(job_type, str) or not job_type.strip() or len(job_type) > MAX_JOB_TYPE_CHARS:
        return f"is not keyed by a job type (a non-empty string of at most {MAX_JOB_TYPE_CHARS} characters)"
    if not isinstance(handler, Handler):
        return f"is of type {type(handler).__name__}, not a worker.runner.Handler"
    if not callable(handler.fn):
        return f"is a Handler whose function is {short_repr(handler.fn)}, not callable"
    timeout = handler.timeout
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
    ):
        return f"has the timeout {short_repr(timeout)}, not a positive number of seconds or None"
    return None
