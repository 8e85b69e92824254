"""The `splice` engine: socket -> pipe -> socket with os.splice; bytes never enter user space.

Pipes are made when a connection starts relaying and sized with F_SETPIPE_SZ. An unprivileged
process is capped by fs.pipe-user-pages-soft and gets EPERM: then the default size is kept.

Reads from an MPTCP socket are sized to what is queued (SIOCINQ). Until the kernel has an MPTCP
`splice_read` (merged after 6.19, FACTS.md), splicing from MPTCP goes through fs/splice.c
`copy_splice_read`, which allocates a page for every 4 KiB *asked for* before reading: asking for
the whole 1 MiB pipe when one 1.4 KiB packet waits costs 256 page allocations. TCP's
`tcp_splice_read` moves the queued skbs and costs nothing per byte asked, so TCP reads ask for
all the room there is.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import termios

from mptun.common.relay.base import (
    PLAIN,
    Coalescing,
    Pump,
    Relay,
    RelayStats,
    Session,
    require_plain,
)
from mptun.common.sockets import IPPROTO_MPTCP

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
DEFAULT_PIPE_SIZE = 1 << 20
SIOCINQ = getattr(termios, "FIONREAD", 0x541B)


def make_pipe(size: int) -> tuple[int, int, int]:
    """A non-blocking pipe (read fd, write fd, capacity), as large as the kernel allows."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        pass  # EPERM over the per-user pipe quota, EINVAL over pipe-max-size: keep the default
    return r, w, fcntl.fcntl(w, F_GETPIPE_SZ)


class SplicePump(Pump):
    def __init__(self, relay: Relay, src, dst, name: str, pipe_size: int) -> None:
        super().__init__(relay, src, dst, name)
        self.pipe_r, self.pipe_w, self.capacity = make_pipe(pipe_size)
        self.in_pipe = 0
        self.sized_reads = src.proto == IPPROTO_MPTCP  # see the module docstring
        self._inq = bytearray(4)

    @property
    def pending(self) -> int:
        return self.in_pipe

    @property
    def space(self) -> int:
        return self.capacity - self.in_pipe

    def fill(self) -> int:
        room = self.capacity - self.in_pipe
        if self.sized_reads:
            try:
                fcntl.ioctl(self.src_fd, SIOCINQ, self._inq)
            except OSError:  # a kernel whose MPTCP has no SIOCINQ (net/mptcp/protocol.c)
                self.sized_reads = False
            else:
                queued = int.from_bytes(self._inq, "little")
                # 0 queued on a readable socket: EOF or an error, which a small read reports
                room = min(room, queued) if queued else min(room, 4096)
        n = os.splice(self.src_fd, self.pipe_w, room, flags=_FLAGS)
        self.in_pipe += n
        return n

    def drain(self) -> int:
        n = os.splice(self.pipe_r, self.dst_fd, self.in_pipe, flags=_FLAGS)
        self.in_pipe -= n
        self.moved += n
        return n

    def release(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)


class SpliceEngine:
    """Zero user-space copies; the default wherever the kernel splices sockets."""

    name = "splice"

    def __init__(
        self, pipe_size: int = DEFAULT_PIPE_SIZE, coalescing: Coalescing | None = None
    ) -> None:
        self.pipe_size = pipe_size
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
        try:
            out = SplicePump(r, inner, tunnel, "inner", self.pipe_size)
            try:
                back = SplicePump(r, tunnel, inner, "tunnel", self.pipe_size)
            except BaseException:
                out.release()
                raise
        except OSError as e:  # EMFILE/ENFILE: no fd for a pipe
            r.stats.clean, r.stats.error = False, f"no pipe: {e.strerror}"
            for s in (inner, tunnel):
                s.close()
            return r.stats
        r.add_pumps(out, back)
        return await r.run()
