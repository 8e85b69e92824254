"""The reference relay of `mptun bench`: the simplest splice relay that works, nothing tuned.

One blocking thread per direction moves src -> pipe -> dst with `os.splice`, asking for the
whole pipe (1 MiB) at every read, and writes everything it read before reading again; EOF
becomes shutdown(SHUT_WR) on the other leg. No SO_RCVLOWAT, no SIOCINQ, no coalescing, no
buffer sizes of its own.

It runs mptun's own command line (`python -m mptun.bench.reference client|server ARGS...`, the
arguments of `mptun client` / `mptun server` with `--bulk plain`): the same listeners
(`--redir` with SO_ORIGINAL_DST, `--socks`), the same handshake and the same tunnel sockets,
and only the relay of plain tunnels is replaced. So a difference between this case and the
splice engine's is the relay's doing, nothing else. It is bench code: the OpenWrt package
ships no `mptun/bench` (openwrt/).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
import threading
import time

from mptun.common.relay.base import RelayStats
from mptun.common.relay.bulk import ByMode, choose_bulk
from mptun.common.relay.session import PLAIN, Session, require_plain
from mptun.common.relay.settings import RelaySettings

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031  # include/uapi/linux/fcntl.h


class ReferenceEngine:
    """A plain-tunnel engine of two blocking threads (the module docstring)."""

    name = "reference"

    async def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        inner: socket.socket,
        tunnel: socket.socket,
        idle_timeout: float | None = None,
        session: Session = PLAIN,
    ) -> RelayStats:
        require_plain(self.name, session)
        stats = RelayStats(self.name)
        for s in (inner, tunnel):
            s.setblocking(True)
        futures = []
        for src, dst, attr in ((inner, tunnel, "to_tunnel"), (tunnel, inner, "from_tunnel")):
            fut: asyncio.Future = loop.create_future()
            t = threading.Thread(target=_direction, args=(loop, fut, src, dst), daemon=True)
            t.start()
            futures.append((attr, fut))
        try:
            for attr, fut in futures:
                moved, error = await fut
                setattr(stats, attr, moved)
                if error and stats.error is None:
                    stats.error, stats.clean = error, False
        finally:
            stats.ended = time.monotonic()
            inner.close()
            tunnel.close()
        return stats


def _direction(loop, fut: asyncio.Future, src: socket.socket, dst: socket.socket) -> None:
    """src -> pipe -> dst until EOF; reports (bytes moved, error or None) to `fut`."""
    moved, error = 0, None
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        while True:
            n = os.splice(src.fileno(), w, PIPE_SIZE, flags=os.SPLICE_F_MOVE)
            if n == 0:
                dst.shutdown(socket.SHUT_WR)
                break
            while n:
                m = os.splice(r, dst.fileno(), n, flags=os.SPLICE_F_MOVE)
                n -= m
                moved += m
    except OSError as e:
        error = f"{e.strerror or e}"
        for s in (src, dst):  # wakes the other direction's thread from its blocking splice
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(r)
        os.close(w)
        loop.call_soon_threadsafe(_settle, fut, (moved, error))


def _settle(fut: asyncio.Future, value: tuple[int, str | None]) -> None:
    if not fut.done():
        fut.set_result(value)


def _choose(self: RelaySettings) -> ByMode:
    """`RelaySettings.choose` with the plain engine replaced by the reference relay."""
    return choose_bulk(self.bulk, ReferenceEngine(), mptcp=self.mptcp)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """`mptun ARGS...` with the reference relay for plain tunnels."""
    RelaySettings.choose = _choose  # type: ignore[method-assign]
    from mptun.cli import main as mptun_main

    mptun_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
