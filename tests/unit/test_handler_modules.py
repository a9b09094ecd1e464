"""BRIEFS_HANDLER_MODULES naming a module that cannot serve: one line naming it, the worker does not start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from briefs.errors import PermanentError
from briefs.settings import Settings
from worker.handlers import build_handlers

GOOD = "from worker.runner import Handler\nasync def run(ctx): return None\n"


@pytest.mark.parametrize(
    ("source", "says"),
    [
        # Each of these used to escape as "unexpected <Error>" or, for SystemExit, to end the
        # worker silently with exit status 0.
        ("raise RuntimeError('boom at import')", "cannot import 'hostile_mod': RuntimeError: boom at import"),
        ("raise ValueError('one\\ntwo')", "cannot import 'hostile_mod': ValueError: one two"),
        ("import sys\nsys.exit(0)", "cannot import 'hostile_mod': SystemExit: 0"),
        ("def (", "cannot import 'hostile_mod': SyntaxError"),
        ("HANDLERS = [1]", "'hostile_mod' has no HANDLERS dict"),
        ("HANDLERS = {'x': 1}", "HANDLERS['x'] is of type int, not a worker.runner.Handler"),
        (GOOD + "HANDLERS = {2: Handler(run)}", "HANDLERS[2] is not keyed by a job type"),
        (GOOD + "HANDLERS = {'': Handler(run)}", "HANDLERS[''] is not keyed by a job type"),
        (GOOD + "HANDLERS = {'x': Handler(run, timeout=-1)}", "HANDLERS['x'] has the timeout -1"),
        (GOOD + "HANDLERS = {'x': Handler(run, timeout=float('inf'))}", "HANDLERS['x'] has the timeout inf"),
        (GOOD + "HANDLERS = {'x': Handler(None)}", "HANDLERS['x'] is a Handler whose function is None, not callable"),
    ],
)
def test_a_module_that_cannot_serve_is_refused_by_name(
    source: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hostile_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hostile_mod", raising=False)
    settings = Settings(_env_file=None, handler_modules="hostile_mod")  # type: ignore[call-arg]
    with pytest.raises(PermanentError) as err:
        build_handlers(settings)
    message = str(err.value)
    assert message.startswith("BRIEFS_HANDLER_MODULES: ")
    assert says in message
    assert "\n" not in message


def test_a_good_module_adds_its_handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "good_mod.py").write_text(GOOD + "HANDLERS = {'extra': Handler(run, timeout=5)}")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = Settings(_env_file=None, handler_modules="good_mod")  # type: ignore[call-arg]
    handlers = build_handlers(settings)
    assert "extra" in handlers and "noop" in handlers
