"""A progress bar on stderr for long benchmark runs (no dependency; quiet when not a TTY
except for one line per finished step, so CI logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``total`` steps; ``step(label)`` after each one. Sections call ``note`` for detail."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = ""

    def start(self, label: str) -> None:
        """Say what the next step is doing."""
        self.label = label
        self._draw()

    def step(self, label: str | None = None) -> None:
        self.done = min(self.total, self.done + 1)
        if label is not None:
            self.label = label
        self._draw(finished=True)

    def note(self, text: str) -> None:
        self._write(f"  {text}\n")

    def close(self) -> None:
        if self.tty:
            self._write("\n")

    def _draw(self, finished: bool = False) -> None:
        filled = int(self.WIDTH * self.done / self.total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        elapsed = time.monotonic() - self.started
        line = f"[{bar}] {self.done}/{self.total} {elapsed:6.1f}s  {self.label}"
        if self.tty:
            self._write("\r" + line[:120].ljust(120))
        elif finished:
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
