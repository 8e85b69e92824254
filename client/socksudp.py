"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): a UDP relay socket for one control connection.

The reply's BND.ADDR is the control connection's local address (never the wildcard, which a
client could not send to) and a port the kernel picked. The relay takes datagrams only from
the control connection's client address, and from the port it announced in DST.PORT when that
is not zero (from the address it announced in DST.ADDR too, when that is not zero): whatever the
authentication, the relay is never an open reflector for other hosts. Each datagram carries the
RFC 1928 header (RSV, FRAG, target); fragments (FRAG != 0) are dropped and counted, as mptun
does not reassemble (the RFC lets a relay that does not drop them). Each client source port is
its own UDP association (client/udp.py). The association, and the relay socket, end when the
control connection closes.

Counters: `socks-udp-associate` (relays opened), `socks-udp-foreign` (a datagram from another
address or port), `socks-udp-frag`, `socks-udp-malformed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket

from mptun.client import socks5
from mptun.client.udp import UdpTunnels
from mptun.common.address import Address, format_sockaddr
from mptun.common.logutil import BurstLog
from mptun.common.sockets import unmapped

log = logging.getLogger("mptun.client.socks")
READ_BATCH = 64  # datagrams read per wake-up


class SocksUdpRelay:
    """The relay socket of one UDP ASSOCIATE control connection."""

    def __init__(
        self,
        udp: UdpTunnels,
        control: socket.socket,
        peer: tuple,
        announced: Address,
        cid: str,
        bad_log: BurstLog,
    ) -> None:
        self.udp, self.control, self.cid, self.bad_log = udp, control, cid, bad_log
        self.counters = udp.counters
        self.client_ip = unmapped(ipaddress.ip_address(str(peer[0]).split("%")[0]))
        self.peer = format_sockaddr(peer)
        host = announced.host
        self.want_ip = None
        if not announced.is_domain and not host.is_unspecified:  # type: ignore[union-attr]
            self.want_ip = unmapped(host)  # type: ignore[arg-type]
        self.want_port = announced.port or None
        local = control.getsockname()
        self.sock = socket.socket(control.family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((local[0], 0))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.sources: set[tuple[str, int]] = set()

    @property
    def bound(self) -> Address:
        """BND.ADDR and BND.PORT: where the client sends its datagrams."""
        host, port = self.sock.getsockname()[:2]
        return Address(unmapped(ipaddress.ip_address(host.split("%")[0])), port)

    async def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Relay until the control connection closes."""
        self.counters["socks-udp-associate"] += 1
        fd = self.sock.fileno()
        loop.add_reader(fd, self._readable)
        try:
            while True:  # the control connection carries nothing more: wait for its end
                try:
                    data = await loop.sock_recv(self.control, 4096)
                except OSError:
                    break
                if not data:
                    break
        finally:
            loop.remove_reader(fd)
            self.sock.close()
            for source in self.sources:
                self.udp.close(source)
            self.control.close()

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data, sa = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self._datagram(data, sa)

    def _datagram(self, data: bytes, sa: tuple) -> None:
        ip = unmapped(ipaddress.ip_address(str(sa[0]).split("%")[0]))
        port = sa[1]
        if (
            ip != self.client_ip
            or (self.want_ip is not None and ip != self.want_ip)
            or (self.want_port is not None and port != self.want_port)
        ):
            self.counters["socks-udp-foreign"] += 1
            self.bad_log(
                "%s socks %s: UDP datagram from %s dropped (only the SOCKS client's own "
                "address and announced port may use its relay)",
                self.cid,
                self.peer,
                format_sockaddr(sa),
            )
            return
        try:
            request = socks5.parse_udp_request(data)
        except socks5.SocksError as e:
            self.counters["socks-udp-malformed"] += 1
            self.bad_log("%s socks %s: UDP datagram dropped: %s", self.cid, self.peer, e)
            return
        if request.frag != 0:
            self.counters["socks-udp-frag"] += 1
            self.bad_log(
                "%s socks %s: UDP fragment (FRAG %d) dropped: fragments are not reassembled",
                self.cid,
                self.peer,
                request.frag,
            )
            return
        source = (str(ip), port)
        self.sources.add(source)
        reply_to = sa

        def deliver(origin: Address, payload: bytes) -> None:
            with contextlib.suppress(OSError):  # a full socket buffer: the datagram is lost
                self.sock.sendto(socks5.udp_reply(origin, payload), reply_to)

        self.udp.send(source, request.target, request.data, deliver)
