"""No function over 50 lines (docstring included), unless a comment just above it says why it reads better whole."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("briefs", "worker", "scheduler")
MAX_LINES = 50
EXCUSE = "reads better whole"


def _long_functions() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines), str(path))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                above = lines[first - 2] if first >= 2 else ""
                if length > MAX_LINES and not (above.strip().startswith("#") and EXCUSE in above):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_fifty_lines_without_a_reason() -> None:
    assert _long_functions() == [], (
        f"split these, or say in a comment just above why each {EXCUSE}: {_long_functions()}"
    )
