"""Hostile rows and hostile LLM replies: each bad item degrades alone, the brief completes, sizes stay bounded.

Real PostgreSQL, the real worker, FakeLLM over HTTP. What the fake LLM saw (prompt sizes, call
counts) and what was stored (Markdown size, section rows, metadata) are asserted.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from briefs import render
from tests.fakellm import FakeLLM, Fault

BAD_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _text(body: dict[str, Any], role: str) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == role)


def project_call(name: str) -> Any:
    def match(body: dict[str, Any]) -> bool:
        return "schema name: ProjectBrief" in _text(body, "system") and f"Project: {name}\n" in _text(body, "user")

    return match


def summary_call(body: dict[str, Any]) -> bool:
    return "schema name: ExecutiveSummary" in _text(body, "system")


def prompt_chars(body: dict[str, Any]) -> int:
    return sum(len(str(m.get("content", ""))) for m in body.get("messages", []))


def reply(summary: Any = "Fine.", **lists: Any) -> str:
    return json.dumps({"summary": summary, "highlights": [], "risks": [], "next_steps": [], **lists})


def assert_storable(value: Any) -> None:
    """No NUL, control character (but newline/tab) or lone surrogate anywhere in a stored value."""
    for text in re.findall(r'"((?:[^"\\]|\\.)*)"', json.dumps(value, default=str, ensure_ascii=False)):
        assert not BAD_TEXT.search(json.loads(f'"{text}"')), text[:200]


def assert_safe_markdown(md: str) -> None:
    """No raw HTML, no link or image, no control character, no injected structure."""
    assert "<" not in md and ">" not in md.replace("> **", "")  # the only blockquote is ours
    assert "](" not in md.replace("\\](", "")  # every ] from data is escaped: no [text](url) link
    assert "![" not in md.replace("!\\[", "")
    assert not BAD_TEXT.search(md.replace("\n", ""))
    for line in md.splitlines():
        assert not re.match(r"\s*(-{3,}|={3,}|\*{3,}|_{3,})\s*$", line), line  # no thematic break / setext
        assert not line.startswith(("<", "    ", "\t", "```", "~~~")), line


async def run_brief(h: Any, uid: int, settings: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await h.enqueue(uid)
    await h.run(settings)
    [job] = await h.jobs("generate_daily_brief")
    assert job["status"] == "completed", job["last_error"]
    brief = await h.brief(uid)
    return brief, await h.sections(brief["id"])


# --------------------------------------------------------------------------- NUL and unsaveable sections


async def test_nul_and_lone_surrogates_in_a_reply_are_cleaned_not_fatal(briefs_harness: Any, brief_seed: Any,
                                                                        fake_llm: FakeLLM) -> None:
    """Was: the batched save failed on "\\u0000", the brief failed and was retried (27 calls instead of 6)."""
    h = briefs_harness
    uid = brief_seed.user("Ada")
    today = datetime.now(UTC).date()
    for name in ("Atlas", "Beacon", "Comet", "Doomed", "Ember"):
        brief_seed.busy_project(uid, name, today)
    poison = reply("Bad\u0000 news\ud800 \x1b[31mred\x07", risks=["a\u0000b", "\udfff", "\x9b2J"],
                   highlights=["ok"])
    fake_llm.fail_when(project_call("Doomed"), Fault.content(poison))
    fake_llm.fail_when(summary_call, Fault.content(json.dumps({"summary": "All\u0000 good\ud83d",
                                                                "priority_actions": ["x\u0000y"]})))
    settings = h.settings(fake_llm)
    brief, sections = await run_brief(h, uid, settings)

    assert fake_llm.calls == 6
    assert brief["status"] == "completed"
    by_name = {s["name"]: s for s in sections}
    doomed = by_name["Doomed"]
    assert doomed["status"] == "completed" and doomed["metadata"]["source"] == "llm"
    assert "Bad news red" in doomed["content_markdown"]
    assert doomed["metadata"]["section"]["groups"] == [{"heading": "Highlights", "items": ["ok"]},
                                                       {"heading": "Risks", "items": ["ab"]}]
    assert brief["executive_summary"] == "All good" and brief["priority_actions"] == ["xy"]
    assert_storable([brief, sections])


@pytest.fixture
def poison_trigger(brief_seed: Any) -> Any:
    """PostgreSQL refuses any LLM section whose Markdown holds 'POISON' (a stand-in for any row it refuses)."""
    brief_seed.conn.execute("""
        CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.content_markdown LIKE '%POISON%' AND NEW.metadata->>'source' = 'llm' THEN
                RAISE EXCEPTION 'refused: poisoned section for project %', NEW.project_id;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_refuse_poison BEFORE INSERT OR UPDATE ON project_daily_briefs
            FOR EACH ROW EXECUTE FUNCTION test_refuse_poison();
    """)
    try:
        yield
    finally:
        brief_seed.conn.execute("DROP TRIGGER test_refuse_poison ON project_daily_briefs;"
                                "DROP FUNCTION test_refuse_poison()")


async def test_a_section_the_database_refuses_degrades_that_section_only(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM, poison_trigger: Any
) -> None:
    h = briefs_harness
    uid = brief_seed.user("Ada")
    today = datetime.now(UTC).date()
    names = ("Atlas", "Beacon", "Comet", "Doomed", "Ember")
    for name in names:
        brief_seed.busy_project(uid, name, today)
    fake_llm.fail_when(project_call("Doomed"), Fault.content(reply("POISON")))
    settings = h.settings(fake_llm, llm_brief_concurrency=5)  # all finish together: one batch to split
    brief, sections = await run_brief(h, uid, settings)

    assert fake_llm.calls == 6
    assert brief["status"] == "partial"
    by_name = {s["name"]: s for s in sections}
    assert sorted(by_name) == list(names)
    for name in ("Atlas", "Beacon", "Comet", "Ember"):
        assert by_name[name]["status"] == "completed" and by_name[name]["metadata"]["source"] == "llm"
    doomed = by_name["Doomed"]
    assert doomed["status"] == "failed" and doomed["metadata"]["source"] == "fallback"
    assert doomed["metadata"]["error_kind"] == "save"
    assert "could not save the section" in doomed["error"] and "poisoned section" in doomed["error"]
    assert "Doomed overdue 0" in doomed["content_markdown"]  # the deterministic rendering
    assert "Doomed" in brief["error"]


async def test_a_project_deleted_during_generation_is_left_out_not_fatal(briefs_harness: Any, brief_seed: Any,
                                                                         fake_llm: FakeLLM) -> None:
    import psycopg

    h = briefs_harness
    uid = brief_seed.user("Ada")
    today = datetime.now(UTC).date()
    for name in ("Atlas", "Doomed"):
        brief_seed.busy_project(uid, name, today)

    def delete_then_answer(body: dict[str, Any]) -> str:
        if project_call("Doomed")(body):
            with psycopg.connect(h.database_url, autocommit=True) as conn:
                conn.execute("DELETE FROM projects WHERE name = 'Doomed'")
        return reply("Fine.")

    fake_llm.responder = delete_then_answer
    brief, sections = await run_brief(h, uid, h.settings(fake_llm, llm_brief_concurrency=2))
    assert [s["name"] for s in sections] == ["Atlas"]
    assert brief["status"] == "partial" and "could not save the section" in brief["error"]
    assert "### Doomed" in brief["summary_markdown"]


# --------------------------------------------------------------------------- sizes and costs


async def test_five_thousand_projects_and_a_hundred_thousand_tasks_stay_bounded(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    """Was: 5,001 LLM calls, 31 MB of prompts, 13.6 MB of Markdown, a 2 MB summary prompt."""
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Hoarder")
    conn = brief_seed.conn
    # 4,999 projects with one overdue task each, named so that the quiet ones sort first by name.
    conn.execute("""INSERT INTO projects (user_id, name) SELECT %s, 'P' || lpad(g::text, 5, '0')
                    FROM generate_series(1, 4999) g""", (uid,))
    conn.execute("""INSERT INTO tasks (project_id, user_id, title, priority, due_date)
                    SELECT id, user_id, 'Overdue in ' || name, 'high', %s::date - 2 FROM projects
                    WHERE user_id = %s AND right(name, 1) IN ('1', '3', '5', '7', '9')""", (today, uid))
    huge = brief_seed.project(uid, "Huge")
    conn.execute("""INSERT INTO tasks (project_id, user_id, title, priority, due_date, start_date)
                    SELECT %s, %s, 'Huge task ' || g, CASE WHEN g %% 2 = 0 THEN 'high' ELSE 'low' END,
                           %s::date - 1 - (g %% 30), CASE WHEN g %% 3 = 0 THEN %s::date END
                    FROM generate_series(1, 100000) g""", (huge, uid, today, today))
    conn.execute("""INSERT INTO tasks (project_id, user_id, title, due_date)
                    SELECT %s, %s, repeat('x', 1000000) || g, %s::date FROM generate_series(1, 20) g""",
                 (huge, uid, today))
    settings = h.settings(fake_llm)
    brief, sections = await run_brief(h, uid, settings)

    assert brief["status"] == "completed"
    assert len(sections) == settings.brief_max_projects
    assert fake_llm.calls == settings.brief_max_projects + 1  # the included projects and the summary
    assert max(prompt_chars(b) for b in fake_llm.requests) <= settings.prompt_max_chars
    md = brief["summary_markdown"]
    assert len(md) <= settings.brief_max_chars
    assert "more active projects, quieter ones, not in this brief: P" in md and "4,950 more" in md
    assert "and 4,940 others._" in md  # the first ten of the rest are named
    assert brief["metadata"]["projects"]["more"] == 4950
    # The most active first: Huge (100,020 due or overdue), then the projects with an overdue task.
    assert sections_in_order(md)[0] == "Huge"
    assert {s["name"] for s in sections} - {"Huge"} <= {f"P{i:05d}" for i in range(1, 5000, 2)}
    huge_row = next(s for s in sections if s["name"] == "Huge")
    assert len(json.dumps(huge_row["metadata"])) < 50_000
    huge_prompt = _text(next(b for b in fake_llm.requests if project_call("Huge")(b)), "user")
    assert "Overdue (100000):" in huge_prompt and "… and 99980 more" in huge_prompt
    [summary] = [b for b in fake_llm.requests if summary_call(b)]
    assert "Active projects: 5000" in _text(summary, "user") and "4950 quieter ones" in _text(summary, "user")
    assert _text(summary, "user").count("\nProject: ") == settings.brief_max_projects


def sections_in_order(md: str) -> list[str]:
    return re.findall(r"^### (.+)$", md, re.MULTILINE)


async def test_huge_titles_are_cut_in_sql_and_every_limit_is_configurable(
    briefs_harness: Any, brief_seed: Any, fake_llm: FakeLLM
) -> None:
    """Was: twenty 1 MB task titles made one 21 MB prompt."""
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Ada\n" * 100_000)
    conn = brief_seed.conn
    pid = brief_seed.project(uid, "N" * 1_000_000, description="D" * 1_000_000)
    conn.execute("""INSERT INTO tasks (project_id, user_id, title, due_date, status)
                    SELECT %s, %s, repeat(chr(65 + g), 1000000), %s::date - 1, 'blocked'
                    FROM generate_series(1, 20) g""", (pid, uid, today))
    brief_seed.note(pid, "T" * 1_000_000, "C" * 1_000_000, updated_at=datetime.now(UTC) - timedelta(hours=1))
    for i in range(4):
        brief_seed.busy_project(uid, f"Small {i}", today)
    settings = h.settings(fake_llm, brief_max_projects=3, brief_max_tasks=5, brief_max_text=40,
                          prompt_max_chars=2_500, brief_max_chars=10_000)
    fake_llm.fail_when(lambda b: "Small" in _text(b, "user") and not summary_call(b),
                       Fault.content(reply("S" * 1999, risks=["R" * 999] * 10, next_steps=["N" * 999] * 10)))
    brief, sections = await run_brief(h, uid, settings)

    assert len(sections) == 3 and fake_llm.calls == 4
    assert max(prompt_chars(b) for b in fake_llm.requests) <= 2_500
    assert len(brief["summary_markdown"]) <= 10_000
    big = next(s for s in sections if s["name"].startswith("N"))
    assert big["name"] == "N" * 1_000_000  # the row itself is untouched; what the brief shows is cut
    section = big["metadata"]["section"]
    assert len(section["name"]) <= 40
    assert all(len(item) <= 40 for g in section["groups"] for item in g["items"])
    prompt = _text(next(b for b in fake_llm.requests if "NNNN" in _text(b, "user")), "user")
    assert "Overdue (20):" in prompt and "… and 15 more" in prompt
    assert brief["metadata"]["projects"]["more"] == 2


# --------------------------------------------------------------------------- Markdown injection


HOSTILE_NAMES = [
    "<script>alert(1)</script>",
    "[click](javascript:alert(1))",
    "<javascript:alert(1)>",
    "![beacon](http://evil.example/p.gif)",
    "\n\n\n",
    "Title\n---\n# Heading\n1. list",
    "| a | b |\n|---|---|",
    "```\ncode",
    "<img src=x onerror=alert(1)>",
    "&lt;script&gt;",
]


@pytest.mark.parametrize("llm", [True, False], ids=["llm", "deterministic"])
async def test_user_and_model_text_cannot_inject_markdown_or_html(briefs_harness: Any, brief_seed: Any,
                                                                  fake_llm: FakeLLM, llm: bool) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("<b>Eve</b>\n# boss")
    for i, name in enumerate(HOSTILE_NAMES):
        pid = brief_seed.busy_project(uid, name, today)
        brief_seed.task(pid, HOSTILE_NAMES[-1 - i], due_date=today - timedelta(days=1), priority="high")
        brief_seed.note(pid, "note\x1b]0;title\x07", "ctrl\x1b[2J\x08\x7f\x85 chars\n---\n<script>x</script>",
                        updated_at=datetime.now(UTC) - timedelta(hours=1))
    # The model echoes hostile text back (the fake's default reply repeats the project name).
    fake_llm.fail_when(summary_call, Fault.content(json.dumps({
        "summary": "<script>steal()</script>\n\n---\n\n[x](javascript:1) ![i](http://evil.example/b.gif)",
        "priority_actions": ["<javascript:alert(1)>", "# heading", "1. one\n2. two"]})))
    settings = h.settings(fake_llm if llm else None)
    await h.enqueue(uid)
    await h.run(settings, **({} if llm else {"services": {}}))
    brief = await h.brief(uid)
    assert brief["status"] == "completed"
    md = brief["summary_markdown"]
    assert_safe_markdown(md)
    assert md.count("\n### ") == len(HOSTILE_NAMES)  # one heading per project, none injected
    assert len(re.findall(r"^## ", md, re.MULTILINE)) == 3  # Summary, Priority actions, Projects
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "\\[click\\](javascript:alert(1))" in md
    assert "### (untitled project)" in md  # the name of only newlines
    assert "Hi &lt;b&gt;Eve&lt;/b&gt; \\# boss, here is your brief" in md  # the user name of two lines
    sections = await h.sections(brief["id"])
    for s in sections:
        assert_safe_markdown(s["content_markdown"])
    assert_storable([brief, sections])
    if llm:  # and the prompts: no forged lines
        for body in fake_llm.requests:
            user = _text(body, "user")
            assert render.USER_MARKER not in user and "\x1b" not in user
            assert len(re.findall(r"^Project: ", user, re.MULTILINE)) == (len(HOSTILE_NAMES)
                                                                          if summary_call(body) else 1)


# --------------------------------------------------------------------------- malformed replies


MALFORMED = {
    "not json": "Sure! Here is your brief.",
    "json array": "[1, 2, 3]",
    "json null": "null",
    "wrong types": json.dumps({"summary": 42, "highlights": "x", "risks": {}, "next_steps": None}),
    "nested objects": json.dumps({"summary": "s", "highlights": [{"a": {"b": [1]}}]}),
    "ten thousand items": json.dumps({"summary": "s", "risks": ["r"] * 10_000}),
    "nan": '{"summary": NaN, "highlights": [NaN]}',
    "empty summary": json.dumps({"summary": " \u0000 \n"}),
    "huge reply": json.dumps({"summary": "s" * 2_000_000}),
    "deep nesting": "[" * 100_000 + "]" * 100_000,
}
DEGRADED = {  # clipped or cleaned, still the model's section
    "huge strings": reply("H" * 100_000, highlights=["h" * 100_000]),
    "html and markdown": reply("<script>x()</script> [a](javascript:b)", risks=["![t](http://evil.example/t)"]),
}


async def test_every_malformed_reply_shape_degrades_that_section_alone(briefs_harness: Any, brief_seed: Any,
                                                                       fake_llm: FakeLLM) -> None:
    h = briefs_harness
    today = datetime.now(UTC).date()
    uid = brief_seed.user("Ada")
    cases = {**MALFORMED, **DEGRADED}
    for i, content in enumerate(cases.values()):
        name = f"Case {i:02d}"
        brief_seed.busy_project(uid, name, today)
        fake_llm.fail_when(project_call(name), Fault.content(content))
    brief_seed.busy_project(uid, "Good", today)
    settings = h.settings(fake_llm, llm_max_retries=1)
    brief, sections = await run_brief(h, uid, settings)

    assert brief["status"] == "partial"
    by_name = {s["name"]: s for s in sections}
    assert by_name["Good"]["metadata"]["source"] == "llm"
    for i, case in enumerate(cases):
        row = by_name[f"Case {i:02d}"]
        if case in MALFORMED:
            assert row["status"] == "failed", case
            assert row["metadata"]["source"] == "fallback" and row["metadata"]["error_kind"] == "malformed", case
            assert "malformed" in row["error"], case
            assert f"Case {i:02d} overdue 0" in row["content_markdown"], case
        else:
            assert row["status"] == "completed" and row["metadata"]["source"] == "llm", case
        assert len(row["content_markdown"]) < 20_000, case
        assert_safe_markdown(row["content_markdown"])
    assert len(brief["summary_markdown"]) <= settings.brief_max_chars
    assert brief["metadata"]["llm_failures"] == len(MALFORMED)
    # Two attempts for each malformed one, one for the rest and the summary.
    assert brief["metadata"]["llm_requests"] == fake_llm.calls == 2 * len(MALFORMED) + len(DEGRADED) + 2
    assert_safe_markdown(brief["summary_markdown"])
