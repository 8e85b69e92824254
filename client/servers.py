"""Which server a new tunnel goes to: the choice between several servers, without I/O.

`ServerSet` keeps each server's state (unknown until the first check, then up or down) from what
the checks (client/monitor.py) and the tunnels (client/tunnel.py) report, and orders the servers
for a new tunnel by the policy: `failover` takes the first server of the configured order that is
not down; `lowest-rtt` the one with the lowest smoothed check round trip, keeping the current one
until another is clearly faster (a margin, so two servers of about the same distance do not
alternate). Every state change goes to `on_change` once (the client logs it). Time comes from
`clock`, so the tests run it on a fake clock.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mptun.common.address import Address


class Policy(enum.Enum):
    FAILOVER = "failover"  # the first server (in the order given) that is not down
    LOWEST_RTT = "lowest-rtt"  # the up server with the lowest check round trip


class State(enum.Enum):
    UNKNOWN = "unknown"  # not checked yet: tried in the policy's order
    UP = "up"  # the last check or tunnel reached it
    DOWN = "down"  # checks failed, or a tunnel could not connect: skipped until a check answers


class WhenDown(enum.Enum):
    """What a connection does while every server is down (`--when-down`)."""

    REJECT = "reject"  # fail closed: reset it, SOCKS failure reply, DNS SERVFAIL, at once
    DIRECT = "direct"  # fail open: connect to the destination straight from the router


@dataclass(frozen=True)
class Server:
    """One server the client may use: its address and the key it shares with it."""

    address: Address
    psk: bytes = field(repr=False)  # never in a log line


@dataclass
class Health:
    """What the client knows about one server (shown by `mptun status`)."""

    state: State = State.UNKNOWN
    since: float = 0.0  # clock() of the last state change
    reason: str = ""  # why it is down (or what the last failure was)
    rtt: float | None = None  # smoothed check round trip, seconds
    failures: int = 0  # consecutive failed checks
    checks: int = 0
    checks_failed: int = 0


@dataclass(frozen=True)
class Change:
    """One state change of one server, for the log."""

    index: int
    server: Address
    old: State
    new: State
    reason: str


class ServerSet:
    """The servers in the order given, their health, and the choice for a new tunnel."""

    def __init__(
        self,
        servers: list[Server] | tuple[Server, ...],
        policy: Policy = Policy.FAILOVER,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Change], None] | None = None,
        down_after: int = 2,
        rtt_margin: float = 0.25,
        rtt_floor: float = 0.005,
    ) -> None:
        if not servers:
            raise ValueError("at least one server")
        self.servers = tuple(servers)
        self.policy = policy
        self.clock = clock
        self.on_change = on_change
        # A check may be lost on a path that works: down after this many in a row (a tunnel
        # that cannot connect marks its server down at once, as it has waited already).
        self.down_after = down_after
        # lowest-rtt moves to another server only when it is faster by this fraction of the
        # current one's round trip and by at least `rtt_floor` seconds.
        self.rtt_margin, self.rtt_floor = rtt_margin, rtt_floor
        now = clock()
        self.health = [Health(since=now) for _ in self.servers]
        self._current: int | None = None  # lowest-rtt's present choice

    def __len__(self) -> int:
        return len(self.servers)

    @property
    def all_down(self) -> bool:
        """Every server is known down: a new tunnel has nowhere to go (`--when-down`)."""
        return all(h.state is State.DOWN for h in self.health)

    def order(self) -> list[int]:
        """The servers a new tunnel tries, best first: none that is down."""
        usable = [i for i, h in enumerate(self.health) if h.state is not State.DOWN]
        if self.policy is Policy.FAILOVER:
            return usable
        up = [i for i in usable if self.health[i].state is State.UP]
        timed = sorted((i for i in up if self.health[i].rtt is not None), key=self._rtt)
        if timed:
            best = timed[0]
            cur = self._current
            if cur in timed and cur != best:
                gain = self._rtt(cur) - self._rtt(best)
                if gain < max(self.rtt_floor, self.rtt_margin * self._rtt(cur)):
                    best = cur  # not clearly faster: stay
            self._current = best
            timed.remove(best)
            timed.insert(0, best)
        rest = [i for i in usable if i not in timed]
        return timed + rest

    def _rtt(self, i: int | None) -> float:
        assert i is not None
        rtt = self.health[i].rtt
        return float("inf") if rtt is None else rtt

    def check_ok(self, i: int, rtt: float) -> Change | None:
        """A check answered after `rtt` seconds."""
        h = self.health[i]
        h.checks += 1
        h.failures = 0
        # smoothed as TCP smooths its RTT (RFC 6298: 7/8 old, 1/8 new), but a server that was
        # down starts again from the new sample
        h.rtt = rtt if h.rtt is None or h.state is State.DOWN else h.rtt * 0.875 + rtt * 0.125
        return self._set(i, State.UP, "")

    def check_failed(self, i: int, reason: str) -> Change | None:
        """A check got no usable answer; down after `down_after` of them in a row."""
        h = self.health[i]
        h.checks += 1
        h.checks_failed += 1
        h.failures += 1
        if h.state is State.DOWN:
            h.reason = reason
            return None
        if h.failures >= self.down_after:
            return self._set(i, State.DOWN, reason)
        return None

    def tunnel_ok(self, i: int) -> Change | None:
        """A tunnel connected to server `i`."""
        self.health[i].failures = 0
        return self._set(i, State.UP, "")

    def tunnel_failed(self, i: int, reason: str) -> Change | None:
        """A tunnel could not connect to server `i`: down now (new tunnels try the next)."""
        return self._set(i, State.DOWN, reason)

    def _set(self, i: int, state: State, reason: str) -> Change | None:
        h = self.health[i]
        old = h.state
        h.reason = reason
        if old is state:
            return None
        h.state, h.since = state, self.clock()
        if state is State.DOWN:
            h.rtt = None
        change = Change(i, self.servers[i].address, old, state, reason)
        if self.on_change is not None:
            self.on_change(change)
        return change

    def snapshot(self) -> list[dict]:
        """Each server's state for `mptun status` (JSON types only)."""
        now = self.clock()
        first = self.order()[:1]
        return [
            {
                "server": str(s.address),
                "state": h.state.value,
                "for_seconds": round(now - h.since, 1),
                "rtt_ms": None if h.rtt is None else round(h.rtt * 1000, 1),
                "reason": h.reason,
                "checks": h.checks,
                "checks_failed": h.checks_failed,
                "preferred": i in first,
            }
            for i, (s, h) in enumerate(zip(self.servers, self.health, strict=True))
        ]
