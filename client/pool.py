"""`--pool N`: tunnels connected ahead, so a new connection sends its first flight at once.

A pooled tunnel is a connected socket to the server a new tunnel would try first, that has sent
nothing: its TCP (and MPTCP) handshake is done, so taking one saves the connect's round trip.

How long one may wait is set by the server: it defers accept() (TCP_DEFER_ACCEPT, 1 s: a
connection that sends nothing is handed over about a second after its handshake, with the
retransmitted SYN-ACK's acknowledgement; tcp(7)), then closes it at accept plus its
--handshake-timeout (10 s by default) when no complete first flight has come (server/service.py,
docs/PROBING.md). So a silent connection lives about 11 s at a default server; the pool closes
its tunnels at `MAX_AGE` (8 s) and connects new ones, before the server would, and the server
counts the client's close as `incomplete`, with no log line. One that dies anyway (a server
restarted, a shorter --handshake-timeout, an evicting flood) is dropped as soon as its end
arrives (its socket turns readable), and `take` looks again before handing one out, so a dead
tunnel is never handed out.

The pool refills only while it is used: for `WARM` seconds after the last tunnel it handed
out (and after the start). An idle client keeps no connections open and makes none.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mptun.common.address import Address

log = logging.getLogger("mptun.client")

MAX_AGE = 8.0  # seconds a pooled tunnel waits before it is replaced (the server's limit ~11 s)
WARM = 120.0  # seconds after the last use during which the pool keeps itself full
MAX_POOL = 16  # --pool at most: each one holds a slot of the server's handshake budget
_RETRY = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # after failed connects in a row

Opener = Callable[[Address], Awaitable[tuple[socket.socket, bool | None]]]


@dataclass
class _Pooled:
    sock: socket.socket
    mptcp: bool | None
    server: Address
    born: float
    expiry: asyncio.TimerHandle | None = None


def alive(sock: socket.socket) -> bool:
    """Whether a pooled socket can carry a tunnel: no pending error, nothing readable (the
    server sends nothing before the first flight, so readable means its FIN or RST came)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return False
        poll = select.poll()  # not select(): a router's descriptors may pass 1024
        poll.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poll.poll(0)
    except (OSError, ValueError):
        return False


class TunnelPool:
    """Up to `size` connected, silent tunnels to the server `target()` names; owned by one
    `Tunneler`, which connects them with `opener` (its own path: uplinks, MPTCP, timeouts)."""

    def __init__(
        self,
        size: int,
        opener: Opener,
        target: Callable[[], Address],
        counters: Counter[str],
        max_age: float = MAX_AGE,
        warm: float = WARM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.opener = opener
        self.target = target
        self.counters = counters
        self.max_age = max_age
        self.warm = warm
        self.clock = clock
        self.ready: list[_Pooled] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._until = 0.0  # keep full until then

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start filling (idempotent)."""
        if self._task is not None:
            return
        self._loop = loop
        self._until = self.clock() + self.warm
        self._task = loop.create_task(self._fill())

    def close(self) -> None:
        """Stop filling and close every pooled tunnel."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        while self.ready:
            self._drop(self.ready[-1])

    def take(self, server: Address) -> tuple[socket.socket, bool | None] | None:
        """A live pooled tunnel to `server` (now the caller's), or None."""
        if self._task is None:
            return None
        self._until = self.clock() + self.warm
        self._wake.set()
        for entry in reversed(list(self.ready)):  # the youngest first: the most time left
            if entry.server != server:
                continue
            self._drop(entry, close=False)
            if self.clock() - entry.born < self.max_age and alive(entry.sock):
                self.counters["pool-used"] += 1
                return entry.sock, entry.mptcp
            self.counters["pool-dead"] += 1
            entry.sock.close()
        return None

    def _drop(self, entry: _Pooled, close: bool = True) -> None:
        """Take `entry` out of the pool (and close it: a FIN, as nothing was sent)."""
        self.ready.remove(entry)
        if entry.expiry is not None:
            entry.expiry.cancel()
        if self._loop is not None:
            self._loop.remove_reader(entry.sock.fileno())
        if close:
            entry.sock.close()
        self._wake.set()

    def _expired(self, entry: _Pooled) -> None:
        if entry in self.ready:
            self.counters["pool-recycled"] += 1
            self._drop(entry)

    def _ended(self, entry: _Pooled) -> None:
        """A pooled tunnel turned readable: the server closed it (or broke the protocol)."""
        if entry in self.ready:
            self.counters["pool-dead"] += 1
            self._drop(entry)

    async def _fill(self) -> None:
        failures = 0
        while True:
            server = self.target()
            for entry in [e for e in self.ready if e.server != server]:
                self._drop(entry)  # new tunnels go elsewhere now
            now = self.clock()
            if now < self._until and len(self.ready) < self.size:
                try:
                    sock, mptcp = await self.opener(server)
                except Exception as e:  # TunnelError, OSError: try again later
                    self.counters["pool-failed"] += 1
                    wait = _RETRY[min(failures, len(_RETRY) - 1)]
                    failures += 1
                    log.debug("pool: cannot connect to %s (%s); again in %.0f s", server, e, wait)
                    await asyncio.sleep(wait)
                    continue
                failures = 0
                self._add(sock, mptcp, server)
                continue
            self._wake.clear()
            timeout = self._until - now if now < self._until else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _add(self, sock: socket.socket, mptcp: bool | None, server: Address) -> None:
        assert self._loop is not None
        entry = _Pooled(sock, mptcp, server, self.clock())
        self.ready.append(entry)
        entry.expiry = self._loop.call_later(self.max_age, self._expired, entry)
        self._loop.add_reader(sock.fileno(), self._ended, entry)
        self.counters["pool-connected"] += 1
