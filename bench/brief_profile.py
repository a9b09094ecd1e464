"""Where the worker's CPU goes during the fleet benchmark (run by hand).

    /work/venv/bin/python bench/brief_profile.py --users 200              # py-spy on the drain only
    /work/venv/bin/python bench/brief_profile.py --users 1000 --tool cprofile
    /work/venv/bin/python bench/brief_profile.py --users 200 --raw /tmp/prof.txt   # keep py-spy's stacks

Sets up what ``brief_bench.py fleet`` sets up (fresh database, FakeLLM in its own process,
seeded users, queued jobs), then profiles **only** the burst worker draining the queue in this
process: ``py-spy record --pid <this process>`` (needs ``pip install py-spy``) or cProfile.

py-spy samples wall time of the running thread: time the process spends preempted inside a system
call (a send that wakes PostgreSQL or FakeLLM on this 2-core machine) counts as that call's. cProfile
here measures thread CPU time, but its per-call overhead inflates code made of many small Python
calls (the SDK). Read them together; the CPU seconds printed for the drain are exact.

The report attributes every sample to the first library the stack enters below the event loop
(so the asyncio transport writes that httpcore causes count as the SDK, the writes psycopg causes
count as the database), or to our own code when the sample is in it, or to the event loop itself
when no task code is on the stack. Then the heaviest functions, inclusive and self.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import brief_bench as bb

# First matching prefix of the frame's file wins; order matters.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("llm client: openai SDK", ("openai/",)),
    ("llm client: httpx2/httpcore2/h11/anyio", ("httpx2/", "httpcore2/", "h11/", "anyio/", "sniffio/")),
    ("database: psycopg", ("psycopg/", "psycopg_binary/")),
    ("database: psycopg_pool", ("psycopg_pool/",)),
    ("jinja2", ("jinja2/", "markupsafe/")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("logging", ("logging/",)),
    ("json", ("json/",)),
]
OURS = ("briefs/", "worker/")
LOOP = ("asyncio/", "selectors.py")


def _file(frame: str) -> str:
    m = re.search(r"\(([^()]*?)(?::\d+)?\)$", frame)
    return m.group(1) if m else frame


def _library(path: str) -> str | None:
    for name, prefixes in CATEGORIES:
        if path.startswith(prefixes):
            return name
    return None


def _category(frames: list[str]) -> str:
    """The first library entered from task code (root → leaf), else ours, else the loop."""
    in_task = False
    last_ours = None
    for frame in frames:
        path = _file(frame)
        if path.startswith(OURS):
            in_task = True
            last_ours = path
            continue
        if in_task and (name := _library(path)) is not None:
            return name
    if last_ours is not None:
        leaf = _file(frames[-1])
        if leaf.startswith(OURS):
            return f"ours: {leaf}"
        return f"ours → stdlib ({last_ours})"
    # A callback or a greenlet with none of our frames on the stack: the first library in it.
    for frame in frames:
        if (name := _library(_file(frame))) is not None:
            return name
    if any(_file(f).startswith(LOOP) for f in frames):
        return "event loop (select, callbacks, task steps)"
    return "other"


def report_raw(path: str, top: int) -> None:
    total = 0
    cats: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue  # a stack py-spy could not read whole (it samples without pausing the process)
        count = int(n)
        frames = stack.split(";")
        # The drain runs on the main thread; an idle executor thread blocked in a lock can be
        # misread as busy by py-spy, so other threads are left out.
        if frames[0].startswith("Thread._bootstrap"):
            continue
        total += count
        cats[_category(frames)] += count
        seen = set()
        for frame in frames:
            key = re.sub(r":\d+\)$", ")", frame)
            if key not in seen:
                seen.add(key)
                incl[key] += count
        self_[re.sub(r":\d+\)$", ")", frames[-1])] += count
    print(f"samples (main thread): {total}")
    print("\n== by what the time is spent in (first library entered from our task code)")
    for name, n in cats.most_common():
        if 100 * n / total >= 0.3:
            print(f"{100 * n / total:6.1f}%  {name}")
    print("\n== inclusive, by function")
    for name, n in incl.most_common(top):
        print(f"{100 * n / total:6.1f}%  {name}")
    print("\n== self, by function")
    for name, n in self_.most_common(top // 2):
        print(f"{100 * n / total:6.1f}%  {name}")


def report_packages(stats: pstats.Stats) -> None:
    """Self CPU time per package (cProfile's ``tottime``: a function's own time, callees excluded)."""
    per: Counter[str] = Counter()
    raw = stats.stats  # type: ignore[attr-defined]
    for (path, _line, _name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        m = re.search(r"site-packages/([^/]+)", path)
        if m:
            name = m.group(1).removesuffix(".py")
        elif "/briefs/" in path or "/worker/" in path:
            name = "ours: " + path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1]
        elif path.startswith("~") or path.startswith("<"):
            name = "builtins (C calls: socket, select, json, …)" if path == "~" else path
        else:
            name = "stdlib: " + path.rsplit("/", 1)[-1]
        per[name] += tottime
    total = sum(per.values())
    print(f"self CPU by package (cProfile, thread time; total {total:.2f} s)")
    for name, t in per.most_common(30):
        print(f"{100 * t / total:6.1f}%  {t:7.2f} s  {name}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=bb.DEFAULT_SERVER)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--projects", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--llm-concurrency", type=int, default=100)
    parser.add_argument("--worker-concurrency", type=int, default=60)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--tool", choices=["py-spy", "cprofile"], default="py-spy")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", help="keep py-spy's collapsed stacks in this file")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--no-llm", action="store_true", help="no API key: everything but the LLM")
    args = parser.parse_args()

    url = bb.create_db(args.db)
    fake = bb.FakeProcess(args.latency, 256)
    day = datetime.now(UTC).date()
    try:
        bb.seed(url, args.users, args.projects, day)
        settings = bb.settings_for(url, fake.base_url, llm_concurrency=args.llm_concurrency,
                                   llm_brief_concurrency=args.projects, db_pool_size=args.pool,
                                   **({"openai_api_key": None} if args.no_llm else {}))
        bb._enqueue_all(url, day)
        raw = args.raw or tempfile.mktemp(suffix=".txt", prefix="brief_profile_")
        spy = None
        profiler = None
        if args.tool == "py-spy":
            spy_bin = Path(sys.executable).with_name("py-spy")
            spy = subprocess.Popen([str(spy_bin), "record", "--pid", str(os.getpid()), "--rate", str(args.rate),
                                    "--format", "raw", "--output", raw, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # let py-spy attach
        else:
            profiler = cProfile.Profile(time.thread_time)  # CPU time: waits and preemption excluded
            profiler.enable()
        out = asyncio.run(bb._drain(settings, args.worker_concurrency))
        if profiler is not None:
            profiler.disable()
        calls = fake.ask("stats")["calls"]
        print(f"drain: {out['elapsed']:.2f} s wall, {out['cpu_s']:.2f} s CPU, {out['completed']} jobs, "
              f"{calls} LLM calls, {1000 * out['cpu_s'] / max(calls, 1):.2f} ms CPU per call "
              f"(ideal wall {calls * args.latency / args.llm_concurrency:.2f} s)")
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            report_raw(raw, args.top)
        elif profiler is not None:
            stats = pstats.Stats(profiler)
            report_packages(stats)
            stats.sort_stats("tottime").print_stats(args.top)
    finally:
        fake.stop()
        bb.drop_db(args.db, url)


if __name__ == "__main__":
    main()
