"""Errors shared by every part. The worker decides retry vs fail with :func:`is_permanent`."""

from __future__ import annotations

import psycopg


class PermanentError(Exception):
    """Retrying cannot help (bad payload, missing row, rejected request): fail the job now."""

    permanent = True


class RetryLater(Exception):
    """Transient: retry after ``delay`` seconds (consumes an attempt)."""

    permanent = False

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class Defer(RetryLater):
    """Not now, and not a failure: run the job again after ``delay`` seconds without spending an attempt.

    The worker sees ``refund`` and records the run as deferred (``worker.queue.fail(refund=True)``: pending
    again at now + ``delay``, its attempt given back, counted apart from failures), so a job deferred any
    number of times still has all its attempts for real failures.
    """

    refund = True


# Errors that the same input raises again on every retry: arithmetic out of range (a date
# past year 9999: OverflowError), structures nested too deeply, text that is not valid
# Unicode, and values PostgreSQL or psycopg refuse (SQLSTATE class 22, "data exception", and
# psycopg's own DataError for a value Python cannot represent).
NEVER_SUCCEEDS: tuple[type[BaseException], ...] = (ArithmeticError, RecursionError, UnicodeError, psycopg.DataError)


def is_permanent(error: BaseException) -> bool:
    """Whether retrying the job can never help.

    An explicit ``permanent`` attribute decides (:class:`PermanentError`, :class:`RetryLater`,
    a library's own flag); otherwise the kinds in :data:`NEVER_SUCCEEDS` are permanent, and an
    exception group is permanent when every error in it is. Anything else (timeouts, connection
    errors, 5xx, unexpected bugs) is transient and retried with backoff until ``max_attempts``.
    """
    flag = getattr(error, "permanent", None)
    if flag is not None:
        return bool(flag)
    if isinstance(error, BaseExceptionGroup):
        return bool(error.exceptions) and all(is_permanent(e) for e in error.exceptions)
    return isinstance(error, NEVER_SUCCEEDS)
