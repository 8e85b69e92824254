"""The handshake budget: how many unauthenticated connections the server holds, and whose.

A connection is *unauthenticated* from accept until its first flight authenticates, and stays
so while a failed one is absorbed. These connections get their own budget, smaller than
`--max-connections`, in total and per source, so a flood of half-finished handshakes can never
take the slots of working tunnels. When a budget is full, the oldest unauthenticated connection
(of that source, or of all) is evicted: the server closes it as absorption ends (drain, FIN),
without a byte sent. Oldest means: longest without progress. A connection's age restarts when
bytes of its unfinished first flight arrive (a failed flight's bytes do not count), and one
with unread bytes waiting (`Ticket.waiting`: the server has not got to them yet, e.g. while a
flood keeps it busy) is passed over, so a flight that is arriving is not evicted for
connections that stalled. When every candidate has bytes waiting (the server is behind, e.g.
one router's burst of tunnels), a budget is exceeded instead: a source's share up to the total,
the total up to twice itself (OVERSHOOT), beyond which the oldest goes regardless.
docs/PROBING.md says what a prober learns from all this.

A *source* is an IPv4 address, or an IPv6 /64 (one subscriber's usual prefix, RFC 6177): an
attacker with a /64 holds 2**64 addresses. IPv4-mapped IPv6 addresses count as their IPv4.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_MAX_HANDSHAKES = 1024
DEFAULT_MAX_HANDSHAKES_PER_SOURCE = 64
SCAN = 8  # candidates looked at per eviction
OVERSHOOT = 2  # the total may reach this many times itself with connections whose bytes wait


def source_key(host: str) -> str:
    """The source an address counts as: the IPv4 address itself, or the IPv6 /64."""
    if ":" not in host:
        return host  # IPv4 as the kernel spells it (the common case under a flood: no parsing)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # not an IP (a Unix socket path, say): itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _never() -> bool:
    return False


@dataclass(eq=False)
class Ticket:
    """One unauthenticated connection's place in the budget."""

    source: str
    evict: Callable[[], object] = field(repr=False)
    waiting: Callable[[], bool] = field(default=_never, repr=False)  # unread bytes queued?
    evicted: bool = False
    started: bool = False  # its task has run (before, its bytes wait unread: deferred accept)


class HandshakeGate:
    """Accounting of unauthenticated connections, oldest first, in total and by source."""

    def __init__(self, total: int, per_source: int) -> None:
        if total < 1 or per_source < 1:
            raise ValueError("budgets must be positive")
        self.total, self.per_source = total, min(per_source, total)
        self.ceiling = total * OVERSHOOT
        self._all: OrderedDict[Ticket, None] = OrderedDict()
        self._by_source: dict[str, OrderedDict[Ticket, None]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._all)

    def sources(self) -> int:
        return len(self._by_source)

    def admit(
        self,
        source: str,
        evict: Callable[[], object],
        waiting: Callable[[], bool] = _never,
    ) -> Ticket:
        """Take a place for a new connection, evicting the oldest ones the budgets leave no
        room for; `evict` is how this connection is told, should it be evicted in turn, and
        `waiting` says whether it has unread bytes queued (then it is passed over)."""
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.per_source:
            # Per source, only a stalled connection is evicted: when the server is merely behind
            # (a router's burst of tunnels, their flights queued unread), the source may go over
            # its share; the total budget below still bounds everything.
            victim = self._stalled(mine, strict=True)
            if victim is not None:
                self._evict(victim)
        if len(self._all) >= self.total:
            # The same in total, up to the ceiling: connections whose flights wait unread are
            # the server's backlog, not an attacker's (an attacker's stall once read).
            victim = self._stalled(self._all, strict=len(self._all) < self.ceiling)
            if victim is not None:
                self._evict(victim)
        ticket = Ticket(source, evict, waiting)
        self._all[ticket] = None
        self._by_source.setdefault(source, OrderedDict())[ticket] = None
        return ticket

    def touch(self, ticket: Ticket) -> None:
        """Bytes of its first flight arrived: the connection becomes the youngest again."""
        if ticket in self._all:
            self._all.move_to_end(ticket)
            self._by_source[ticket.source].move_to_end(ticket)

    def release(self, ticket: Ticket) -> None:
        """The connection authenticated or closed: give its place back (idempotent)."""
        if self._all.pop(ticket, 0) is None:
            mine = self._by_source[ticket.source]
            del mine[ticket]
            if not mine:
                del self._by_source[ticket.source]

    def _stalled(self, order: OrderedDict[Ticket, None], strict: bool = False) -> Ticket | None:
        """The oldest ticket in `order` with no unread bytes waiting (those found are moved to
        the young end), among the oldest SCAN; if each of those has some, the oldest of all
        (None when `strict`).

        Bounded, so a flood does not buy a scan of the whole budget per accept: a connection
        whose task has not run yet is taken as waiting without asking the kernel."""
        first = next(iter(order))
        for _ in range(min(SCAN, len(order))):
            oldest = next(iter(order))
            if oldest.started and not oldest.waiting():
                return oldest
            self.touch(oldest)
        return None if strict else first

    def _evict(self, ticket: Ticket) -> None:
        self.release(ticket)
        ticket.evicted = True
        self.evictions += 1
        ticket.evict()
