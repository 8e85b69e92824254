"""Replay defence for first flights: a timestamp window plus a cache of accepted salts.

A first flight is accepted only if its timestamp is within `window` seconds of the server's clock
and its salt has not been accepted before. A salt is remembered for `2 * window` seconds from its
acceptance, which outlives every moment its timestamp could still pass the window check (also when
the server's clock steps back by up to `window`). Memory is bounded by `capacity`: a full cache
refuses new flights instead of forgetting old salts, because forgetting would reopen a replay.

Fairness: with one shared key there is no client identity, so the cache is shared per *source*
(the caller's name for an address, e.g. an IPv4 address or an IPv6 /64): one source may hold at
most `share` of the capacity, so a single source at its maximum rate cannot deny the others.

Answering "full": near its limits (the last `1/16` of the capacity, or of a source's share) a
flight is remembered like an accepted one but refused with `Status.BUSY`, which the server answers
with the status "server full": the salt stays remembered, so the refused flight can never be
replayed into an acceptance later. Past the limits nothing more can be remembered and the flight
is refused silently (`Status.REPLAY_FULL`).

Restart: `not_before` refuses timestamps before the start (or up to a high-water mark persisted
before a crash) for one window after it, which makes a replay cache lost by a crash harmless;
`save_file`/`load_file` carry the cache across a clean restart (docs/PROBING.md, "Replay").

Memory: an entry is a 60-bit fingerprint of the salt (its random last bytes; a collision only
refuses one fresh flight as a replay, with odds of about n / 2**60) in one set, plus two slots in
a per-expiry bucket: about 90 bytes (measured by tests/test_replay_cache.py), so the default
capacity of 1,000,000 is ~90 MB when full and holds 2 x window's worth of a sustained 8,000 new
tunnels per second at the default window, more than the server accepts on one core.
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from mptun.common.errors import ProtocolError, Status

DEFAULT_WINDOW = 60.0
DEFAULT_CAPACITY = 1_000_000
SHARE = 4  # one source may hold at most 1/SHARE of the capacity
RESERVE = 16  # the last 1/RESERVE of a limit is answered "full" (remembered, refused)
_TICKS = 16  # expiry buckets per second
_FILE_MAGIC_V1 = b"mptun-replay-v1\n"
_FILE_MAGIC = b"mptun-replay-v2\n"
_ENTRY_V1 = struct.Struct("!32sd")  # salt, expiry (seconds since the epoch)
_ENTRY = struct.Struct("!Qd")  # fingerprint, expiry
_HWM = struct.Struct("!d")  # high-water mark file: one timestamp
_FP_MASK = (1 << 60) - 1
_UNKNOWN = ""  # the source of entries restored from a file


def fingerprint(salt: bytes) -> int:
    """A salt's 60-bit fingerprint: its last bytes (a client's `--prefix` replaces the first
    ones, the last 16 are always random; docs/PROTOCOL.md), in a small int object."""
    return int.from_bytes(salt[-8:], "big") & _FP_MASK


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
        # Timestamps before this one are refused (for a window after a start without the cache).
        self.not_before = not_before
        # Called with the timestamp before a salt is remembered (the high-water mark's hook).
        self.before_remember: Callable[[float], None] | None = None
        self._seen: set[int] = set()
        # (expiry tick, fingerprints, their sources), expiry ticks ascending
        self._buckets: deque[tuple[int, list[int], list[str]]] = deque()
        self._per_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def share(self) -> int:
        """The most entries one source may hold."""
        return max(1, self.capacity // SHARE)

    def sources(self) -> int:
        return len(self._per_source)

    def set_window(self, window: float) -> None:
        """Change the window (on reload); remembered salts are kept long enough for the new one."""
        if window <= 0:
            raise ValueError("window must be positive")
        grow = math.ceil(2 * (window - self.window) * _TICKS)
        if grow > 0:  # every salt must outlive 2 * window from its acceptance
            self._buckets = deque((t + grow, f, s) for t, f, s in self._buckets)
        self.window = window

    def _expire(self, now: float) -> None:
        # Strictly before `now`: at now == expiry the timestamp can still pass the window check
        # (|now - ts| == window), so the salt must still be there.
        buckets, seen, per = self._buckets, self._seen, self._per_source
        while buckets and buckets[0][0] < now * _TICKS:
            _, fps, sources = buckets.popleft()
            seen.difference_update(fps)
            per.subtract(sources)
            for source in set(sources):
                if per[source] <= 0:
                    del per[source]

    def _remember(self, fp: int, until: float, source: str) -> None:
        tick = math.ceil(until * _TICKS)  # rounded up: never forgotten early
        buckets = self._buckets
        if not buckets or buckets[-1][0] < tick:
            buckets.append((tick, [], []))
        # Else the same tick, or a clock that stepped back: the newest bucket outlives this entry.
        _, fps, sources = buckets[-1]
        fps.append(fp)
        sources.append(source)
        self._seen.add(fp)
        self._per_source[source] += 1

    def check_timestamp(self, timestamp: float, now: float) -> None:
        """Raise ProtocolError(CLOCK) unless `timestamp` is acceptable at `now`."""
        if abs(now - timestamp) > self.window:
            raise ProtocolError(
                f"timestamp {now - timestamp:+.0f} s off the server clock "
                f"(window {self.window:g} s)",
                Status.CLOCK,
            )
        if self.not_before is not None:
            if now > self.not_before + 2 * self.window:
                # Every timestamp before not_before is outside the window from here on (also
                # after the clock steps back by a window): the rule has done its work.
                self.not_before = None
            elif timestamp < self.not_before:
                raise ProtocolError(
                    "timestamp from before the server started (replay cache lost)", Status.CLOCK
                )

    def accept(self, salt: bytes, timestamp: float, now: float, source: str | None = None) -> None:
        """Check and record a salt in one step (call only after the flight authenticated).

        Raises ProtocolError: CLOCK, REPLAY, BUSY (remembered but refused: near a limit),
        REPLAY_FULL (at a limit: not remembered). Without `source` only the capacity applies.
        """
        self.check_timestamp(timestamp, now)
        self._expire(now)
        fp = fingerprint(salt)
        if fp in self._seen:
            raise ProtocolError("salt seen before: replayed first flight", Status.REPLAY)
        size, cap = len(self._seen), self.capacity
        held = self._per_source[source] if source is not None else 0
        share = self.share if source is not None else cap
        if size >= cap or held >= share:
            raise ProtocolError(
                "replay cache full" + (" for this source" if held >= share else ""),
                Status.REPLAY_FULL,
            )
        if self.before_remember is not None:
            self.before_remember(timestamp)
        self._remember(fp, now + 2 * self.window, source or _UNKNOWN)
        if source is None:
            return
        if held >= share - max(1, share // RESERVE):
            raise ProtocolError("replay cache: this source's share is full", Status.BUSY)
        if size >= cap - max(1, cap // RESERVE):
            raise ProtocolError("replay cache nearly full", Status.BUSY)

    def for_source(self, source: str) -> SourceView:
        """What one connection's handshake uses: `accept` on behalf of `source`."""
        return SourceView(self, source)

    def snapshot(self) -> list[tuple[int, float]]:
        """The live fingerprints with their expiry (rounded up), for a file or a reload."""
        return [(fp, tick / _TICKS) for tick, fps, _ in self._buckets for fp in fps]

    def restore(self, entries: list[tuple[int, float]], now: float) -> None:
        for fp, until in sorted(entries, key=lambda e: e[1]):
            if until > now and fp not in self._seen:
                self._remember(fp, until, _UNKNOWN)


