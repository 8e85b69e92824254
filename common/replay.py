"""Replay defence for first flights: a timestamp window plus a cache of accepted salts.

A first flight is accepted only if its timestamp is within `window` seconds of the server's clock
and its salt has not been accepted before. A salt is remembered for `2 * window` seconds from its
acceptance, which outlives every moment its timestamp could still pass the window check (also when
the server's clock steps back by up to `window`). Memory is bounded by `capacity`: when the cache is
full of live salts the guard refuses new flights (Status.REPLAY_FULL) instead of forgetting old
salts, because forgetting would reopen a replay. `not_before` refuses timestamps from before the
server started, which makes a replay cache lost by a restart harmless for clients whose clocks are
not ahead; `save_file`/`load_file` carry the cache across a clean restart for the rest
(docs/PROBING.md, "Replay", weighs the two).

Memory: one entry costs about 200 bytes (a 32-byte salt object, a dict slot and a deque tuple;
measured by tests/test_replay_defence.py), so the default capacity of 200,000 is ~40 MB and covers
a sustained 1,600 new tunnels per second at the default window.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from pathlib import Path

from mptun.common.errors import ProtocolError, Status

DEFAULT_WINDOW = 60.0
DEFAULT_CAPACITY = 200_000
_FILE_MAGIC = b"mptun-replay-v1\n"
_ENTRY = struct.Struct("!32sd")  # salt, expiry (seconds since the epoch)


class ReplayGuard:
    """Sans-I/O: the caller passes the current time; nothing here reads a clock."""

    def __init__(
        self,
        window: float = DEFAULT_WINDOW,
        capacity: int = DEFAULT_CAPACITY,
        not_before: float | None = None,
    ) -> None:
        if window <= 0 or capacity <= 0:
            raise ValueError("window and capacity must be positive")
        self.window = window
        self.capacity = capacity
        self.not_before = not_before
        self._expiry: dict[bytes, float] = {}
        self._order: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._expiry)

    def set_window(self, window: float) -> None:
        """Change the window (on reload); remembered salts are kept long enough for the new one."""
        if window <= 0:
            raise ValueError("window must be positive")
        grow = 2 * (window - self.window)
        if grow > 0:  # every salt must outlive 2 * window from its acceptance
            self._expiry = {s: t + grow for s, t in self._expiry.items()}
            self._order = deque((t + grow, s) for t, s in self._order)
        self.window = window

    def _expire(self, now: float) -> None:
        order, expiry = self._order, self._expiry
        # Strictly before `now`: at now == expiry the timestamp can still pass the window check
        # (|now - ts| == window), so the salt must still be there.
        while order and order[0][0] < now:
            _, salt = order.popleft()
            expiry.pop(salt, None)

    def check_timestamp(self, timestamp: float, now: float) -> None:
        """Raise ProtocolError(CLOCK) unless `timestamp` is acceptable at `now`."""
        if abs(now - timestamp) > self.window:
            raise ProtocolError(
                f"timestamp {now - timestamp:+.0f} s off the server clock "
                f"(window {self.window:g} s)",
                Status.CLOCK,
            )
        if self.not_before is not None and timestamp < self.not_before:
            raise ProtocolError("timestamp from before the server started", Status.CLOCK)

    def accept(self, salt: bytes, timestamp: float, now: float) -> None:
        """Check and record a salt in one step (call only after the flight authenticated)."""
        self.check_timestamp(timestamp, now)
        self._expire(now)
        if salt in self._expiry:
            raise ProtocolError("salt seen before: replayed first flight", Status.REPLAY)
        if len(self._expiry) >= self.capacity:
            raise ProtocolError("replay cache full: refusing new flights", Status.REPLAY_FULL)
        until = now + 2 * self.window
        self._expiry[salt] = until
        self._order.append((until, salt))

    def snapshot(self) -> list[tuple[bytes, float]]:
        """The live salts with their expiry, for carrying the cache across a reload."""
        return list(self._expiry.items())

    def restore(self, entries: list[tuple[bytes, float]], now: float) -> None:
        for salt, until in sorted(entries, key=lambda e: e[1]):
            if until > now and salt not in self._expiry:
                self._expiry[salt] = until
                self._order.append((until, salt))


def save_file(guard: ReplayGuard, path: str | os.PathLike[str], now: float) -> int:
    """Write the live salts to `path` (atomically, mode 600); how many were written."""
    guard._expire(now)
    entries = guard.snapshot()
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_FILE_MAGIC)
        for salt, until in entries:
            f.write(_ENTRY.pack(salt, until))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(entries)


def load_file(guard: ReplayGuard, path: str | os.PathLike[str], now: float) -> int | None:
    """Restore salts saved by `save_file`; how many are still live, None if there is no file.

    The file is consumed (deleted) so that a later crash cannot restore a stale copy as if it were
    complete. A damaged file raises ValueError.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    if not data.startswith(_FILE_MAGIC) or (len(data) - len(_FILE_MAGIC)) % _ENTRY.size:
        raise ValueError(f"{p}: not a replay cache file")
    entries = [
        (salt, until) for salt, until in _ENTRY.iter_unpack(memoryview(data)[len(_FILE_MAGIC) :])
    ]
    before = len(guard)
    guard.restore(entries, now)
    p.unlink()
    return len(guard) - before
