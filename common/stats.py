"""Counters an operator (or a test) can read without scraping log text.

On SIGUSR1, and once more when the process stops, the service's counters are written as one JSON
object to `--stats-file` (atomically: a temporary file renamed over the old one) and logged as one
line. `seq` grows by one per dump, so a reader that sent SIGUSR1 waits for a larger `seq`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("mptun")


class StatsDump:
    """Writes `snapshot()` to `path` (when set) and to the log; owned by one service."""

    def __init__(self, path: str | os.PathLike[str] | None, snapshot: Callable[[], Mapping]):
        self.path = Path(path) if path else None
        self.snapshot = snapshot
        self.seq = 0

    def __call__(self) -> None:
        self.seq += 1
        data: dict[str, Any] = {"seq": self.seq, "pid": os.getpid(), "time": time.time()}
        data.update(self.snapshot())
        import json  # at the first dump (at stop, or on a signal): an idle service never loads it

        text = json.dumps(data, sort_keys=True)
        log.info("stats: %s", text)
        if self.path is None:
            return
        try:
            import tempfile  # here: it pulls in shutil, bz2 and lzma, for a rare dump

            fd, tmp = tempfile.mkstemp(prefix=".stats-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot write stats to %s: %s", self.path, e.strerror)


def read_stats(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last dump in `path`, or None when there is none yet."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
