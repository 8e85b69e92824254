"""Transparent UDP on the router: the LAN's datagrams that nftables `tproxy` hands over go
through the tunnel, and each reply goes back to the LAN host from the address it came from.

UDP has no SO_ORIGINAL_DST: the listener asks for each datagram's original destination with
IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR (common/sockets.py) and hands the datagram, its LAN
source and that destination to the UDP tunnels (one association per LAN source address and
port, client/udp.py). A reply must reach the LAN host from the address and port the host sent
to, or its socket (connected, or a NAT-traversal library checking the source) throws it away:
it leaves through a transparent socket bound to that foreign address (IP_TRANSPARENT lets a
socket bind an address that is not the host's: net/ipv4/af_inet.c, inet_can_nonlocal_bind).
Those reply sockets are never connected, so nftables' tproxy, whose first lookup only takes
connected sockets for UDP (nf_tproxy_get_sock_v4, net/ipv4/netfilter/nf_tproxy_ipv4.c), keeps
handing the LAN's datagrams to the listener; the ruleset must not use `socket transparent 1`
for UDP (client/nftables.py), which would match them.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Protocol

from mptun.common.address import Address, IPAddress
from mptun.common.logutil import BurstLog
from mptun.common.sockets import (
    IP_ORIGDSTADDR,
    IP_RECVORIGDSTADDR,
    IPV6_ORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    family_of,
    is_local_address,
    set_transparent,
    unmapped,
)

log = logging.getLogger("mptun.client.tproxy")

MAX_DATAGRAM = 65535  # the largest UDP payload over IPv6 without jumbograms (RFC 2675)
DEFAULT_REPLY_SOCKETS = 1024  # reply sockets kept open (one per remote address and port)
DEFAULT_REPLY_IDLE = 120.0  # seconds a reply socket stays open unused
# The listener's receive buffer: what a reader held up by the scheduler (a busy router) catches
# up on instead of dropping. The kernel doubles the value asked for (sock_setsockopt,
# net/core/sock.c), and a 1400-byte datagram costs 2304 bytes of it (measured: /proc/net/udp's
# rx_queue): 512 KiB holds ~455 such datagrams, ~34 ms at 150 Mbit/s, inside the tunnel's own
# 50 ms bound on a datagram's wait (client/udp.py); the default (212992) held ~7 ms and
# overflowed on a loaded machine (tests/test_udp_gateway.py's iperf3 test).
LISTENER_RCVBUF = 512 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # include/uapi/asm-generic/socket.h
_BATCH = 64  # datagrams read per wake-up: other callbacks run under a flood
_CUT = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_CACHE = 4096  # parsed destinations and sources kept (a dict lookup beats parsing each time)
_LOOP = Address(ipaddress.IPv4Address(0), 0)  # cached verdict: sent to the listener itself

Deliver = Callable[[Address, bytes], None]


class UdpSender(Protocol):
    """What the listener needs of the UDP tunnels (client/udp.py's `UdpTunnels`)."""

    def send(
        self, lan_source: tuple[str, int], target: Address, payload: bytes, deliver: Deliver
    ) -> None: ...


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """The IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message of a datagram (None: none)."""
    for level, kind, data in ancdata:
        # struct sockaddr_in: family (host order), port (network order), address;
        # struct sockaddr_in6: family, port, flowinfo, address, scope id
        if level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            return Address(ipaddress.IPv4Address(data[4:8]), int.from_bytes(data[2:4], "big"))
        if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            host = unmapped(ipaddress.IPv6Address(data[8:24]))
            return Address(host, int.from_bytes(data[2:4], "big"))
    return None


def transparent_udp_socket(bind: Address, listener: bool) -> socket.socket:
    """A non-blocking UDP socket with IP_TRANSPARENT bound to `bind` (any address).

    `listener`: also report each datagram's original destination, and take IPv4 too when
    bound to the IPv6 wildcard. Raises OSError (EPERM without CAP_NET_ADMIN).
    """
    host = bind.host
    assert not isinstance(host, str)
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(sock)
        if family == socket.AF_INET6:
            dual = listener and host.is_unspecified
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            if listener:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
                if dual:
                    # IPv4 datagrams on this socket report through the SOL_IP option
                    sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        elif listener:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
        if listener:
            try:  # past net.core.rmem_max: CAP_NET_ADMIN, which IP_TRANSPARENT needs anyway
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, LISTENER_RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF)
        sock.bind(bind.sockaddr())
    except BaseException:
        sock.close()
        raise
    return sock


