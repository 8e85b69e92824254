"""The `copy` engine: recv_into a buffer, send from it. The portable fallback.

The buffer is allocated at the first read and freed whenever it empties outside a stream
(`Pump.shrink`), so idle connections cost no user-space memory.
"""

from __future__ import annotations

import socket

from mptun.common.relay.base import Pump, Relay
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.engine import PumpEngine
from mptun.common.relay.session import Session

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


class CopyEngine(PumpEngine):
    """One copy in and one copy out of user space per chunk."""

    name = "copy"
    plain_only = True

    def __init__(
        self, buffer_size: int = DEFAULT_BUFFER, coalescing: Coalescing | None = None
    ) -> None:
        super().__init__(coalescing)
        self.buffer_size = buffer_size

    def make_pumps(
        self, relay: Relay, inner: socket.socket, tunnel: socket.socket, session: Session
    ) -> tuple[Pump, Pump]:
        return (
            CopyPump(relay, inner, tunnel, "inner", self.buffer_size),
            CopyPump(relay, tunnel, inner, "tunnel", self.buffer_size),
        )
