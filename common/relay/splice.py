"""The `splice` engine: socket -> pipe -> socket with os.splice; bytes never enter user space.

Pipes are made when a connection starts relaying and sized with F_SETPIPE_SZ. An unprivileged
process is capped by fs.pipe-user-pages-soft and gets EPERM: then the default size is kept.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket

from mptun.common.relay.base import PLAIN, Pump, Relay, RelayStats, Session, require_plain

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
DEFAULT_PIPE_SIZE = 1 << 20


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

    @property
    def pending(self) -> int:
        return self.in_pipe

    @property
    def space(self) -> int:
        return self.capacity - self.in_pipe

    def fill(self) -> int:
        n = os.splice(self.src_fd, self.pipe_w, self.capacity - self.in_pipe, flags=_FLAGS)
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

    def __init__(self, pipe_size: int = DEFAULT_PIPE_SIZE) -> None:
        self.pipe_size = pipe_size

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
