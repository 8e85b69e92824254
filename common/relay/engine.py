"""What an engine is (`Engine`), and the base of the engines that relay with two pumps.

A `PumpEngine` subclass states only what differs: how it makes its pumps (`make_pumps`), whether
it refuses encrypted sessions, and how it leaves the sockets when it cannot start.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol

from mptun.common.relay.base import Pump, Relay, RelayStats
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.session import PLAIN, Session, require_plain
from mptun.common.sockets import reset


class Engine(Protocol):
    """Relays one connection; takes ownership of both sockets and closes them."""

    name: str

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats: ...


class PumpEngine:
    """An engine whose relay is a `Relay` of two pumps (common/relay/base.py)."""

    name: str
    plain_only = False  # moves bytes as they are: refuses an encrypted session
    reset_when_refused = False  # a connection it cannot start is reset, not closed

    def __init__(self, coalescing: Coalescing | None = None) -> None:
        self.coalescing = coalescing if coalescing is not None else Coalescing()

    def make_pumps(
        self, relay: Relay, inner: socket.socket, tunnel: socket.socket, session: Session
    ) -> tuple[Pump, Pump]:
        """The pumps inner -> tunnel and tunnel -> inner; OSError when a stage needs an fd and
        there is none (EMFILE/ENFILE)."""
        raise NotImplementedError

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats:
        if self.plain_only:
            require_plain(self.name, session)
        r = Relay(loop, inner, tunnel, self.name, idle_timeout, self.coalescing)
        try:
            out, back = self.make_pumps(r, inner, tunnel, session)
        except OSError as e:  # only stages with fds (pipes) raise it
            return self.refuse(inner, tunnel, f"no pipe: {e.strerror}")
        r.add_pumps(out, back)
        return await r.run()

    def refuse(self, inner: socket.socket, tunnel: socket.socket, why: str) -> RelayStats:
        """Give up on a connection before relaying: close (or reset) both sockets, say why."""
        stats = RelayStats(self.name, clean=False, error=why)
        for s in (inner, tunnel):
            if self.reset_when_refused:
                reset(s)
            else:
                s.close()
        return stats


def pump_pair(out: Callable[[], Pump], back: Callable[[], Pump]) -> tuple[Pump, Pump]:
    """Make both pumps; when the second cannot be made, release the first (its pipe) first."""
    first = out()
    try:
        return first, back()
    except BaseException:
        first.release()
        raise
