"""Connection pool benchmark: the cost of one short transaction through ``Database.raw()``.

    .venv/bin/python bench/pool_bench.py                      # 5 rounds of 5,000 transactions
    .venv/bin/python bench/pool_bench.py -n 20000 --rounds 7
    git show 44e4485:briefs/db.py > /tmp/db_before.py     # the SQLAlchemy engine it replaced
    .venv/bin/python bench/pool_bench.py --db-module /tmp/db_before.py

Each transaction is ``SELECT 1`` and a commit (BEGIN; SELECT 1; COMMIT on the wire), run
``-n`` times in sequence:

* ``bare``: one psycopg ``AsyncConnection`` held for the whole round (the floor: no pool);
* ``pooled``: ``async with db.raw() as conn`` from this tree's ``briefs.db``;
* one line per ``--db-module``: the same through the ``Database`` of another copy of
  ``briefs/db.py`` (for a before/after in one run).

The variants take turns round by round (so drift in the machine's load hits them alike);
each prints the median over the rounds of the per-transaction time, and its ratio to bare.
The server is ``--url`` (default ``BRIEFS_TEST_DATABASE_URL``, else the local test server);
nothing is written to it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from briefs.db import Database
from briefs.settings import Settings

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

Round = Callable[[int], Awaitable[float]]


def load_database_class(path: str) -> type[Any]:
    """The ``Database`` class of another copy of ``briefs/db.py`` (it imports the rest of ``briefs``)."""
    spec = importlib.util.spec_from_file_location(f"pool_bench_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Database  # type: ignore[no-any-return]


def bare_round(conn: psycopg.AsyncConnection[Any]) -> Round:
    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await conn.execute("SELECT 1")
            await conn.commit()
        return time.perf_counter() - start

    return run


def pooled_round(db: Any) -> Round:
    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            async with db.raw() as conn:
                await conn.execute("SELECT 1")
        return time.perf_counter() - start

    return run


async def measure(variants: dict[str, Round], n: int, rounds: int) -> dict[str, float]:
    """Median seconds per transaction of each variant, after one warm-up round each."""
    for run in variants.values():
        await run(min(n, 500))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            times[name].append(await run(n) / n)
    return {name: statistics.median(values) for name, values in times.items()}


async def main(args: argparse.Namespace) -> None:
    settings = Settings(_env_file=None, database_url=args.url)  # type: ignore[call-arg]
    databases = {"pooled (this tree)": Database(settings, args.url)}
    for path in args.db_module:
        databases[f"pooled ({Path(path).name})"] = load_database_class(path)(settings, args.url)
    bare = await psycopg.AsyncConnection.connect(args.url, application_name="briefs-bench")
    try:
        variants = {"bare connection": bare_round(bare)}
        variants.update({name: pooled_round(db) for name, db in databases.items()})
        result = await measure(variants, args.n, args.rounds)
    finally:
        await bare.close()
        for db in databases.values():
            await db.dispose()
    floor = result["bare connection"]
    print(f"{args.rounds} rounds of {args.n:,} sequential transactions (SELECT 1; COMMIT), median per transaction:")
    for name, seconds in result.items():
        print(f"  {name:<32} {seconds * 1e6:8.1f} µs   {seconds / floor:5.2f}× bare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("BRIEFS_TEST_DATABASE_URL") or DEFAULT_URL)
    parser.add_argument("-n", type=int, default=5000, help="transactions per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per variant (default 5)")
    parser.add_argument("--db-module", action="append", default=[], metavar="PATH",
                        help="another briefs/db.py to measure alongside (repeatable)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
