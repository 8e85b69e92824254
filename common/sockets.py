"""Socket helpers: MPTCP creation with TCP fallback, non-blocking connect, keepalive, reset.

Kernel facts used here:
- IPPROTO_MPTCP is 262 and SOL_MPTCP 284 (include/uapi/linux/in.h, include/linux/socket.h).
- `socket(..., IPPROTO_MPTCP)` fails with ENOPROTOOPT when `net.mptcp.enabled=0` and with
  EPROTONOSUPPORT/EINVAL on kernels without MPTCP; both mean "use TCP".
- Python 3.11's asyncio `sock_connect` calls getaddrinfo with proto=262, which fails, so connects
  are done here with `connect_ex` and writer readiness.
- MPTCP sockets accept SO_KEEPALIVE, and TCP_KEEPIDLE/INTVL/CNT only on newer kernels
  (net/mptcp/sockopt.c); on refusal plain SO_KEEPALIVE with system defaults is used.
- A connection REDIRECTed by netfilter keeps its original destination in conntrack:
  getsockopt(SOL_IP, SO_ORIGINAL_DST=80) returns a sockaddr_in (include/uapi/linux/netfilter_ipv4.h)
  and getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST=80) a sockaddr_in6
  (include/uapi/linux/netfilter_ipv6/ip6_tables.h); ENOENT when conntrack has no entry. An IPv4
  connection accepted on a dual-stack IPv6 socket answers the SOL_IP form (ipv6_getsockopt hands
  SOL_IP to ip_getsockopt, net/ipv6/ipv6_sockglue.c).
- nftables `tproxy` delivers a connection to a socket bound with IP_TRANSPARENT (IPv4, 19) or
  IPV6_TRANSPARENT (75); its local address is the original destination. Setting either needs
  CAP_NET_ADMIN (or CAP_NET_RAW) (net/ipv4/ip_sockglue.c).
- UDP has no SO_ORIGINAL_DST: a datagram nftables `tproxy` hands to a socket with
  IP_RECVORIGDSTADDR (20, include/uapi/linux/in.h) or IPV6_RECVORIGDSTADDR (74,
  include/uapi/linux/in6.h) set carries its original destination in a control message of the
  same type (IP_ORIGDSTADDR, IPV6_ORIGDSTADDR: a sockaddr_in / sockaddr_in6). An IPv4 datagram
  on a dual-stack IPv6 socket gets the SOL_IP form, which the IPv6 socket takes through
  setsockopt(SOL_IP) (udpv6_recvmsg, net/ipv6/udp.c). Python 3.11 names none of the three.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from mptun.common.address import Address, IPAddress

IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)
SOL_MPTCP = 284
MPTCP_INFO = 1
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
# Python 3.11 lacks it: 30 in include/uapi/linux/tcp.h (a connect() that sends its SYN with the
# first write, carrying that write when a Fast Open cookie is cached; MPTCP from Linux 6.1)
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75  # include/uapi/linux/in6.h
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)  # include/uapi/linux/in.h
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_RECVORIGDSTADDR = 74  # include/uapi/linux/in6.h
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28

# errno values meaning "this kernel/namespace will not make an MPTCP socket"
_NO_MPTCP = {errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EINVAL, errno.EAFNOSUPPORT}


@dataclass(slots=True)
class Transport:
    """Which protocol to open tunnel sockets with; remembers a fallback so it warns once.

    Owned by a client or server instance (no module-level state).
    """

    want_mptcp: bool = True
    fell_back: bool = False

    def socket(self, family: int) -> tuple[socket.socket, bool]:
        """A new non-blocking stream socket and whether it is MPTCP.

        Returns the fallback reason through `fell_back` the first time MPTCP is refused.
        """
        if self.want_mptcp and not self.fell_back:
            try:
                s = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
            except OSError as e:
                if e.errno not in _NO_MPTCP:
                    raise
                self.fell_back = True
            else:
                s.setblocking(False)
                return s, True
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        return s, False


def family_of(host: str | IPAddress) -> int:
    """AF_INET or AF_INET6 for an address (or its text)."""
    ip = ipaddress.ip_address(host) if isinstance(host, str) else host
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, sockaddr: tuple, timeout: float
) -> None:
    """Connect a non-blocking socket; raise OSError (ETIMEDOUT on timeout) on failure."""
    err = sock.connect_ex(sockaddr)
    if err == 0:
        return
    if err not in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        raise OSError(err, errno.errorcode.get(err, str(err)))
    await wait_connected(loop, sock, timeout)


async def wait_connected(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float
) -> None:
    """Wait until a connecting socket is writable (connected or failed); OSError if it failed,
    ETIMEDOUT after `timeout`."""
    if not await wait_ready(loop, sock, timeout, write=True):
        raise OSError(errno.ETIMEDOUT, "connection timed out")
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, errno.errorcode.get(err, str(err)))


async def wait_ready(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float, write: bool = False
) -> bool:
    """Whether `sock` turns readable (writable with `write`) within `timeout` seconds: one
    reader or writer and one timer, cheaper than asyncio.wait_for's waiter and callbacks."""
    fut = loop.create_future()
    fd = sock.fileno()

    def ready(yes: bool) -> None:
        if not fut.done():
            fut.set_result(yes)

    (loop.add_writer if write else loop.add_reader)(fd, ready, True)
    timer = loop.call_later(timeout, ready, False)
    try:
        return await fut
    finally:
        timer.cancel()
        (loop.remove_writer if write else loop.remove_reader)(fd)


