"""Hostile domain rows, and rows an earlier run left behind, through the real worker.

Each case is a row a buggy app, a hand edit or an earlier crash can leave in the database. None of
them may leak one user's data into another's brief, or stop a brief (let alone for good).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any

import pytest

from tests.fakellm import FakeLLM


async def run_one(h: Any, uid: int, settings: Any, **enqueue: Any) -> dict[str, Any]:
    await h.enqueue(uid, **enqueue)
    await h.run(settings)
    jobs = [j for j in await h.jobs("generate_daily_brief") if j["user_id"] == uid]
    assert jobs and all(j["status"] == "completed" for j in jobs), [j["last_error"] for j in jobs]
    return await h.brief(uid)


async def test_tasks_and_notes_of_another_user_in_a_project_never_reach_its_brief(
    briefs_harness: Any, brief_seed: Any
) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    alice, bob = brief_seed.user("Alice"), brief_seed.user("Bob")
    project = brief_seed.project(alice, "Alice's project")
    brief_seed.task(project, "alice's own task", start_date=today)
    # Rows owned by Bob that point at Alice's project: a bug in the app, or a forged id.
    brief_seed.conn.execute(
        """INSERT INTO tasks (project_id, user_id, title, status, priority, start_date, due_date)
           VALUES (%(p)s, %(u)s, 'BOB SECRET today', 'backlog', 'high', %(d)s, NULL),
                  (%(p)s, %(u)s, 'BOB SECRET overdue', 'blocked', 'high', NULL, %(d)s::date - 3)""",
        {"p": project, "u": bob, "d": today},
    )
    brief_seed.conn.execute(
        "INSERT INTO notes (project_id, user_id, title, content) VALUES (%s, %s, 'BOB SECRET note', 'pin 1234')",
        (project, bob),
    )
    brief = await run_one(h, alice, h.settings())
    md = str(brief["summary_markdown"])
    assert "alice's own task" in md
    assert "SECRET" not in md and "1234" not in md
    assert "overdue" not in str(brief["executive_summary"]).lower()  # Bob's task is not counted either
    [section] = await h.sections(brief["id"])
    assert "SECRET" not in str(section["content_markdown"]) and "SECRET" not in str(section["metadata"])


async def test_dates_python_cannot_hold_are_read_at_its_limits_not_fatal(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Dana")
    brief_seed.conn.execute("UPDATE users SET last_visit_at = 'infinity' WHERE id = %s", (uid,))
    project = brief_seed.project(uid, "Edge dates")
    brief_seed.task(project, "due minus infinity", due_date="-infinity")
    brief_seed.task(project, "due before Christ", due_date="0044-03-15 BC", priority="high")
    brief_seed.task(project, "starts today, due never", start_date=today, due_date="infinity")
    brief_seed.task(project, "starts at infinity", start_date="infinity", due_date=today)
    brief_seed.task(project, "far future", due_date="294276-01-01")
    brief = await run_one(h, uid, h.settings())
    md = str(brief["summary_markdown"])
    for title in ("due minus infinity", "due before Christ", "starts today, due never", "starts at infinity"):
        assert title in md
    assert "far future" not in md  # not upcoming: it is due long after the next 7 days
    assert "due Mon 1 Jan" in md  # the overdue ones show the earliest date Python knows


async def test_a_brief_row_whose_metadata_is_not_an_object_is_redone(briefs_harness: Any, brief_seed: Any) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    users = {}
    for label, status, meta in [
        ("array", "processing", "[1, 2]"),
        ("string", "failed", '"x"'),
        ("revision text", "failed", '{"revision": "abc"}'),
        ("revision object", "processing", '{"revision": {"n": 1}, "email": [1]}'),
        ("revision huge", "failed", '{"revision": 1e40}'),
    ]:
        uid = brief_seed.user(label)
        brief_seed.busy_project(uid, f"{label} project", today)
        brief_seed.conn.execute(
            "INSERT INTO daily_briefs (user_id, brief_date, status, metadata) VALUES (%s, %s, %s, %s::jsonb)",
            (uid, today, status, meta),
        )
        users[label] = uid
        await h.enqueue(uid, force=label == "revision huge")
    await h.run(h.settings())
    for label, uid in users.items():
        [job] = [j for j in await h.jobs("generate_daily_brief") if j["user_id"] == uid]
        assert job["status"] == "completed" and job["attempts"] == 1, (label, job["last_error"])
        brief = await h.brief(uid)
        assert brief["status"] == "completed", label
        assert isinstance(brief["metadata"]["revision"], int) and 1 <= brief["metadata"]["revision"] < 2**31


async def test_kept_sections_of_any_shape_are_redone_or_kept_never_fatal(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    """A resumed brief keeps the LLM sections of the earlier run; what it reads back may be anything."""
    h = briefs_harness
    today = datetime.now(UTC).date()
    good = {"project_id": 0, "name": "n", "summary": "KEPT SUMMARY", "groups": [], "source": "llm", "note": None}
    shapes: list[Any] = [
        "not an object",
        [good],
        {**good, "project_id": "1"},
        {**good, "name": {"x": 1}},
        {**good, "groups": "abc"},
        {**good, "groups": [{"heading": {"x": 1}, "items": []}]},
        {**good, "groups": [{"heading": "h", "items": "abc"}]},
        {**good, "groups": [{"heading": "h", "items": [{"x": 1}]}]},
        {**good, "note": {"x": 1}},
        {**good, "project_id": -1},  # another project's section
    ]
    uid = brief_seed.user("Eve")
    brief_id = brief_seed._one(
        "INSERT INTO daily_briefs (user_id, brief_date, status) VALUES (%s, %s, 'processing') RETURNING id",
        (uid, today),
    )
    kept_ok = brief_seed.busy_project(uid, "kept ok", today)
    brief_seed.conn.execute(
        """INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, metadata)
           VALUES (%s, %s, 'completed', jsonb_build_object('source', 'llm', 'section', %s::jsonb,
                   'prompt_tokens', 1e30, 'completion_tokens', 'many', 'model', jsonb_build_array(1)))""",
        (brief_id, kept_ok, json.dumps({**good, "project_id": kept_ok})),
    )
    for i, shape in enumerate(shapes):
        pid = brief_seed.busy_project(uid, f"shape {i}", today)
        brief_seed.conn.execute(
            """INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, metadata)
               VALUES (%s, %s, 'completed', jsonb_build_object('source', 'llm', 'section', %s::jsonb,
                       'prompt_tokens', 'abc'))""",
            (brief_id, pid, json.dumps(shape)),
        )
    settings = h.settings(fake_llm, brief_max_projects=20)
    brief = await run_one(h, uid, settings)
    assert brief["status"] == "completed"
    assert str(brief["summary_markdown"]).count("KEPT SUMMARY") == 1  # the good one kept, the others redone
    assert brief["metadata"]["resumed_sections"] == len(shapes) + 1
    assert 0 <= brief["prompt_tokens"] < 2**31 and 0 <= brief["completion_tokens"] < 2**31
    project_calls = [r for r in fake_llm.requests if "schema name: ProjectBrief" in str(r.get("messages"))]
    assert len(project_calls) == len(shapes)


async def test_token_counts_the_provider_reports_cannot_overflow_the_brief(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Finn")
    for i in range(3):
        brief_seed.busy_project(uid, f"p{i}", today)
    fake_llm.usage = {"prompt_tokens": 10**30, "completion_tokens": -5, "total_tokens": 10**30}
    brief = await run_one(h, uid, h.settings(fake_llm))
    assert brief["status"] == "completed"
    assert brief["prompt_tokens"] == 2**31 - 1 and brief["completion_tokens"] == 0



async def test_a_brief_date_no_window_can_cover_fails_once_with_the_reason(
    briefs_harness: Any, brief_seed: Any
) -> None:
    """Dates at Python's limits: the windows (7 days back, 8 ahead) would overflow mid-run."""
    from briefs.jobs import settings_enqueue_hook
    from briefs.service import BadRequest, queue_brief
    from worker import queue

    h = briefs_harness
    uid = brief_seed.user("Gus")
    brief_seed.busy_project(uid, "p", datetime.now(UTC).date())
    with pytest.raises(BadRequest, match="outside the dates a brief can cover"):
        await queue_brief(h.db, h.settings(), uid, date(9999, 12, 31), force=True,
                          enqueue=settings_enqueue_hook(h.settings()))
    payloads = [
        ({"brief_date": "9999-12-31"}, "brief_date 9999-12-31 is outside the dates a brief can cover"),
        ({"brief_date": "0001-01-01"}, "brief_date 0001-01-01 is outside the dates a brief can cover"),
        ({"brief_date": "2026-11-30", "notify_at": "0001-01-01T00:00:00-05:00"}, "notify_at 0001-01-01 is outside"),
        ({"brief_date": "2026-11-29", "notify_at": "0001-01-01T00:00:00+05:00"}, "notify_at is out of range"),
    ]
    async with h.db.raw() as conn:
        for payload, _ in payloads:
            await queue.enqueue(conn, queue.NewJob("generate_daily_brief", {"user_id": uid, **payload}, user_id=uid))
    await h.run(h.settings())
    jobs = await h.jobs("generate_daily_brief")
    assert len(jobs) == len(payloads)
    for job, (_, reason) in zip(jobs, payloads, strict=True):
        assert job["status"] == "failed" and job["attempts"] == 1
        assert reason in str(job["last_error"])
    assert not await h.rows("SELECT 1 FROM daily_briefs WHERE user_id = %s", uid)


