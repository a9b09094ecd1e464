"""Rendering with Jinja2: prompts, the Markdown brief, the email parts, the subject line.

Two environments over ``briefs/templates``: one for text and Markdown (prompts,
``brief.md.j2``, ``email.txt.j2``; no escaping — nothing there is parsed as
HTML) and one for HTML with autoescape on (``email.html.j2``: task titles and
project names are user data).

A project's section is kept as data (:class:`Section`: a summary and titled
lists of plain-text items), stored in ``project_daily_briefs.metadata.section``,
and rendered to Markdown for the brief and to HTML for the email, so the email
never has to parse Markdown.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import jinja2

from briefs.contract import DORMANT, REENGAGE, REENGAGE_LATE, STAGES, STANDARD

TEMPLATES = Path(__file__).parent / "templates"


USER_MARKER = "\u241e=== user message ===\u241e"

# --------------------------------------------------------------------------- hostile text
#
# Every string that comes from a user's rows or from the LLM is hostile until it passed here.
# ``clean`` makes it storable and printable: PostgreSQL refuses NUL in text and jsonb, UTF-8 cannot
# encode a lone surrogate (JSON's "\ud800" decodes to one), C0/C1 control characters drive terminals
# (``briefs show``), bidirectional overrides disguise text, U+241E is the prompt's system/user
# split marker, and a run of combining marks is cut to three. ``md_inline`` then escapes for the
# Markdown brief; ``plain_inline`` is the same without Markdown escaping, for prompts and plain text.

# C0 except tab and newline, DEL, C1, surrogates, bidi embeddings/overrides/isolates, the prompt marker.
_UNSAFE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\u241e]")
# Whole terminal escape sequences (CSI, OSC, other ESC sequences, and their C1 forms), so none leaves its
# parameters behind once the control characters are gone.
_ESCAPE_SEQ_RE = re.compile(
    "(?:\x1b\\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI … final byte
    "|(?:\x1b\\]|\x9d)[^\x07\x1b\x9c]{0,512}(?:\x07|\x1b\\\\|\x9c)?"  # OSC … BEL or ST
    "|\x1b[ -/]*[0-~]?"  # any other escape sequence
)
# Combining marks past the third in a row (Unicode categories Mn, Mc, Me). Real text stacks two or
# three; a name of thousands ("Zalgo") draws a tower over the lines above and below it (email,
# terminal, console). A regex class of every mark is slow in ``re`` (~300 ranges), so marks are
# flattened to U+0300 with ``str.translate`` (one char for one: offsets stay) and runs found there.
MAX_MARKS = 3
_FLAT_MARK = "\u0300"
_MARK_RUN_RE = re.compile(f"{_FLAT_MARK}{{{MAX_MARKS + 1},}}")


@cache
def _mark_table() -> dict[int, int]:
    planes = (*range(0x30000), *range(0xE0000, 0xE1000))  # where marks are (E0100..: variation selectors)
    return dict.fromkeys((cp for cp in planes if unicodedata.category(chr(cp))[0] == "M"), ord(_FLAT_MARK))


def cap_marks(text: str) -> str:
    """``text`` with every run of combining marks cut to ``MAX_MARKS``."""
    if text.isascii():
        return text
    flat = text.translate(_mark_table())
    if _FLAT_MARK * (MAX_MARKS + 1) not in flat:
        return text
    out, pos = [], 0
    for run in _MARK_RUN_RE.finditer(flat):
        out.append(text[pos : run.start() + MAX_MARKS])
        pos = run.end()
    out.append(text[pos:])
    return "".join(out)


_MD_CHARS_RE = re.compile(r"([\\`*_\[\]#|~])")
_MD_LEAD_RE = re.compile(r"^(?:([-+=])|(\d{1,9})([.)]))")
CLIP_MARK = "…"


def clean(text: object) -> str:
    """``text`` as a string PostgreSQL can store and a terminal can print (newlines and tabs kept)."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x1b" in text or "\x9b" in text or "\x9d" in text:
        text = _ESCAPE_SEQ_RE.sub("", text)
    return cap_marks(_UNSAFE_RE.sub("", text))


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, an ellipsis marking a cut."""
    if limit <= 0:
        return ""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + CLIP_MARK


def plain_inline(text: object, limit: int | None = None) -> str:
    """One clean line of plain text: whitespace runs (newlines included) collapse to one space."""
    line = " ".join(clean(text).split())
    return clip(line, limit) if limit is not None else line


def md_escape(line: str) -> str:
    """One line of text, escaped so Markdown shows it literally: no HTML, link, image, emphasis,
    code, heading, table, list or quote can come out of it. HTML's ``< > &`` become entities (so an
    autolink ``<javascript:…>`` or a ``<script>`` is text, also for renderers that pass HTML through),
    the rest of Markdown's punctuation gets a backslash, and so do line-start list/setext markers."""
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    line = _MD_CHARS_RE.sub(r"\\\1", line)
    return _MD_LEAD_RE.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", line, count=1)


