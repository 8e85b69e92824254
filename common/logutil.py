"""Logging helpers: byte counts for humans and burst-limited messages (one line per burst)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class BurstLog:
    """Logs the first event of a burst at once, then at most one summary per `interval`."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.WARNING,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.level, self.interval, self.clock = logger, level, interval, clock
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._last >= self.interval:
            if self._suppressed:
                self.logger.log(
                    self.level,
                    "%d more like this in the last %.0f s",
                    self._suppressed,
                    now - self._last,
                )
            self.logger.log(self.level, msg, *args)
            self._last = now
            self._suppressed = 0
        else:
            self._suppressed += 1
