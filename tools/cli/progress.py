"""Progress display for the CLI: stderr, and only when stderr is a terminal.

Library code takes plain callbacks (``say(message)``, ``count(done, total)``); this
module turns them into a status line with elapsed time.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Draws one updating status line on a TTY; does nothing otherwise."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()
        self._open = False

    def _draw(self, text: str, end: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r\033[K[{elapsed:6.1f}s] {text}{end}")
        self.stream.flush()
        self._open = not end

    def say(self, message: str) -> None:
        """A new stage: finish the previous line and start a new one."""
        if self._open:
            self.stream.write("\n")
        self._draw(message)

    def count(self, done: int, total: int, label: str = "") -> None:
        """A bar for a step with a known number of parts."""
        width = 24
        filled = int(width * done / max(total, 1))
        self._draw(f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")

    def close(self) -> None:
        if self.enabled and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