UNTITLED = "(untitled project)"


def project_title(name: object, limit: int | None = None) -> str:
    """A project's name as one clean line; a name with nothing printable in it gets a placeholder."""
    return plain_inline(name, limit) or UNTITLED


def md_inline(text: object, limit: int | None = None) -> str:
    """User or model text as one line of Markdown: cleaned, newlines collapsed, escaped."""
    return md_escape(plain_inline(text, limit))


def paragraphs(text: object) -> list[str]:
    """Clean plain-text paragraphs (split at blank lines), each on one line."""
    return [p for p in (plain_inline(part) for part in clean(text).split("\n\n")) if p]


def md_paragraphs(text: object) -> list[str]:
    """Paragraphs of user or model text, each one escaped Markdown line."""
    return [md_escape(p) for p in paragraphs(text)]


def scrub(value: Any) -> Any:
    """A JSON-ready value made storable: every string (keys too) cleaned, NaN/±inf as null."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k) if isinstance(k, str) else k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Group:
    heading: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Section:
    """One project's part of a brief, independent of the output format."""

    project_id: int
    name: str
    summary: str
    groups: tuple[Group, ...] = ()
    source: str = "deterministic"  # llm | deterministic | fallback
    note: str | None = None  # shown under the heading (e.g. why this is a plain list)

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready data: the JSON of ``dataclasses.asdict``, built directly (20× cheaper than its deep copy)."""
        return {
            "project_id": self.project_id,
            "name": self.name,
            "summary": self.summary,
            "groups": [{"heading": g.heading, "items": list(g.items)} for g in self.groups],
            "source": self.source,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Section:
        """The section stored by :meth:`to_dict`; ``TypeError``/``ValueError`` for any other shape (stored
        metadata is hostile: an earlier run, or a hand-edited row, may have left anything there)."""

        def text(value: Any, what: str, *, optional: bool = False) -> Any:
            if (value is None and optional) or isinstance(value, str):
                return value
            raise TypeError(f"section {what}: expected text, got {type(value).__name__}")

        def items(value: Any, what: str) -> list[Any]:
            if value is None:
                return []
            if not isinstance(value, list):
                raise TypeError(f"section {what}: expected a list, got {type(value).__name__}")
            return value

        if not isinstance(data, dict):
            raise TypeError(f"section: expected an object, got {type(data).__name__}")
        groups = []
        for g in items(data.get("groups"), "groups"):
            if not isinstance(g, dict):
                raise TypeError(f"section group: expected an object, got {type(g).__name__}")
            groups.append(Group(text(g.get("heading"), "heading"),
                                tuple(text(i, "item") for i in items(g.get("items"), "items"))))
        project_id = data.get("project_id")
        if type(project_id) is not int:
            raise TypeError(f"section project_id: expected an integer, got {type(project_id).__name__}")
        return cls(
            project_id=project_id,
            name=text(data.get("name"), "name"),
            summary=text(data.get("summary"), "summary", optional=True) or "",
            groups=tuple(groups),
            source=text(data.get("source"), "source", optional=True) or "deterministic",
            note=text(data.get("note"), "note", optional=True),
        )

    def trimmed(self, max_items: int | None) -> Section:
        """At most ``max_items`` per group (None: all; 0: no groups), with an "and N more" line."""
        if max_items is None:
            return self
        groups: list[Group] = []
        if max_items > 0:
            for g in self.groups:
                if len(g.items) > max_items:
                    groups.append(Group(g.heading, (*g.items[:max_items], f"… and {len(g.items) - max_items} more")))
                else:
                    groups.append(g)
        return Section(self.project_id, self.name, self.summary, tuple(groups), self.source, self.note)


# What the reader of a brief written without AI because the day's LLM budget was spent is told
# (BriefView.llm_off_reason; the brief's metadata has ``llm_budget``).
BUDGET_NOTICE = ("The service's daily AI budget has been reached, so this brief lists your tasks as they are "
                 "instead of summarising them; AI summaries resume tomorrow (UTC).")


@dataclass(frozen=True)
class BriefView:
    """Everything the brief and email templates show."""

    user_name: str
    brief_date: date
    stage: str
    subject: str
    llm_enabled: bool
    executive_summary: str
    priority_actions: tuple[str, ...]
    sections: tuple[Section, ...]
    status: str = "completed"
    summary_source: str = "llm"  # llm | deterministic | fallback
    catch_up: bool = False
    # Email only: how much was left out and where the full brief lives.
    omitted: tuple[str, ...] = ()
    full_url: str | None = None
    unsubscribe_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    more_projects: int = 0  # active projects left out of the brief (brief_max_projects), as a count
    more_names: tuple[str, ...] = ()  # the first few of those, by name
    truncated: bool = False  # lists were shortened to fit the brief's size limit
    llm_off_reason: str | None = None  # an LLM is configured, yet this brief was written without it (and why)

    @property
    def fallback_sections(self) -> int:
        return sum(1 for s in self.sections if s.source == "fallback")


@lru_cache(maxsize=1024)  # strftime is slow and a brief formats the same few dates many times
def long_date(value: date) -> str:
    return f"{value:%A} {value.day} {value:%B %Y}"


@lru_cache(maxsize=1024)
def short_date(value: date | None) -> str:
    if value is None:
        return ""
    return f"{value:%a} {value.day} {value:%b}"


def _common(env: jinja2.Environment) -> jinja2.Environment:
    env.filters["long_date"] = long_date
    env.filters["short_date"] = short_date
    # Plain text (prompts, the text email; the HTML email autoescapes on top): cleaned, one line.
    env.filters["paragraphs"] = paragraphs
    env.filters["oneline"] = plain_inline
    # Markdown (the stored brief): every user or model string goes through one of these two.
    env.filters["md"] = md_inline
    env.filters["md_paragraphs"] = md_paragraphs
    env.globals["STANDARD"] = STANDARD
    env.globals["REENGAGE"] = REENGAGE
    env.globals["REENGAGE_LATE"] = REENGAGE_LATE
    env.globals["DORMANT"] = DORMANT
    return env


# Both environments are built once per process and compile each template once. The templates ship
# with the package, so ``auto_reload`` is off: no stat() of the template file on every render.


def _env(*, html: bool) -> jinja2.Environment:
    return _common(
        jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            auto_reload=False,
            autoescape=html,  # HTML escapes user data (task titles); Markdown and prompts stay verbatim
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=not html,
        )
    )


@cache
def text_env() -> jinja2.Environment:
    return _env(html=False)


@cache
def html_env() -> jinja2.Environment:
    return _env(html=True)


@cache
def _text(name: str) -> jinja2.Template:
    return text_env().get_template(name)


@cache
def _html(name: str) -> jinja2.Template:
    return html_env().get_template(name)


def _messages(name: str, **context: Any) -> list[dict[str, str]]:
    """A prompt template's two blocks as chat messages.

    The template renders ``{% block system %}``, the marker, then ``{% block user %}``.
    The system block holds no user data, and user data cannot hold the marker (``clean``
    drops its character), so splitting at the first marker is safe.
    """
    text = _text(name).render(USER_MARKER=USER_MARKER, **context)
    system, _, user = text.partition(USER_MARKER)
    return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip()}]


def normal_stage(stage: str | None) -> str:
    return stage if stage in STAGES else STANDARD


def prompt_chars(messages: Sequence[dict[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


PROMPT_CUT_NOTE = "\n[… the rest was cut to fit the prompt size limit]"


def _fit_prompt(
    render_level: Callable[[int], list[dict[str, str]]], levels: int, max_chars: int | None
) -> list[dict[str, str]]:
    """The first rendering (most detailed first) within ``max_chars``; else the least detailed one, cut."""
    messages = render_level(0)
    if max_chars is None:
        return messages
    for level in range(1, levels):
        if prompt_chars(messages) <= max_chars:
            return messages
        messages = render_level(level)
    if prompt_chars(messages) <= max_chars:
        return messages
    system, user = messages[0]["content"], messages[1]["content"]
    system = clip(system, max(0, max_chars - 300))  # the fixed instructions: only cut with a tiny limit
    room = max(0, max_chars - len(system) - len(PROMPT_CUT_NOTE))
    return [{"role": "system", "content": system}, {"role": "user", "content": user[:room] + PROMPT_CUT_NOTE}]


# --------------------------------------------------------------------------- prompts

# (tasks listed per bucket, characters per title/note) from the most detailed prompt to the least.
PROJECT_PROMPT_LEVELS = ((20, 500), (10, 250), (5, 150), (3, 100), (1, 60))
# (key tasks per project, characters per project name, characters of each project's status line).
SUMMARY_PROMPT_LEVELS = ((3, 120, 220), (1, 80, 120), (0, 60, 0))


def project_messages(
    project: Any,
    brief_date: date,
    stage: str,
    *,
    max_items: int = 20,
    max_text: int = 500,
    max_chars: int | None = None,
) -> list[dict[str, str]]:
    """The chat messages asking for one project's brief (``project`` is a loading.ProjectContext).

    At most ``max_items`` tasks per bucket and ``max_text`` characters per title, name or note;
    when ``max_chars`` is given, the prompt (every message's content) is made to fit it: fewer
    tasks and shorter texts first, then a hard cut.
    """
    levels = [(max_items, max_text)] + [
        (min(n, max_items), min(t, max_text)) for n, t in PROJECT_PROMPT_LEVELS if n < max_items or t < max_text
    ]

    def at(level: int) -> list[dict[str, str]]:
        items, text = levels[level]
        return _messages(
            "project_prompt.md.j2",
            project=project,
            brief_date=brief_date,
            stage=normal_stage(stage),
            max_items=items,
            text_max=text,
        )

    return _fit_prompt(at, len(levels), max_chars)


def summary_messages(
    lines: Sequence[dict[str, Any]],
    brief_date: date,
    stage: str,
    user_name: str,
    *,
    more_projects: int = 0,
    max_chars: int | None = None,
) -> list[dict[str, str]]:
    """The chat messages asking for the executive summary over every included project's compact line
    (``more_projects``: active projects left out of the brief, given as a count)."""

    def at(level: int) -> list[dict[str, str]]:
        top, name_max, status_max = SUMMARY_PROMPT_LEVELS[level]
        return _messages(
            "summary_prompt.md.j2",
            projects=lines,
            more_projects=more_projects,
            brief_date=brief_date,
            stage=normal_stage(stage),
            user_name=user_name,
            top_max=top,
            name_max=name_max,
            status_max=status_max,
        )

    return _fit_prompt(at, len(SUMMARY_PROMPT_LEVELS), max_chars)


# --------------------------------------------------------------------------- outputs


def subject(stage: str, brief_date: date, user_name: str) -> str:
    module = _text("_stages.j2").module
    name = plain_inline(user_name, 100)
    return plain_inline(module.subject(normal_stage(stage), brief_date, name))  # type: ignore[attr-defined]


CUT_NOTE = "\n\n_This brief was cut at its size limit._\n"


def _cut_markdown(text: str, max_chars: int) -> str:
    """``text`` cut at a line boundary so that, with a note saying so, it fits ``max_chars``."""
    head = text[: max(0, max_chars - len(CUT_NOTE))]
    line_end = head.rfind("\n")
    if line_end > 0:
        head = head[:line_end]
    return head.rstrip() + CUT_NOTE


def section_markdown(section: Section, max_chars: int | None = None) -> str:
    text = _text("section.md.j2").render(section=section).strip() + "\n"
    return text if max_chars is None or len(text) <= max_chars else _cut_markdown(text, max_chars)


def brief_markdown(view: BriefView, max_chars: int | None = None) -> str:
    """The brief as Markdown; with ``max_chars``, it fits: fewer items per list, then none, then a cut."""
    text = _text("brief.md.j2").render(brief=view).strip() + "\n"
    if max_chars is None or len(text) <= max_chars:
        return text
    for items in (5, 2, 0):
        shorter = replace(view, sections=tuple(s.trimmed(items) for s in view.sections), truncated=True)
        text = _text("brief.md.j2").render(brief=shorter).strip() + "\n"
        if len(text) <= max_chars:
            return text
    return _cut_markdown(text, max_chars)


def email_text(view: BriefView) -> str:
    return _text("email.txt.j2").render(brief=view).strip() + "\n"


def email_html(view: BriefView) -> str:
    return _html("email.html.j2").render(brief=view)


REPLY_SUMMARY_MAX = 2000


def section_from_llm(project_id: int, name: str, reply: Any, *, max_text: int = 500) -> Section:
    """A Section from a validated ``ProjectBrief`` reply: every string cleaned, one line, clipped."""
    groups = []
    for heading, items in (("Highlights", reply.highlights), ("Risks", reply.risks), ("Next steps", reply.next_steps)):
        cleaned = clean_lines(items, max_text)
        if cleaned:
            groups.append(Group(heading, cleaned))
    summary = plain_inline(reply.summary, REPLY_SUMMARY_MAX)
    return Section(project_id, project_title(name, max_text), summary, tuple(groups), source="llm")


def clean_lines(items: Iterable[object], limit: int | None = None) -> tuple[str, ...]:
    return tuple(x for x in (plain_inline(i, limit) for i in items) if x)
