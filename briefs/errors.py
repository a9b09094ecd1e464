"""Errors shared by every part. The worker decides retry vs fail from ``permanent``."""

from __future__ import annotations


class PermanentError(Exception):
    """Retrying cannot help (bad payload, missing row, rejected request): fail the job now."""

    permanent = True


class RetryLater(Exception):
    """Transient: retry after ``delay`` seconds (consumes an attempt)."""

    permanent = False

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay
