"""The backoff policy's SQL form (the rescue computes delays row by row) agrees with its Python form."""

from __future__ import annotations

import psycopg
import pytest

from briefs.backoff import Backoff


@pytest.mark.parametrize("attempts", [-3, 0, 1, 2, 5, 40, 2**31 - 1])
def test_the_sql_form_stays_within_the_python_bounds(database_url: str, attempts: int) -> None:
    policy = Backoff(base=0.05, cap=1.0, jitter=0.5)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT {policy.sql('%(attempts)s::int')} FROM generate_series(1, 200)",
            {"attempts": attempts, **policy.sql_params()},
        ).fetchall()
    ceiling = policy.ceiling(attempts)
    delays = [row[0] for row in rows]
    assert all(ceiling / 2 - 1e-9 <= d <= ceiling + 1e-9 for d in delays)
    assert len(set(delays)) > 1  # jittered, row by row
