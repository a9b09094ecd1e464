"""The import layers are a declared contract (``[tool.importlinter]`` in pyproject.toml), checked here and in CI.

Top to bottom: the composition root (``briefs.app`` and the ``__main__`` modules), the brief domain,
the scheduler, the queue worker, the brief-job contract, the plumbing. An import against that
direction fails the build; so does a new module that no layer names.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("briefs", "worker", "scheduler")
LINT = Path(sys.executable).with_name("lint-imports")


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if c["id"] == "layers"]
    return [[name.strip() for name in layer.split(":")] for layer in contract["layers"]]


def _modules(root: Path) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] != "__init__":
                found.append(".".join(parts))
    return found


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_layers_are_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_every_module_has_a_layer() -> None:
    named = [name for layer in _layers() for name in layer]
    unlayered = [m for m in _modules(ROOT) if not any(m == n or m.startswith(n + ".") for n in named)]
    assert unlayered == [], f"add these modules to a layer in pyproject.toml: {unlayered}"


def test_an_import_against_the_layers_breaks_the_build(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    queue = tmp_path / "worker" / "queue.py"
    queue.write_text(queue.read_text() + "\n\nfrom briefs import jobs  # the queue reaching up into the domain\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "worker.queue -> briefs.jobs" in result.stdout