class ReplySockets:
    """Transparent sockets bound to remote addresses, one per address, most recent last.

    At most `cap` are open (the least recently used goes first) and one unused for `idle`
    seconds is closed; a reply from a closed one's address just opens it again.
    """

    def __init__(
        self,
        cap: int = DEFAULT_REPLY_SOCKETS,
        idle: float = DEFAULT_REPLY_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap, self.idle, self.clock = cap, idle, clock
        self._open: OrderedDict[Address, tuple[socket.socket, float]] = OrderedDict()
        self.opened = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._open)

    def get(self, origin: Address) -> socket.socket:
        """The socket bound to `origin` (opened now if needed); OSError if it cannot be bound."""
        now = self.clock()
        entry = self._open.pop(origin, None)
        if entry is None:
            while len(self._open) >= self.cap:
                _, (old, _) = self._open.popitem(last=False)
                old.close()
                self.evicted += 1
            sock = transparent_udp_socket(origin, listener=False)
            self.opened += 1
        else:
            sock = entry[0]
        self._open[origin] = (sock, now)
        return sock

    def sweep(self) -> int:
        """Close the sockets idle for longer than `idle`; how many were closed."""
        limit = self.clock() - self.idle
        closed = 0
        while self._open:
            origin, (sock, used) = next(iter(self._open.items()))
            if used > limit:
                break
            del self._open[origin]
            sock.close()
            closed += 1
        return closed

    def close(self) -> None:
        for sock, _ in self._open.values():
            sock.close()
        self._open.clear()


