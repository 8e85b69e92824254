"""The `copy` engine: recv_into a buffer, send from it. The portable fallback.

The buffer is allocated at the first read and freed whenever it empties outside a stream
(`Pump.shrink`), so idle connections cost no user-space memory.
"""

from __future__ import annotations

import asyncio
import socket

from mptun.common.relay.base import (
    PLAIN,
    Coalescing,
    Pump,
    Relay,
    RelayStats,
    Session,
    require_plain,
)

DEFAULT_BUFFER = 256 * 1024


class CopyPump(Pump):
    frees_when_quiet = True  # `shrink` unmaps its buffers

    def __init__(self, relay: Relay, src, dst, name: str, size: int) -> None:
        super().__init__(relay, src, dst, name)
        self.size = size
        self.view: memoryview | None = None
        self.start_ = 0
        self.end = 0

    @property
    def pending(self) -> int:
        return self.end - self.start_

    @property
    def space(self) -> int:
        return self.size - self.end

    def fill(self) -> int:
        if self.view is None:
            self.view = memoryview(bytearray(self.size))
        n = self.src.recv_into(self.view[self.end :])
        self.end += n
        return n

    def drain(self) -> int:
        assert self.view is not None
        n = self.dst.send(self.view[self.start_ : self.end])
        self.start_ += n
        self.moved += n
        if self.start_ == self.end:
            self.start_ = self.end = 0
        return n

    def shrink(self) -> None:
        if self.end == 0:
            self.release()

    def release(self) -> None:
        if self.view is not None:
            self.view.release()  # the view held the only reference: the buffer is freed now
            self.view = None


class CopyEngine:
    """One copy in and one copy out of user space per chunk."""

    name = "copy"

    def __init__(
        self, buffer_size: int = DEFAULT_BUFFER, coalescing: Coalescing | None = None
    ) -> None:
        self.buffer_size = buffer_size
        self.coalescing = coalescing if coalescing is not None else Coalescing()

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats:
        require_plain(self.name, session)
        r = Relay(loop, inner, tunnel, self.name, idle_timeout, self.coalescing)
        r.add_pumps(
            CopyPump(r, inner, tunnel, "inner", self.buffer_size),
            CopyPump(r, tunnel, inner, "tunnel", self.buffer_size),
        )
        return await r.run()
