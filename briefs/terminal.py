"""Text that reaches an operator's terminal: hostile data cannot drive it.

Stored text (brief Markdown, job errors, user names) may hold escape sequences
that move the cursor, rewrite earlier lines, set the window title, hide text or
plant hyperlinks. ``printable`` removes them: ANSI/VT escape sequences (CSI, OSC,
DCS and the other string sequences, two-character escapes), C0 controls other
than newline and tab, DEL, C1 controls, and the Unicode bidirectional overrides
and isolates that can make a line read differently from what it holds. Linear in
its input.
"""

from __future__ import annotations

import re

_CONTROLS = re.compile(
    r"\x1b\[[0-?]*+[ -/]*+[@-~]?"  # CSI … final byte
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*+(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC … terminator
    r"|\x1b[ -/]*+[0-~]?"  # other escapes (charset designation, two-character sequences), or a lone ESC
    r"|\x9b[0-?]*+[ -/]*+[@-~]?"  # 8-bit CSI
    r"|[\x9d\x90\x98\x9e\x9f][^\x07\x1b\x9c]*+(?:\x07|\x1b\\|\x9c)?"  # 8-bit OSC, DCS, SOS, PM, APC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"  # other C0 (not \t \n), DEL, C1, bidi
)
_LINE_BREAKS = re.compile(r"[\t\n]+")


def printable(text: str) -> str:
    """``text`` without terminal control sequences; newlines and tabs are kept."""
    return _CONTROLS.sub("", text)


def one_line(text: str, limit: int | None = None) -> str:
    """``printable`` on one line (newlines and tabs become spaces), cut to ``limit`` with an ellipsis."""
    if limit is not None:
        text = text[: limit * 4 + 64]  # bound the work before cleaning; cut precisely after
    text = _LINE_BREAKS.sub(" ", printable(text)).strip()
    if limit is not None and len(text) > limit:
        return text[: max(limit - 1, 0)] + "…"
    return text