def tune_leg(sock: socket.socket) -> None:
    """Options for every relayed socket: no Nagle delay on small writes."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def set_keepalive(sock: socket.socket, idle: int = 60, interval: int = 15, count: int = 4) -> bool:
    """Enable keepalive with our timings; False if only SO_KEEPALIVE with defaults was possible."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:
        return False
    return True


def set_user_timeout(sock: socket.socket, seconds: float) -> bool:
    """Bound how long unacknowledged data may wait before the connection is dropped."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(seconds * 1000))
    except OSError:
        return False
    return True


def arm_reset(sock: socket.socket, armed: bool = True) -> None:
    """While armed, any close (also the kernel's when this process dies) sends RST, not FIN.

    A relay arms both legs while it runs and disarms them just before a clean close: a crash or
    kill of mptun then shows as a reset at the far ends instead of a FIN that would make a cut
    plain-mode stream look complete (SO_LINGER with a zero timeout: tcp_close() in
    net/ipv4/tcp.c; measured here for TCP and MPTCP, tests/test_faults.py).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", int(armed), 0))
    except OSError:
        pass


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0), so a truncated stream never looks complete."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def is_mptcp(sock: socket.socket) -> bool | None:
    """True if the connection runs MPTCP, False if it fell back to TCP, None if not MPTCP at all.

    MPTCP_INFO fails with EOPNOTSUPP once a connection has fallen back (net/mptcp/sockopt.c).
    """
    if sock.proto != IPPROTO_MPTCP:
        return None
    try:
        sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 256)
    except OSError:
        return False
    return True


def listen_socket(
    bind: Address, transport: Transport, backlog: int = 1024, transparent: bool = False
) -> tuple[socket.socket, bool]:
    """A listening non-blocking socket (MPTCP when possible) on an IP address and port.

    `transparent` makes it accept connections nftables `tproxy` hands it (IP_TRANSPARENT).
    """
    family = family_of(bind.host)  # type: ignore[arg-type]
    sock, mptcp = transport.socket(family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            set_transparent(sock)
        if family == socket.AF_INET6 and ipaddress.ip_address(bind.host).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(bind.sockaddr())
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock, mptcp


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[IPAddress]:
    """Resolve a name to its addresses (in the resolver's order, duplicates removed)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for family, _, _, _, sa in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sa[0].split("%")[0])
        if ip not in out:
            out.append(ip)
    return out


def is_local_address(ip: IPAddress) -> bool:
    """True if `ip` is one of this host's addresses, asked of the routing table.

    A UDP connect() does a route lookup without sending anything; for an address of this host it
    hits the `local` table, whose routes carry the address itself as preferred source. (A bind()
    test would be wrong where net.ipv4.ip_nonlocal_bind=1 lets any address bind.)
    """
    if ip.is_unspecified:
        return True
    s = socket.socket(family_of(ip), socket.SOCK_DGRAM)
    try:
        s.connect((str(ip), 9))
        src = ipaddress.ip_address(s.getsockname()[0].split("%")[0])
    except OSError:
        return False  # no route: certainly not ours
    finally:
        s.close()
    return src == ip


def set_transparent(sock: socket.socket) -> None:
    """Let `sock` own connections to foreign addresses (tproxy); OSError EPERM without privilege."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (what a dual-stack socket reports) as plain IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def sockaddr_address(sa: tuple) -> Address:
    """A socket address tuple as an Address, IPv4-mapped addresses unwrapped."""
    return Address(unmapped(ipaddress.ip_address(sa[0].split("%")[0])), sa[1])


def original_dst(sock: socket.socket) -> Address:
    """Where a connection REDIRECTed by netfilter was going (conntrack's original destination).

    Raises OSError (ENOENT) when conntrack knows no such connection.
    """
    peer = ipaddress.ip_address(sock.getpeername()[0].split("%")[0])
    if sock.family == socket.AF_INET or unmapped(peer).version == 4:
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
        if len(raw) < 8:
            raise OSError(errno.EINVAL, "short SO_ORIGINAL_DST answer")
        # struct sockaddr_in: family (host order), port (network order), address
        port = int.from_bytes(raw[2:4], "big")
        return Address(ipaddress.IPv4Address(raw[4:8]), port)
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    if len(raw) < 24:
        raise OSError(errno.EINVAL, "short IP6T_SO_ORIGINAL_DST answer")
    # struct sockaddr_in6: family, port (network order), flowinfo, address, scope id
    port = int.from_bytes(raw[2:4], "big")
    return Address(unmapped(ipaddress.IPv6Address(raw[8:24])), port)
