"""Replay defence for first flights: a timestamp window plus a cache of accepted salts.

A first flight is accepted only if its timestamp is within `window` seconds of the server's clock
and its salt has not been accepted before. A salt is remembered for `2 * window` seconds from its
acceptance, which outlives every moment its timestamp could still pass the window check (also when
the server's clock steps back by up to `window`). Memory is bounded by `capacity`: when the cache is
full of live salts the guard refuses new flights (Status.REPLAY_FULL) instead of forgetting old
salts, because forgetting would reopen a replay. `not_before` refuses timestamps from before the
server started, which makes a replay cache lost by a restart harmless.
"""

from __future__ import annotations

from collections import deque

from mptun.common.errors import ProtocolError, Status

DEFAULT_WINDOW = 60.0
DEFAULT_CAPACITY = 200_000


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

    def _expire(self, now: float) -> None:
        order, expiry = self._order, self._expiry
        while order and order[0][0] <= now:
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
