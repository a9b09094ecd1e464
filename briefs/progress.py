"""Progress for long CLI work: a bar on a terminal, plain lines otherwise.

On a terminal the bar is a live line (see ``briefs.logs.live_line``): a log record
written meanwhile clears the bar, takes its own line, and the bar is redrawn below
it, so bars and log lines never share a line.
"""

from __future__ import annotations

import contextlib
import sys
import time
from types import TracebackType
from typing import TextIO

from briefs.logs import LIVE_LOCK, live_line
from briefs.terminal import one_line

CLEAR_LINE = "\r\x1b[2K"


class Progress:
    def __init__(self, label: str, *, stream: TextIO | None = None, every: float = 0.1) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.every = every
        self._last = 0.0
        self._drawn = False
        self._text = ""
        self._last_line_pct = -1
        self._live: contextlib.ExitStack | None = None

    def update(self, done: int, total: int, detail: str = "") -> None:
        total = max(total, 1)
        pct = int(100 * done / total)
        if self.tty:
            now = time.monotonic()
            if done < total and now - self._last < self.every:
                return
            self._last = now
            width = 30
            filled = min(width, int(width * done / total))
            bar = "#" * filled + "-" * (width - filled)
            self._text = f"{self.label} [{bar}] {done}/{total} {one_line(detail, 40):<40}"
            with LIVE_LOCK:
                self.stream.write("\r" + self._text)
                self.stream.flush()
                self._drawn = True
        elif pct >= self._last_line_pct + 10 or done == total:
            # Plain lines, at most one per 10 %, so logs stay readable.
            self._last_line_pct = pct
            suffix = f" ({one_line(detail, 200)})" if detail else ""
            self.stream.write(f"{self.label}: {done}/{total}{suffix}\n")
            self.stream.flush()

    # The live-line protocol (called by the log handler, under LIVE_LOCK).
    def clear(self) -> None:
        if self._drawn:
            self.stream.write(CLEAR_LINE)

    def redraw(self) -> None:
        if self._drawn:
            self.stream.write("\r" + self._text)
            self.stream.flush()

    def __enter__(self) -> Progress:
        if self.tty:
            self._live = contextlib.ExitStack()
            self._live.enter_context(live_line(self))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None
        with LIVE_LOCK:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn = False
