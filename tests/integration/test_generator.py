"""The generate_daily_brief job end to end: real Postgres, the real worker, FakeLLM over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from briefs.contract import DELIVERY_PRIORITY
from tests.fakellm import FakeLLM, Fault

NAMES = ["Atlas", "Beacon", "Comet", "Doomed", "Ember"]


def _text(body: dict[str, Any], role: str) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == role)


def project_call(name: str | None = None) -> Callable[[dict[str, Any]], bool]:
    """Predicate: a per-project request (for ``name``, or any project)."""

    def match(body: dict[str, Any]) -> bool:
        if "schema name: ProjectBrief" not in _text(body, "system"):
            return False
        return name is None or f"Project: {name}\n" in _text(body, "user")

    return match


def summary_call(body: dict[str, Any]) -> bool:
    return "schema name: ExecutiveSummary" in _text(body, "system")


def seed_five(seed: Any, **user: Any) -> int:
    uid = seed.user("Ada", **user)
    today = datetime.now(UTC).date()
    for name in NAMES:
        seed.busy_project(uid, name, today)
    return uid


async def test_one_project_always_failing_among_four_good_ones(briefs_harness: Any, brief_seed: Any,
                                                               fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.fail_when(project_call("Doomed"), Fault.status(500))
    settings = h.settings(fake_llm)
    await h.enqueue(uid)
    await h.run(settings)

    brief = await h.brief(uid)
    assert brief["status"] == "partial"
    sections = await h.sections(brief["id"])
    by_name = {s["name"]: s for s in sections}
    assert sorted(by_name) == NAMES
    for name in ("Atlas", "Beacon", "Comet", "Ember"):
        assert by_name[name]["status"] == "completed"
        assert by_name[name]["metadata"]["source"] == "llm"
        assert "steady progress" in by_name[name]["content_markdown"]  # FakeLLM's reply
    doomed = by_name["Doomed"]
    assert doomed["status"] == "failed"
    assert doomed["metadata"]["source"] == "fallback"
    assert "500" in doomed["error"] and "500" in doomed["metadata"]["error"]
    assert "Doomed overdue 0" in doomed["content_markdown"]  # the deterministic rendering
    assert "Doomed" in brief["error"]
    # 1 + retries for Doomed, one call per good project, one summary over every project.
    assert sum(project_call("Doomed")(b) for b in fake_llm.requests) == settings.llm_max_retries + 1
    [summary_request] = [b for b in fake_llm.requests if summary_call(b)]
    for name in NAMES:
        assert f"Project: {name}\n" in _text(summary_request, "user")
    assert brief["metadata"]["summary_source"] == "llm"
    assert brief["metadata"]["llm"] == "enabled"
    assert brief["prompt_tokens"] > 0 and brief["completion_tokens"] > 0
    assert brief["model"] == settings.model
    md = brief["summary_markdown"]
    assert all(f"### {n}" in md for n in NAMES)
    assert "Some parts could not be summarised by the AI" in md
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "completed"
    assert job["result"]["projects_ok"] == 4 and job["result"]["projects_failed"] == 1
    assert job["result"]["prompt_tokens"] == brief["prompt_tokens"]
    assert job["progress"] == {"phase": "done", "projects_total": 5, "projects_done": 5, "projects_failed": 1}
    assert brief["progress"] == job["progress"]
    assert brief["started_at"] <= brief["completed_at"]


async def test_every_call_failing_still_gives_a_deterministic_brief(briefs_harness: Any, brief_seed: Any,
                                                                    fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.fail_when(lambda body: True, Fault.status(503))
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))

    brief = await h.brief(uid)
    assert brief["status"] == "partial"
    sections = await h.sections(brief["id"])
    assert len(sections) == 5
    assert {s["metadata"]["source"] for s in sections} == {"fallback"}
    assert brief["metadata"]["summary_source"] == "fallback"
    assert "Across your 5 active projects" in brief["executive_summary"]
    assert brief["priority_actions"] and "overdue" in brief["priority_actions"][0]
    assert all(f"### {n}" in brief["summary_markdown"] for n in NAMES)
    [job] = await h.jobs()
    assert job["status"] == "completed" and job["attempts"] == 1


async def test_rate_limited_then_success_honours_retry_after(briefs_harness: Any, brief_seed: Any,
                                                             fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada")
    brief_seed.busy_project(uid, "Atlas", datetime.now(UTC).date())
    fake_llm.script(Fault.status(429, retry_after=0.4))
    await h.enqueue(uid)
    started = time.monotonic()
    await h.run(h.settings(fake_llm))
    elapsed = time.monotonic() - started

    brief = await h.brief(uid)
    assert brief["status"] == "completed"
    [section] = await h.sections(brief["id"])
    assert section["metadata"]["source"] == "llm" and section["metadata"]["attempts"] == 2
    assert fake_llm.calls == 3  # 429, retry, summary
    assert elapsed >= 0.4


async def test_malformed_replies_degrade_to_deterministic_sections(briefs_harness: Any, brief_seed: Any,
                                                                   fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.fail_when(project_call("Comet"), Fault.content("Sure! Here is your brief: it went well."))
    fake_llm.fail_when(project_call("Doomed"), Fault.schema_breaking())
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))

    brief = await h.brief(uid)
    assert brief["status"] == "partial"
    by_name = {s["name"]: s for s in await h.sections(brief["id"])}
    for name in ("Comet", "Doomed"):
        assert by_name[name]["metadata"]["source"] == "fallback"
        assert "malformed" in by_name[name]["error"]
    assert {by_name[n]["metadata"]["source"] for n in ("Atlas", "Beacon", "Ember")} == {"llm"}


async def test_rejected_key_falls_back_without_failing_the_job(briefs_harness: Any, brief_seed: Any,
                                                               fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.expected_key = "another-key"  # every request gets 401
    settings = h.settings(fake_llm, llm_brief_concurrency=2)
    await h.enqueue(uid)
    await h.run(settings)

    brief = await h.brief(uid)
    assert brief["status"] == "partial"
    sections = await h.sections(brief["id"])
    assert {s["metadata"]["source"] for s in sections} == {"fallback"}
    assert all("401" in s["error"] for s in sections)
    assert "test-key" not in str(sections) and "test-key" not in brief["error"]
    # After the first 401 the rest of the brief stops asking (at most the in-flight ones were sent).
    assert fake_llm.calls <= settings.llm_brief_concurrency
    [job] = await h.jobs()
    assert job["status"] == "completed"


async def test_without_an_api_key_the_brief_is_deterministic(briefs_harness: Any, brief_seed: Any,
                                                             fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    settings = h.settings(None, openai_base_url=fake_llm.base_url)  # a base URL but no key
    await h.enqueue(uid)
    await h.run(settings, services={})

    brief = await h.brief(uid)
    assert brief["status"] == "completed"
    assert brief["metadata"]["llm"] == "disabled" and brief["metadata"]["mode"] == "deterministic"
    assert "without an LLM" in brief["metadata"]["note"]
    assert "Generated without AI" in brief["summary_markdown"]
    assert brief["prompt_tokens"] == 0 and brief["model"] is None
    assert {s["metadata"]["source"] for s in await h.sections(brief["id"])} == {"deterministic"}
    assert fake_llm.calls == 0


async def test_no_active_projects_gives_a_short_completed_brief(briefs_harness: Any, brief_seed: Any,
                                                                fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = brief_seed.user("Idle")
    brief_seed.project(uid, "Shelved", status="paused")
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))

    brief = await h.brief(uid)
    assert brief["status"] == "completed"
    assert "no active projects" in brief["summary_markdown"]
    assert await h.sections(brief["id"]) == []
    assert fake_llm.calls == 0


async def test_quiet_projects_need_no_llm_call(briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada")
    brief_seed.busy_project(uid, "Busy", datetime.now(UTC).date())
    calm = brief_seed.project(uid, "Calm")
    brief_seed.task(calm, "someday")
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))

    brief = await h.brief(uid)
    by_name = {s["name"]: s for s in await h.sections(brief["id"])}
    assert by_name["Calm"]["metadata"] == {**by_name["Calm"]["metadata"], "source": "deterministic",
                                           "reason": "quiet"}
    assert by_name["Busy"]["metadata"]["source"] == "llm"
    assert sum(project_call()(b) for b in fake_llm.requests) == 1
    assert brief["status"] == "completed"


async def test_missing_user_fails_the_job_permanently(briefs_harness: Any, fake_llm: FakeLLM) -> None:
    h = briefs_harness
    await h.enqueue(4242)
    await h.run(h.settings(fake_llm))
    [job] = await h.jobs()
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "user 4242 does not exist" in job["last_error"]


async def test_completed_brief_is_not_regenerated_unless_forced(briefs_harness: Any, brief_seed: Any,
                                                                fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    settings = h.settings(fake_llm)
    await h.enqueue(uid)
    await h.run(settings)
    first = await h.brief(uid)
    calls = fake_llm.calls
    assert first["status"] == "completed" and calls == 6

    await h.enqueue(uid)  # the first job is finished, so the dedup key is free again
    await h.run(settings)
    again = await h.brief(uid)
    assert fake_llm.calls == calls
    assert again["completed_at"] == first["completed_at"] and again["metadata"] == first["metadata"]
    jobs = await h.jobs()
    assert jobs[-1]["result"]["skipped"] is True and jobs[-1]["result"]["reason"] == "already completed"

    await h.enqueue(uid, force=True)
    await h.run(settings)
    forced = await h.brief(uid)
    assert fake_llm.calls == 2 * calls
    assert forced["id"] == first["id"] and forced["completed_at"] > first["completed_at"]
    assert forced["metadata"]["revision"] == 2 and forced["metadata"]["run_id"] != first["metadata"]["run_id"]
    assert len(await h.sections(forced["id"])) == 5
    assert len(await h.rows("SELECT id FROM daily_briefs")) == 1


async def test_per_project_calls_run_concurrently_within_the_brief_limit(briefs_harness: Any, brief_seed: Any,
                                                                         fake_llm: FakeLLM) -> None:
    import threading

    from tests.fakellm import default_responder

    h = briefs_harness
    uid = seed_five(brief_seed)
    limit = 3
    all_in = threading.Event()

    def hold_until_all_in(body: dict[str, Any]) -> str:
        """Hold each project call until ``limit`` requests are in the server at once (or 10 s have passed)."""
        if project_call()(body) and not all_in.is_set():
            if fake_llm.in_flight >= limit:
                all_in.set()
            all_in.wait(10)
        return default_responder(body)

    fake_llm.responder = hold_until_all_in
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, llm_brief_concurrency=limit))
    assert all_in.is_set()  # three project calls were in flight together: they overlap
    assert fake_llm.max_in_flight == limit  # and never more than the brief's limit (five projects)
    assert sum(project_call()(b) for b in fake_llm.requests) == len(NAMES)
    assert (await h.brief(uid))["status"] == "completed"


async def test_engagement_stage_changes_tone_and_subject(briefs_harness: Any, brief_seed: Any,
                                                         fake_llm: FakeLLM) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    regular, returning = brief_seed.user("Reg"), brief_seed.user("Ret")
    brief_seed.busy_project(regular, "Regular work", today)
    brief_seed.busy_project(returning, "Returning work", today)
    await h.enqueue(regular)
    await h.enqueue(returning, stage="re_engagement")
    await h.run(h.settings(fake_llm))

    reg, ret = await h.brief(regular), await h.brief(returning)
    assert reg["subject"].startswith("Your daily brief for")
    assert ret["subject"].startswith("Welcome back")
    assert ret["engagement_stage"] == "re_engagement"
    assert "Welcome back, Ret!" in ret["summary_markdown"]
    tones = {
        name: _text(next(b for b in fake_llm.requests if project_call(name)(b)), "system")
        for name in ("Regular work", "Returning work")
    }
    assert "checks in regularly" in tones["Regular work"]
    assert "not opened the app for several days" in tones["Returning work"]


async def test_crash_mid_generation_then_retry_gives_one_brief_and_one_email(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM, smtp_server: Any
) -> None:
    from briefs.app.services import handlers as build_handlers
    from worker import queue
    from worker.runner import JobContext

    h = briefs_harness
    uid = seed_five(brief_seed, email_enabled=True)
    settings = h.settings(fake_llm, smtp_url=smtp_server.url, llm_brief_concurrency=2,
                          secret_key="test-secret-key-0123456789")  # email is refused without one
    fake_llm.latency = 0.15
    await h.enqueue(uid)
    async with h.db.raw() as conn:
        [job] = await queue.claim(conn, 1, "doomed-worker", 30.0)

    # Run the handler by hand and kill it once some projects are written.
    services: dict[str, Any] = {"llm": h.llm(settings)}
    ctx = JobContext(job, h.db, settings, services, "doomed-worker")
    task = asyncio.create_task(build_handlers(settings)["generate_daily_brief"].fn(ctx))
    for _ in range(200):
        done = await h.rows("SELECT project_id FROM project_daily_briefs")
        if len(done) >= 2:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await services["llm"].aclose()
    crashed = await h.brief(uid)
    assert crashed["status"] == "processing"
    kept_sections = await h.sections(crashed["id"])
    kept = len(kept_sections)
    assert 2 <= kept < 5
    kept_names = {section["name"] for section in kept_sections}
    async with h.db.raw() as conn:  # what the rescuer does for a dead worker, without waiting for the lease
        await queue.fail(conn, job, "worker died", permanent=False, retry_delay=0)

    await h.run(settings)

    [brief] = await h.rows("SELECT * FROM daily_briefs")
    assert brief["status"] == "completed"
    assert brief["metadata"]["resumed_sections"] == kept
    sections = await h.sections(brief["id"])
    assert len(sections) == 5 and {s["metadata"]["source"] for s in sections} == {"llm"}
    for name in NAMES:  # sections kept from the first run were not asked for again; lost ones were, once
        asked = sum(project_call(name)(b) for b in fake_llm.requests)
        assert asked == 1 if name in kept_names else 1 <= asked <= 2, (name, asked)
    assert brief["prompt_tokens"] == sum(s["metadata"]["prompt_tokens"] for s in sections) + brief["metadata"][
        "summary_prompt_tokens"]
    jobs = await h.jobs()
    assert [(j["job_type"], j["status"]) for j in jobs] == [
        ("generate_daily_brief", "completed"),
        ("send_brief_email", "completed"),
    ]
    assert jobs[0]["attempts"] == 2
    # The email is ordered with the scheduler's briefs by deadline alone (one priority): due at notify_at, it
    # is never kept behind briefs started early for later times.
    assert jobs[1]["priority"] == DELIVERY_PRIORITY and jobs[1]["notify_at"] == jobs[1]["run_at"]
    assert len(smtp_server.wait_for(1)) == 1

    # Another email job for the same brief (a retry, a duplicate) does not send again.
    async with h.db.raw() as conn:
        await queue.enqueue(conn, queue.NewJob("send_brief_email", jobs[1]["payload"], user_id=uid))
    await h.run(settings)
    last = (await h.jobs())[-1]
    assert last["status"] == "completed" and last["result"]["reason"] == "already sent"
    await asyncio.sleep(0.1)
    assert len(smtp_server.messages) == 1


async def test_llm_stats_are_process_wide(briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM) -> None:
    """Tokens recorded on the brief match what the LLM client counted."""
    h = briefs_harness
    uid = seed_five(brief_seed)
    from prometheus_client import REGISTRY

    def tokens(kind: str) -> float:
        return REGISTRY.get_sample_value("briefs_llm_tokens_total", {"kind": kind}) or 0.0

    before = {kind: tokens(kind) for kind in ("prompt", "completion")}
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))
    brief = await h.brief(uid)
    assert brief["prompt_tokens"] == tokens("prompt") - before["prompt"] > 0
    assert brief["completion_tokens"] == tokens("completion") - before["completion"] > 0


async def test_llm_health_is_stored_for_sections_summary_and_brief(briefs_harness: Any, brief_seed: Any,
                                                                   fake_llm: FakeLLM) -> None:
    """What `briefs status` reads: error kinds and HTTP statuses, requests and failures per brief."""
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.fail_when(project_call("Doomed"), Fault.status(503))
    fake_llm.fail_when(project_call("Comet"), Fault.content("no JSON here"))
    fake_llm.fail_when(summary_call, Fault.status(429))
    fake_llm.script(Fault.status(500))  # one retried failure that then succeeds (some good project)
    settings = h.settings(fake_llm)
    await h.enqueue(uid)
    await h.run(settings)

    brief = await h.brief(uid)
    by_name = {s["name"]: s for s in await h.sections(brief["id"])}
    tries = settings.llm_max_retries + 1
    assert by_name["Doomed"]["metadata"]["error_kind"] == "server"
    assert by_name["Doomed"]["metadata"]["http_status"] == 503
    assert by_name["Comet"]["metadata"]["error_kind"] == "malformed"
    assert by_name["Comet"]["metadata"]["http_status"] is None
    assert "error_kind" not in by_name["Atlas"]["metadata"]
    meta = brief["metadata"]
    assert meta["summary_source"] == "fallback" and meta["summary_error_kind"] == "rate_limit"
    assert "429" in meta["summary_error"]
    assert meta["llm_failures"] == 3
    assert meta["llm_requests"] == fake_llm.calls == 3 * tries + 3 + 1


async def test_rejected_key_gives_auth_kind_and_the_hint(briefs_harness: Any, brief_seed: Any,
                                                         fake_llm: FakeLLM) -> None:
    h = briefs_harness
    uid = seed_five(brief_seed)
    fake_llm.expected_key = "another-key"
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm, llm_brief_concurrency=1))
    brief = await h.brief(uid)
    sections = await h.sections(brief["id"])
    assert {(s["metadata"]["error_kind"], s["metadata"]["http_status"]) for s in sections} == {("auth", 401)}
    assert all("check OPENAI_API_KEY" in s["error"] for s in sections)
    assert brief["metadata"]["summary_error_kind"] == "auth"
    assert brief["metadata"]["llm_requests"] == brief["metadata"]["llm_failures"] == fake_llm.calls == 1


async def test_forced_regeneration_keeps_the_sent_email_unless_asked(briefs_harness: Any, brief_seed: Any,
                                                                     fake_llm: FakeLLM) -> None:
    from briefs.contract import BriefRequest

    assert BriefRequest.from_payload({"user_id": 1, "brief_date": "2026-03-10"}).resend_email is False
    request = BriefRequest.from_payload({"user_id": 1, "brief_date": "2026-03-10", "force": True,
                                         "resend_email": True})
    assert request.resend_email and request.to_payload()["resend_email"] is True
    assert BriefRequest.from_payload(request.to_payload()) == request

    h = briefs_harness
    uid = seed_five(brief_seed)
    settings = h.settings(fake_llm)
    await h.enqueue(uid)
    await h.run(settings)
    sent = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
    record = {"message_id": "<brief-1.r1@example.com>", "to": "ada@example.com"}
    await h.rows("""UPDATE daily_briefs SET email_sent_at = %s,
                           metadata = metadata || jsonb_build_object('email', %s::jsonb) RETURNING id""",
                 sent, json.dumps(record))

    await h.enqueue(uid, force=True)
    await h.run(settings)
    kept = await h.brief(uid)
    assert kept["metadata"]["revision"] == 2 and kept["email_sent_at"] == sent
    assert kept["metadata"]["email"] == record  # the record of that send (or a send in flight) survives too

    payload_day = kept["brief_date"].isoformat()
    async with h.db.raw() as conn:
        from worker import queue

        await queue.enqueue(conn, queue.NewJob(
            "generate_daily_brief",
            {"user_id": uid, "brief_date": payload_day, "force": True, "resend_email": True},
            dedup_key=f"brief:{uid}:{payload_day}", user_id=uid))
    await h.run(settings)
    resent = await h.brief(uid)
    assert resent["metadata"]["revision"] == 3 and resent["email_sent_at"] is None
    assert "email" not in resent["metadata"]


async def test_an_unexpected_error_in_the_summary_degrades_the_summary_only(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM, monkeypatch: Any
) -> None:
    from briefs import render

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("template bug")

    monkeypatch.setattr(render, "summary_messages", broken)
    h = briefs_harness
    uid = seed_five(brief_seed)
    await h.enqueue(uid)
    await h.run(h.settings(fake_llm))
    brief = await h.brief(uid)
    assert brief["status"] == "partial"
    assert brief["metadata"]["summary_error_kind"] == "internal"
    assert "RuntimeError: template bug" in brief["metadata"]["summary_error"]
    assert "Across your 5 active projects" in brief["executive_summary"]
    [job] = await h.jobs()
    assert job["status"] == "completed"


async def test_an_error_that_can_never_succeed_fails_the_job_once_and_the_brief_with_it(
    briefs_harness: Any, brief_seed: Any, monkeypatch: Any
) -> None:
    """An OverflowError (a date out of range, say) is permanent: one attempt, and the brief row says failed
    instead of staying 'processing' forever."""
    from briefs import render

    def overflow(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(render, "brief_markdown", overflow)
    h = briefs_harness
    uid = seed_five(brief_seed)
    await h.enqueue(uid)
    await h.run(h.settings())
    [job] = await h.jobs()
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "OverflowError" in job["last_error"]
    brief = await h.brief(uid)
    assert brief["status"] == "failed" and "date value out of range" in brief["error"]