async def test_a_brief_that_runs_out_of_time_on_its_last_attempt_is_marked_failed_with_the_reason(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    """An LLM slower than the job's timeout: the slot is freed, and the brief does not stay "processing"."""
    h = briefs_harness
    uid = brief_seed.user("Hal")
    brief_seed.busy_project(uid, "slow", datetime.now(UTC).date())
    fake_llm.latency = 25.0  # far past the job's timeout; the fake stops sleeping when it is stopped
    settings = h.settings(fake_llm, job_timeout=2.0, llm_timeout=60.0)
    await h.enqueue(uid, max_attempts=1)
    await h.run(settings)
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "failed" and "took longer than" in str(job["last_error"])
    brief = await h.brief(uid)
    assert brief["status"] == "failed"
    assert "took longer than 1.8s" in str(brief["error"])


async def test_a_user_deleted_while_their_brief_runs_fails_once_saying_so(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    import psycopg

    from tests.fakellm import default_responder

    h = briefs_harness
    uid = brief_seed.user("Ivy")
    brief_seed.busy_project(uid, "p", datetime.now(UTC).date())

    def delete_then_answer(body: dict[str, Any]) -> str:
        with psycopg.connect(h.database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM users WHERE id = %s", (uid,))
        return default_responder(body)

    fake_llm.responder = delete_then_answer
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "failed" and job["attempts"] == 1  # not retried as if another run had taken it
    assert "was deleted during the run" in str(job["last_error"])


async def test_combining_mark_towers_and_direction_overrides_are_cut_from_names_and_replies(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    import unicodedata

    def longest_mark_run(text: str) -> int:
        longest = run = 0
        for ch in text:
            run = run + 1 if unicodedata.category(ch)[0] == "M" else 0
            longest = max(longest, run)
        return longest

    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Z\u0336" * 3000 + "\u202eevil")
    brief_seed.busy_project(uid, "\u202egnp.exe" + "\u0301\u20d2" * 5000 + "\U0001f600" * 1000, today)
    brief_seed.busy_project(uid, "Tiê\u0301ng Viê\u0323\u0302t", today)  # real text stacks two marks: kept
    fake_llm.responder = lambda body: json.dumps({
        "summary": "ok" + "\u0489\u0334" * 2000, "highlights": ["a" + "\u0300" * 900], "risks": [], "next_steps": [],
        "priority_actions": ["b" + "\u1ab0" * 900],
    })
    brief = await run_one(h, uid, h.settings(fake_llm))
    stored = [brief["summary_markdown"], brief["subject"], brief["executive_summary"], brief["priority_actions"]]
    stored += [(s["content_markdown"], s["metadata"]) for s in await h.sections(brief["id"])]
    text = json.dumps(stored, ensure_ascii=False)
    assert longest_mark_run(text) == 3 and "\u202e" not in text
    assert "Tiê\u0301ng Viê\u0323\u0302t" in str(brief["summary_markdown"])


async def test_a_kept_section_of_a_project_now_someone_elses_is_dropped_from_brief_and_email(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    """A crashed run left an LLM section; before the resume, that project went to another user."""
    h = briefs_harness
    today = datetime.now(UTC).date()
    alice = brief_seed.user("Alice", email="alice@example.com", email_enabled=True)
    bob = brief_seed.user("Bob")
    brief_seed.busy_project(alice, "Alice's own", today)
    moved = brief_seed.busy_project(alice, "Moved", today)
    brief_id = brief_seed._one(
        "INSERT INTO daily_briefs (user_id, brief_date, status) VALUES (%s, %s, 'processing') RETURNING id",
        (alice, today),
    )
    section = {"project_id": moved, "name": "Moved", "summary": "OLD LLM TEXT", "groups": [], "source": "llm"}
    brief_seed.conn.execute(
        """INSERT INTO project_daily_briefs (daily_brief_id, project_id, status, metadata)
           VALUES (%s, %s, 'completed', jsonb_build_object('source', 'llm', 'section', %s::jsonb))""",
        (brief_id, moved, json.dumps(section)),
    )
    brief_seed.conn.execute("UPDATE projects SET user_id = %s, name = 'BOB SECRET' WHERE id = %s", (bob, moved))
    settings = h.settings(None, smtp_url=smtp_server.url, secret_key="k" * 40)
    await h.enqueue(alice)
    for _ in range(3):  # the brief, then its email job
        await h.run(settings, services={})
    [message] = smtp_server.wait_for(1)
    body = message.as_string()
    assert "Alice's own" in body or "Alice&#x27;s own" in body
    assert "BOB SECRET" not in body and "OLD LLM TEXT" not in body
    assert [s["name"] for s in await h.sections(brief_id)] == ["Alice's own"]


async def test_a_brief_whose_job_is_cancelled_mid_run_is_marked_failed_not_left_processing(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    import time

    import psycopg

    from tests.fakellm import default_responder

    h = briefs_harness
    uid = brief_seed.user("Jo")
    brief_seed.busy_project(uid, "p", datetime.now(UTC).date())

    def cancel_then_answer_late(body: dict[str, Any]) -> str:
        with psycopg.connect(h.database_url, autocommit=True) as conn:  # what `briefs cancel` does
            conn.execute("""UPDATE queue_jobs SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,
                                   last_error = 'cancelled by operator'
                            WHERE job_type = 'generate_daily_brief' AND status = 'processing'""")
        time.sleep(3)  # the worker notices at its next heartbeat (lease 0.3 s: every 0.1 s) and stops the job
        return default_responder(body)

    fake_llm.responder = cancel_then_answer_late
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, lease_seconds=0.3))
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "cancelled"
    brief = await h.brief(uid)
    assert brief["status"] == "failed" and "cancelled by operator" in str(brief["error"])


async def test_a_brief_job_whose_payload_names_another_user_fails_once_without_a_brief(
    briefs_harness: Any, brief_seed: Any
) -> None:
    """The job row is listed, deduplicated and scheduled as one user's: its payload may not brief another."""
    from worker import queue

    h = briefs_harness
    today = datetime.now(UTC).date()
    listed, other = brief_seed.user("Listed"), brief_seed.user("Other")
    brief_seed.busy_project(other, "other's", today)
    async with h.db.raw() as conn:
        await queue.enqueue(conn, queue.NewJob(
            "generate_daily_brief", {"user_id": other, "brief_date": today.isoformat()},
            user_id=listed, dedup_key=f"brief:{listed}:{today.isoformat()}",
        ))
    await h.run(h.settings())
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "failed" and job["attempts"] == 1
    assert f"the payload's user_id {other} is not the job's ({listed})" in str(job["last_error"])
    assert not await h.rows("SELECT 1 FROM daily_briefs")


async def test_brief_row_instants_python_cannot_hold_stop_neither_the_brief_nor_its_email(
    briefs_harness: Any, brief_seed: Any, smtp_server: Any
) -> None:
    from worker import queue

    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Kim", email="kim@example.com", email_enabled=True)
    brief_seed.busy_project(uid, "p", today)
    brief_id = brief_seed._one(
        """INSERT INTO daily_briefs (user_id, brief_date, status, email_sent_at, notify_at, started_at, completed_at)
           VALUES (%s, %s, 'failed', 'infinity', '-infinity', 'infinity', '-infinity') RETURNING id""",
        (uid, today),
    )
    settings = h.settings(None, smtp_url=smtp_server.url, secret_key="k" * 40)
    await h.enqueue(uid)
    await h.run(settings, services={})
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "completed", job["last_error"]
    [brief] = await h.rows("SELECT id, status, email_sent_at = 'infinity' AS sent FROM daily_briefs")
    assert brief == {"id": brief_id, "status": "completed", "sent": True}
    assert not await h.jobs("send_brief_email")  # 'infinity' is a send on record: not mailed again
    async with h.db.raw() as conn:
        await queue.enqueue(conn, queue.NewJob(
            "send_brief_email", {"brief_id": brief_id, "user_id": uid, "brief_date": today.isoformat()}, user_id=uid))
    await h.run(settings, services={})
    [email_job] = await h.jobs("send_brief_email")
    assert email_job["status"] == "completed", email_job["last_error"]
    assert smtp_server.messages == []


async def test_show_names_a_latest_brief_date_python_cannot_hold(briefs_harness: Any, brief_seed: Any) -> None:
    from briefs.service import NotFound, show_brief

    uid = brief_seed.user("Lee")
    brief_seed.conn.execute(
        """INSERT INTO daily_briefs (user_id, brief_date, status, summary_markdown)
           VALUES (%s, 'infinity', 'completed', 'x')""",
        (uid,),
    )
    assert await show_brief(briefs_harness.db, uid, None) == "x"
    with pytest.raises(NotFound, match="the latest is infinity"):
        await show_brief(briefs_harness.db, uid, date(2026, 1, 1))
