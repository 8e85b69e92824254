"""Choose a relay engine by asking the kernel what it can do (never by kernel version)."""

from __future__ import annotations

import os
import socket

from mptun.common.errors import ConfigError
from mptun.common.relay.batching import Coalescing
from mptun.common.relay.copy import CopyEngine
from mptun.common.relay.splice import SpliceEngine, make_pipe


def splice_works() -> bool:
    """Splice a few bytes socket -> pipe -> socket on a socketpair."""
    a, b = socket.socketpair()
    r = w = -1
    try:
        r, w, _ = make_pipe(4096)
        a.sendall(b"probe")
        n = os.splice(b.fileno(), w, 5, flags=os.SPLICE_F_NONBLOCK)
        m = os.splice(r, a.fileno(), n, flags=os.SPLICE_F_NONBLOCK)
        return n == m == 5 and b.recv(5) == b"probe"
    except (OSError, AttributeError):
        return False
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        a.close()
        b.close()


def available_engines() -> list[str]:
    return (["splice"] if splice_works() else []) + ["copy"]


def choose_engine(
    name: str = "auto", coalescing: Coalescing | None = None
) -> SpliceEngine | CopyEngine:
    """`auto`: splice where the kernel splices sockets, else copy. A forced engine is checked."""
    if name == "auto":
        name = available_engines()[0]
    if name == "splice":
        if not splice_works():
            raise ConfigError("relay engine splice: this kernel cannot splice sockets")
        return SpliceEngine(coalescing=coalescing)
    if name == "copy":
        return CopyEngine(coalescing=coalescing)
    raise ConfigError(f"unknown relay engine {name!r} (choose from auto, splice, copy)")
