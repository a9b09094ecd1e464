"""The one backoff policy: how long to wait before try number ``n`` after ``n - 1`` failures.

Every place that waits after a failure uses a :class:`Backoff`: job retries
(in Python for a handler's failure, in SQL for a rescued lease), reconnecting
to the database, re-establishing LISTEN, and re-asking the LLM after a reply it
could not use. The delay doubles from ``base`` up to ``cap``; ``jitter`` is the
random share taken off it, so that processes failing together do not retry
together: 0 waits exactly the ceiling, 0.5 waits between half and all of it,
1 waits anywhere from nothing to all of it ("full jitter").

The exponent is capped, so a failure count of any size (a hostile ``attempts``
column) gives ``cap``, never an overflow. :meth:`Backoff.sql` is the same
formula for a statement that computes the delay row by row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_EXPONENT = 60  # 2**60 times any positive base is far past any cap


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter. ``attempt`` counts from 1 (the first retry)."""

    base: float
    cap: float
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in ("base", "cap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"backoff {name} must be a positive number of seconds, not {value!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be between 0 and 1, not {self.jitter!r}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt``: ``base * 2**(attempt - 1)``, at most ``cap``."""
        exponent = min(max(attempt - 1, 0), MAX_EXPONENT)
        return min(self.cap, self.base * 2.0**exponent)

    def delay(self, attempt: int, *, rng: Callable[[], float] = random.random) -> float:
        """A wait for retry number ``attempt``: the ceiling, less a random share of ``jitter`` of it."""
        ceiling = self.ceiling(attempt)
        return ceiling * (1.0 - self.jitter * rng())

    def sql(self, attempts: str) -> str:
        """The same formula as a SQL expression of seconds over the column or expression ``attempts``.

        Its parameters are named ``backoff_base``, ``backoff_cap`` and ``backoff_jitter``: pass
        :meth:`sql_params` with the statement's own.
        """
        return (
            "(least(%(backoff_cap)s::float8, %(backoff_base)s::float8 * 2.0 ^ least(greatest("
            f"({attempts}) - 1, 0), {MAX_EXPONENT})) * (1.0 - %(backoff_jitter)s::float8 * random()))"
        )

    def sql_params(self) -> dict[str, Any]:
        return {"backoff_base": self.base, "backoff_cap": self.cap, "backoff_jitter": self.jitter}


def job_retry(base: float, cap: float) -> Backoff:
    """A failed job's wait before its next attempt (``BRIEFS_RETRY_BASE``, ``BRIEFS_RETRY_MAX``)."""
    return Backoff(base=base, cap=cap, jitter=0.5)


# Reconnecting to the database (the claim loop, LISTEN): fast first, then every half minute at most.
RECONNECT = Backoff(base=0.25, cap=30.0, jitter=0.5)
