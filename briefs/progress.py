"""Progress for long CLI work: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    def __init__(self, label: str, *, stream: TextIO | None = None, every: float = 0.1) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._drawn = False
        self._last_line_pct = -1

    def update(self, done: int, total: int, detail: str = "") -> None:
        total = max(total, 1)
        pct = int(100 * done / total)
        if self.tty:
            now = time.monotonic()
            if done < total and now - self._last < self.every:
                return
            self._last = now
            width = 30
            filled = int(width * done / total)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {detail[:40]:<40}")
            self.stream.flush()
            self._drawn = True
        elif pct >= self._last_line_pct + 10 or done == total:
            # Plain lines, at most one per 10 %, so logs stay readable.
            self._last_line_pct = pct
            suffix = f" ({detail})" if detail else ""
            self.stream.write(f"{self.label}: {done}/{total}{suffix}\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
