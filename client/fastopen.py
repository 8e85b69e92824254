"""`--fast-open`: the first flight rides the SYN of a tunnel once the kernel has a cookie.

A connect with TCP_FASTOPEN_CONNECT (common/fastopen.py) returns at once when a cookie for the
path is cached, and the first write sends the SYN with that write in it; the server's kernel
hands its accept() the connection with the flight already readable. Without a cookie the SYN
asks for one and the flight follows the handshake, as without Fast Open. A server that does not
take Fast Open answers a plain SYN-ACK; the flight is sent again after it, no round trip lost.

Middleboxes that drop SYNs carrying data cost a retransmitted SYN (without the data, after
1 s, TCP_TIMEOUT_INIT in include/net/tcp.h) on every attempt, and the kernel no longer keeps
such paths out by itself (tcp_fastopen_cookie_check() in net/ipv4/tcp_fastopen.c ignores the
SYN losses it records), so `FastOpenPaths` remembers them: a path (server address and the
source address of the uplink) whose SYN with data was retransmitted connects without Fast Open
for a while, longer each time it happens again.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mptun.common.fastopen import ClientFail, client_fail, syn_data_acked
from mptun.common.sockets import TCP_FASTOPEN_CONNECT, wait_connected

log = logging.getLogger("mptun.client")

HOLD = 60.0  # seconds a path goes without Fast Open after its first lost SYN with data
MAX_HOLD = 3600.0  # doubling with each loss in a row, up to this
MAX_PATHS = 1024  # paths remembered at most (the oldest hold is forgotten first)

Path = tuple[str, str]  # (server address, source address)


@dataclass
class _Held:
    until: float
    losses: int


@dataclass
class FastOpenPaths:
    """Which paths drop SYNs with data, remembered for a while; owned by one `Tunneler`."""

    clock: Callable[[], float] = time.monotonic
    held: dict[Path, _Held] = field(default_factory=dict)
    unsupported: bool = False  # the kernel refused TCP_FASTOPEN_CONNECT: never again
    # tunnels whose first flight the server's kernel took from the SYN, by socket
    carried: weakref.WeakKeyDictionary[socket.socket, Path] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def allowed(self, path: Path) -> bool:
        """Whether a tunnel on `path` may try Fast Open now."""
        if self.unsupported:
            return False
        held = self.held.get(path)
        return held is None or self.clock() >= held.until

    def lost(self, path: Path) -> float:
        """A SYN with data on `path` was retransmitted: hold the path; returns for how long."""
        held = self.held.get(path)
        losses = (held.losses if held else 0) + 1
        hold = min(HOLD * 2 ** (losses - 1), MAX_HOLD)
        self.held[path] = _Held(self.clock() + hold, losses)
        if len(self.held) > MAX_PATHS:
            del self.held[min(self.held, key=lambda p: self.held[p].until)]
        return hold

    def worked(self, path: Path) -> None:
        """A SYN with data on `path` got through: the path is good again."""
        self.held.pop(path, None)

    def unanswered(self, sock: socket.socket, counters: Counter[str]) -> None:
        """No answer came on `sock` before the handshake timeout. When its first flight rode
        the SYN, the path goes without Fast Open for MAX_HOLD s: a Debian 6.12 kernel at both
        ends took the flight from the SYN and never delivered the server's answer (measured:
        the server wrote it, the client read nothing), so each such tunnel costs the whole
        handshake timeout. (A wrong key or a dead server also lands here: the hold then only
        costs Fast Open.)"""
        path = self.carried.pop(sock, None)
        if path is None:
            return
        counters["fast-open-unanswered"] += 1
        self.held[path] = _Held(self.clock() + MAX_HOLD, 1)
        log.warning(
            "--fast-open: no answer on a tunnel to %s from %s whose first flight rode the SYN; "
            "if tunnels without Fast Open are answered, these two kernels do not carry MPTCP "
            "Fast Open (seen with Linux 6.12 at both ends: use --transport tcp or leave "
            "--fast-open off): this path connects without Fast Open for %.0f s",
            *path,
            MAX_HOLD,
        )


def path_of(sock: socket.socket, sockaddr: tuple) -> Path:
    """The path a connecting socket takes: its server address and its source address (the
    bound one, else the one the routing table picks: a UDP connect sends nothing)."""
    dst = str(ipaddress.ip_address(sockaddr[0].split("%")[0]))
    try:
        src = sock.getsockname()[0]
    except OSError:
        src = ""
    if not src or ipaddress.ip_address(src.split("%")[0]).is_unspecified:
        probe = socket.socket(sock.family, socket.SOCK_DGRAM)
        try:
            probe.connect((sockaddr[0], 9))
            src = probe.getsockname()[0]
        except OSError:
            src = ""
        finally:
            probe.close()
    return dst, src.split("%")[0]


async def connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    sockaddr: tuple,
    flight: bytes,
    timeout: float,
    paths: FastOpenPaths,
    counters: Counter[str],
) -> None:
    """Connect a tunnel socket with its first flight, by Fast Open where the path allows it;
    count how it went (`fast-open`, `fast-open-refused`, `fast-open-lost`) and hold a path
    whose SYN with data was lost. OSError when the connect fails."""
    path = path_of(sock, sockaddr)
    armed = False
    if paths.allowed(path):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            armed = True
        except OSError as e:  # MPTCP before Linux 6.1, or a kernel without Fast Open
            paths.unsupported = True
            log.warning(
                "--fast-open: the kernel refused TCP_FASTOPEN_CONNECT (%s): tunnels connect "
                "without Fast Open",
                e.strerror,
            )
    outcome = await connect_with_flight(loop, sock, sockaddr, flight, timeout, armed)
    if not outcome.tried:
        return
    if outcome.fail is ClientFail.SYN_RETRANSMITTED:
        counters["fast-open-lost"] += 1
        hold = paths.lost(path)
        log.warning(
            "--fast-open: the SYN with data to %s from %s was lost and sent again without "
            "(a middlebox that drops SYNs with data?): this path connects without Fast Open "
            "for %.0f s",
            *path,
            hold,
        )
    elif outcome.acked:
        counters["fast-open"] += 1
        paths.worked(path)
        paths.carried[sock] = path
    else:  # the server's kernel took the SYN but not its data: resent after it, no time lost
        counters["fast-open-refused"] += 1


@dataclass(frozen=True)
class Outcome:
    """How a Fast Open connect went (for the counters and the path memory)."""

    tried: bool  # the SYN carried data (a cookie was cached)
    acked: bool  # and the server took it
    fail: ClientFail


async def connect_with_flight(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    sockaddr: tuple,
    flight: bytes,
    timeout: float,
    fast_open: bool,
) -> Outcome:
    """Connect `sock` and send `flight`: in the SYN when `fast_open` (TCP_FASTOPEN_CONNECT set
    on `sock`) and a cookie is cached, else after the handshake. Raises OSError (ETIMEDOUT on
    timeout) like `connect`."""
    err = sock.connect_ex(sockaddr)
    sent = 0
    tried = False
    if err == 0 and fast_open:
        # Deferred: the kernel holds a cookie and sends the SYN with this write, returning how
        # much of it rode in the SYN (tcp_sendmsg_fastopen(), net/ipv4/tcp.c)
        tried = True
        try:
            sent = sock.send(flight)
        except BlockingIOError:
            sent = 0
    elif err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        raise OSError(err, errno.errorcode.get(err, str(err)))
    await wait_connected(loop, sock, timeout)
    if sent < len(flight):
        await loop.sock_sendall(sock, flight[sent:])
    if not tried:
        return Outcome(False, False, ClientFail.NONE)
    return Outcome(True, syn_data_acked(sock), client_fail(sock))
