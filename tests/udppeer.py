"""A UDP peer for the UDP tests: a socket on loopback (or any address) that records every
datagram's source and echoes it back with an `echo:` prefix, on a thread of its own."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mptun.common.address import Address


class UdpPeer:
    """A UDP socket on loopback that echoes (prefixed with `echo:`) and records sources."""

    def __init__(self, host: str = "127.0.0.1", echo: bool = True) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.echo = echo
        self.seen: list[tuple[str, int, bytes]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> Address:
        return Address.parse(
            f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        )

    def _run(self) -> None:
        while not self._stop:
            try:
                data, sa = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((sa[0], sa[1], data))
            if self.echo:
                self.sock.sendto(b"echo:" + data, sa)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


@contextmanager
def udp_peer(host: str = "127.0.0.1", echo: bool = True) -> Iterator[UdpPeer]:
    p = UdpPeer(host, echo)
    try:
        yield p
    finally:
        p.close()