class UdpTproxy:
    """The `--tproxy-udp` listener: a client service (client/service.py) beside the TCP ones."""

    kind = "tproxy-udp"

    def __init__(
        self,
        bind: Address,
        tunnels: UdpSender,
        counters: Counter[str] | None = None,
        replies: ReplySockets | None = None,
    ) -> None:
        self.bind, self.tunnels = bind, tunnels
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.replies = replies or ReplySockets()
        self.sock: socket.socket | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._drop_log = BurstLog(log, logging.WARNING)
        self._reply_log = BurstLog(log, logging.WARNING)
        # per-datagram work done once per destination and per source (control message bytes
        # -> target, or _LOOP; source sockaddr -> LAN source and its reply path)
        self._targets: dict[bytes, Address] = {}
        self._sources: dict[tuple, tuple[tuple[str, int], Deliver]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> Address:
        try:
            sock = transparent_udp_socket(self.bind, listener=True)
        except OSError as e:
            if e.errno == errno.EPERM:
                why = f"{e.strerror} (IP_TRANSPARENT needs CAP_NET_ADMIN)"
                raise OSError(e.errno, why) from None
            raise
        self.sock, self._loop = sock, loop
        host, self.port = sock.getsockname()[:2]
        loop.add_reader(sock.fileno(), self._on_readable)
        self._schedule_sweep()
        return Address(ipaddress.ip_address(host.split("%")[0]), self.port)

    def _schedule_sweep(self) -> None:
        assert self._loop is not None
        self._sweeper = self._loop.call_later(
            max(1.0, self.replies.idle / 4), self._sweep_and_reschedule
        )

    def _sweep_and_reschedule(self) -> None:
        self.replies.sweep()
        if self.sock is not None:
            self._schedule_sweep()

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(_BATCH):
            try:
                data, ancdata, flags, addr = sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(28))
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error queued on the socket: nothing to answer
            if flags & _CUT:
                self._drop("truncated", "a datagram or its control data was cut short")
                continue
            target = self._targets.get(ancdata[0][2]) if len(ancdata) == 1 else None
            if target is None:
                target = self._target(ancdata)
                if target is None:
                    self._drop("no-target", "a datagram without its original destination")
                    continue
            if target is _LOOP:
                # sent straight to the listener, not handed over: tunnelling it would loop
                self._drop("no-target", "a datagram to this listener itself")
                continue
            source = self._sources.get(addr)
            if source is None:
                source = self._source(addr)
            lan, deliver = source
            self.counters["tproxy-udp-datagrams"] += 1
            try:
                self.tunnels.send(lan, target, data, deliver)
            except Exception as e:  # one datagram lost; the listener keeps serving
                self._drop("send-errors", f"{lan[0]}:{lan[1]} -> {target}: {e}")

    def _target(self, ancdata: list[tuple[int, int, bytes]]) -> Address | None:
        """The original destination of a datagram (or _LOOP), remembered for the next ones."""
        target = original_destination(ancdata)
        if target is None:
            return None
        if target.port == self.port and is_local_address(target.host):  # type: ignore[arg-type]
            target = _LOOP
        if len(ancdata) == 1:
            if len(self._targets) >= _CACHE:
                self._targets.clear()
            self._targets[ancdata[0][2]] = target
        return target

    def _source(self, addr: tuple) -> tuple[tuple[str, int], Deliver]:
        """The LAN source of a sockaddr and its reply path, remembered for the next datagrams."""
        lan_host = unmapped(ipaddress.ip_address(addr[0].split("%")[0]))
        entry = ((str(lan_host), addr[1]), partial(self._deliver, lan_host, addr[1]))
        if len(self._sources) >= _CACHE:
            self._sources.clear()
        self._sources[addr] = entry
        return entry

    def _drop(self, what: str, why: str) -> None:
        self.counters[f"tproxy-udp-{what}"] += 1
        self._drop_log("tproxy-udp: dropped %s", why)

    def _deliver(self, lan_host: IPAddress, lan_port: int, origin: Address, payload: bytes) -> None:
        """Send a reply to the LAN host from `origin`, where the tunnel says it came from."""
        if self.sock is None:
            return
        host = origin.host
        if not isinstance(host, str) and host.version == 6 and host.ipv4_mapped is not None:
            host = host.ipv4_mapped  # an IPv4 peer as a dual-stack socket names it
            origin = Address(host, origin.port)
        if isinstance(host, str) or host.version != lan_host.version:
            # the host sent to an address of its own family; a reply from another cannot be its
            self.counters["tproxy-udp-reply-drops"] += 1
            return
        try:
            out = self.replies.get(origin)
        except OSError as e:
            self.counters["tproxy-udp-reply-drops"] += 1
            self._reply_log("tproxy-udp: cannot send from %s: %s", origin, e.strerror)
            return
        try:
            out.sendto(payload, (str(lan_host), lan_port))
        except BlockingIOError:
            self.counters["tproxy-udp-reply-drops"] += 1  # the LAN side is full: UDP drops
        except OSError as e:
            self.counters["tproxy-udp-reply-drops"] += 1
            self._reply_log("tproxy-udp: reply to %s:%d: %s", lan_host, lan_port, e.strerror)
        else:
            self.counters["tproxy-udp-replies"] += 1

    def snapshot(self) -> dict:
        """Gauges for the status: the reply sockets open, opened and evicted."""
        return {
            "reply_sockets": len(self.replies),
            "reply_sockets_opened": self.replies.opened,
            "reply_sockets_evicted": self.replies.evicted,
        }

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self.replies.close()

    async def drain(self, timeout: float) -> int:
        """Datagrams do not drain (the associations are the app's: it ends them)."""
        return 0
