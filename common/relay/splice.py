"""The `splice` engine: socket -> pipe -> socket with os.splice; bytes never enter user space.

Pipes are made when a connection starts relaying and sized with F_SETPIPE_SZ. An unprivileged
process is capped by fs.pipe-user-pages-soft and gets EPERM: then the default size is kept.

Reads from an MPTCP socket are sized to what is queued (SIOCINQ). A protocol without a
`splice_read` is spliced by fs/splice.c `copy_splice_read` (net/socket.c `sock_splice_read`), and
MPTCP's `mptcp_stream_ops` (net/mptcp/protocol.c) gained one only after 6.19; `copy_splice_read`
allocates a page for every 4 KiB *asked for* before reading: asking for the whole 1 MiB pipe
when one 1.4 KiB packet waits costs 256 page allocations. TCP's `tcp_splice_read` moves the
queued skbs and costs nothing per byte asked, so TCP reads ask for all the room there is.
"""

from __future__ import annotations

import fcntl
import os
import socket
import termios

from mptun.common.relay.base import Pump, Relay
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.engine import PumpEngine, pump_pair
from mptun.common.relay.session import Session
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


class SpliceEngine(PumpEngine):
    """Zero user-space copies; the default wherever the kernel splices sockets."""

    name = "splice"
    plain_only = True

    def __init__(
        self, pipe_size: int = DEFAULT_PIPE_SIZE, coalescing: Coalescing | None = None
    ) -> None:
        super().__init__(coalescing)
        self.pipe_size = pipe_size

    def make_pumps(
        self, relay: Relay, inner: socket.socket, tunnel: socket.socket, session: Session
    ) -> tuple[Pump, Pump]:
        return pump_pair(
            lambda: SplicePump(relay, inner, tunnel, "inner", self.pipe_size),
            lambda: SplicePump(relay, tunnel, inner, "tunnel", self.pipe_size),
        )