class SourceView:
    """One connection's view of the guard: its source, and whether it was answered "full"."""

    def __init__(self, guard: ReplayGuard, source: str) -> None:
        self.guard, self.source = guard, source
        self.busy = False  # remembered but refused: the server answers "server full"

    def accept(self, salt: bytes, timestamp: float, now: float) -> None:
        """As `ReplayGuard.accept`, except that BUSY sets `busy` instead of raising."""
        try:
            self.guard.accept(salt, timestamp, now, self.source)
        except ProtocolError as e:
            if e.status is not Status.BUSY:
                raise
            self.busy = True


def save_file(guard: ReplayGuard, path: str | os.PathLike[str], now: float) -> int:
    """Write the live salts' fingerprints to `path` (atomically, mode 600); how many."""
    guard._expire(now)
    entries = guard.snapshot()
    _write_atomically(
        Path(path), _FILE_MAGIC + b"".join(_ENTRY.pack(fp, until) for fp, until in entries)
    )
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
    if data.startswith(_FILE_MAGIC) and not (len(data) - len(_FILE_MAGIC)) % _ENTRY.size:
        body = memoryview(data)[len(_FILE_MAGIC) :]
        entries = list(_ENTRY.iter_unpack(body))
    elif data.startswith(_FILE_MAGIC_V1) and not (len(data) - len(_FILE_MAGIC_V1)) % _ENTRY_V1.size:
        body = memoryview(data)[len(_FILE_MAGIC_V1) :]
        entries = [(fingerprint(salt), until) for salt, until in _ENTRY_V1.iter_unpack(body)]
    else:
        raise ValueError(f"{p}: not a replay cache file")
    before = len(guard)
    guard.restore(entries, now)
    p.unlink()
    return len(guard) - before


def _write_atomically(p: Path, data: bytes) -> None:
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


class HighWater:
    """A persisted bound above every timestamp accepted so far (for a start after a crash).

    Before the guard accepts a timestamp above the persisted mark, the mark is moved `lease`
    seconds past it and written (fsync'ed): at most one small write per `lease` seconds of
    traffic. After a crash the next start refuses timestamps up to the mark for one window.
    """

    def __init__(self, path: str | os.PathLike[str], lease: float = 10.0) -> None:
        self.path, self.lease = Path(path), lease
        self.mark = -math.inf

    def load(self) -> float | None:
        """The mark a previous process left, or None (no file); ValueError if damaged."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != _HWM.size:
            raise ValueError(f"{self.path}: not a high-water mark file")
        (mark,) = _HWM.unpack(data)
        if not math.isfinite(mark):
            raise ValueError(f"{self.path}: not a high-water mark file")
        return mark

    def cover(self, timestamp: float) -> None:
        """Make sure the persisted mark is at least `timestamp` (writes when it is not)."""
        if timestamp > self.mark:
            mark = timestamp + self.lease
            _write_atomically(self.path, _HWM.pack(mark))
            self.mark = mark
