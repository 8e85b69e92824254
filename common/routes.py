"""Which kind of route the kernel picks for an address: one RTM_GETROUTE over rtnetlink, the
question `ip route get ADDR` asks, spoken here without a library (neither side needs pyroute2).

Kernel facts used here:
- struct nlmsghdr is {u32 len; u16 type; u16 flags; u32 seq; u32 pid} and NLM_F_REQUEST is 1;
  an error comes back as NLMSG_ERROR (2) carrying -errno (include/uapi/linux/netlink.h).
- RTM_GETROUTE (26) is answered with one RTM_NEWROUTE (24); struct rtmsg is {u8 family, dst_len,
  src_len, tos, table, protocol, scope, type; u32 flags}, then 4-aligned attributes {u16 len;
  u16 type}, RTA_DST being 1 (include/uapi/linux/rtnetlink.h).
- Without a source, input interface or mark, the lookup is an output route lookup that sees
  the `local` table first (rule 0): there the kernel keeps a `local` route for every address
  of the host, and `ip route add local PREFIX dev lo` makes the host answer a whole prefix
  (AnyIP). Broadcast addresses of the host's IPv4 subnets sit there too as `broadcast` routes
  (net/ipv4/fib_frontend.c fib_add_ifaddr), and on a forwarding host the subnet-router anycast
  address of each IPv6 subnet as an `anycast` route (net/ipv6/addrconf.c
  addrconf_join_anycast). The answer's rtm_type says which.
- A connect to the unspecified address reaches this host: IPv4 routes it to 127.0.0.1
  (net/ipv4/route.c ip_route_output_key_hash_rcu), IPv6 to ::1 (net/ipv6/route.c).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from mptun.common.address import IPAddress
from mptun.common.sockets import is_local_address

NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTA_DST = 1
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
RTN_ANYCAST = 4
# Route types whose traffic this host receives itself.
OWN_ROUTE_TYPES = frozenset({RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST})

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _request(ip: IPAddress, seq: int) -> bytes:
    packed = ip.packed
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    attr = _RTATTR.pack(_RTATTR.size + len(packed), RTA_DST) + packed  # 8 or 20: aligned
    body = _RTMSG.pack(family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0) + attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, seq, 0) + body


def route_type(ip: IPAddress) -> int | None:
    """The rtm_type (RTN_*) of the route the kernel picks for `ip`, None if it has none.

    Raises OSError when rtnetlink cannot be asked (no AF_NETLINK, a seccomp filter).
    """
    seq = int.from_bytes(os.urandom(4), "big") or 1
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.settimeout(1.0)  # the kernel answers within sendto; this bounds a broken kernel only
        s.bind((0, 0))
        s.sendto(_request(ip, seq), (0, 0))
        while True:
            data = s.recv(65536)
            if len(data) < _NLMSGHDR.size:
                raise OSError(errno.EPROTO, "short rtnetlink answer")
            _, kind, _, got_seq, _ = _NLMSGHDR.unpack_from(data)
            if got_seq != seq:
                continue  # not the answer to this request (a broadcast cannot reach us: no groups)
            if kind == NLMSG_ERROR:
                return None  # -ENETUNREACH and the like: no route, so not ours
            if kind != RTM_NEWROUTE or len(data) < _NLMSGHDR.size + _RTMSG.size:
                raise OSError(errno.EPROTO, f"unexpected rtnetlink answer type {kind}")
            return _RTMSG.unpack_from(data, _NLMSGHDR.size)[7]


def is_own_address(ip: IPAddress) -> bool:
    """True if a connection to `ip` would reach this host: one of its addresses, a prefix routed
    `local` to it (both families), its anycast or broadcast addresses, or the unspecified
    address. Where rtnetlink cannot be asked, falls back to `is_local_address`."""
    if ip.is_unspecified:
        return True
    try:
        kind = route_type(ip)
    except OSError:
        return is_local_address(ip)
    return kind in OWN_ROUTE_TYPES
