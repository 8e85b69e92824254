"""The `copy` engine: recv_into a preallocated buffer, send from it. The portable fallback."""

from __future__ import annotations

import asyncio
import socket

from mptun.common.relay.base import PLAIN, Pump, Relay, RelayStats, Session, require_plain

DEFAULT_BUFFER = 256 * 1024


class CopyPump(Pump):
    def __init__(self, relay: Relay, src, dst, name: str, size: int) -> None:
        super().__init__(relay, src, dst, name)
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start_ = 0
        self.end = 0

    @property
    def pending(self) -> int:
        return self.end - self.start_

    @property
    def space(self) -> int:
        return len(self.buf) - self.end

    def fill(self) -> int:
        n = self.src.recv_into(self.view[self.end :])
        self.end += n
        return n

    def drain(self) -> int:
        n = self.dst.send(self.view[self.start_ : self.end])
        self.start_ += n
        self.moved += n
        if self.start_ == self.end:
            self.start_ = self.end = 0
        return n

    def release(self) -> None:
        self.view.release()


class CopyEngine:
    """One copy in and one copy out of user space per chunk."""

    name = "copy"

    def __init__(self, buffer_size: int = DEFAULT_BUFFER) -> None:
        self.buffer_size = buffer_size

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats:
        require_plain(self.name, session)
        r = Relay(loop, inner, tunnel, self.name, idle_timeout)
        r.add_pumps(
            CopyPump(r, inner, tunnel, "inner", self.buffer_size),
            CopyPump(r, tunnel, inner, "tunnel", self.buffer_size),
        )
        return await r.run()
