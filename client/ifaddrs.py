"""The uplinks' addresses over rtnetlink, spoken with the standard library: what uplink health
reads every few seconds, without pyroute2 (on OpenWrt python3-pyroute2 depends on the whole
python3, megabytes the router's client does not otherwise need; `mptun uplinks`, which changes
routes and endpoints, still uses it through client/netlink.py). It answers as
`Netlink().state()` would: links up and running, their global addresses that are neither
temporary, tentative, deprecated nor failed DAD (client/netlink.py, SKIPPED_ADDRS).

Kernel facts used here (include/uapi/linux/netlink.h, rtnetlink.h, if_link.h, if_addr.h):
- A dump is a request with NLM_F_REQUEST|NLM_F_DUMP (0x1|0x300); the answer comes as several
  messages per datagram, each a struct nlmsghdr {u32 len; u16 type; u16 flags; u32 seq;
  u32 pid} padded to 4 bytes, and ends with NLMSG_DONE (3); NLMSG_ERROR (2) carries -errno.
- RTM_GETLINK (18) takes a struct ifinfomsg {u8 family; u8 pad; u16 type; i32 index;
  u32 flags; u32 change} and is answered with RTM_NEWLINK (16); its flags are dev_get_flags()'s,
  IFF_RUNNING (0x40) included; attribute IFLA_IFNAME (3) is the NUL-terminated name.
- RTM_GETADDR (22) takes a struct ifaddrmsg {u8 family; u8 prefixlen; u8 flags; u8 scope;
  u32 index} and is answered with RTM_NEWADDR (20); attributes IFA_ADDRESS (1), IFA_LOCAL (2:
  the local end on a point-to-point link, where IFA_ADDRESS is the peer) and IFA_FLAGS (8: all
  32 bits of the flags, ifa_flags holding the low 8).
- Attributes are struct rtattr {u16 len; u16 type} followed by the value, padded to 4 bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

from mptun.common.address import IPAddress

NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFF_UP = 0x1
IFF_RUNNING = 0x40
RT_SCOPE_UNIVERSE = 0
# IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE, as client/netlink.py
SKIPPED_ADDRS = 0x01 | 0x08 | 0x20 | 0x40

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BBHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """The attributes from `offset` to `end` (a later one of the same type wins)."""
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            break  # malformed: stop at what was well formed
        out[kind & 0x3FFF] = data[offset + _RTATTR.size : offset + length]  # less NLA_F_ flags
        offset += _align(length)
    return out


def _dump(kind: int, body: bytes) -> Iterator[tuple[int, bytes, int]]:
    """(type, datagram, offset of the body) of each message answering a dump request."""
    seq = int.from_bytes(os.urandom(4), "big") or 1
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.settimeout(2.0)  # the kernel answers at once; this bounds a broken kernel only
        s.bind((0, 0))
        head = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        s.sendto(head + body, (0, 0))
        while True:
            data = s.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _, got_seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size or offset + length > len(data):
                    raise OSError(errno.EPROTO, "malformed rtnetlink answer")
                if got_seq == seq:
                    if mtype == NLMSG_DONE:
                        return
                    if mtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                        raise OSError(code, os.strerror(code))
                    yield mtype, data[: offset + length], offset + _NLMSGHDR.size
                offset += _align(length)


def running_links() -> dict[str, int]:
    """Name -> index of every link that is up and running (`Link.operational`)."""
    out: dict[str, int] = {}
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0)
    for mtype, data, at in _dump(RTM_GETLINK, body):
        if mtype != RTM_NEWLINK or len(data) < at + _IFINFOMSG.size:
            continue
        _, _, _, index, flags, _ = _IFINFOMSG.unpack_from(data, at)
        name = _attrs(data, at + _IFINFOMSG.size, len(data)).get(IFLA_IFNAME)
        if name and flags & IFF_UP and flags & IFF_RUNNING:
            out[name.split(b"\0", 1)[0].decode(errors="replace")] = index
    return out


def global_addresses() -> dict[int, list[IPAddress]]:
    """Link index -> its stable global addresses, in the kernel's order."""
    out: dict[int, list[IPAddress]] = {}
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for mtype, data, at in _dump(RTM_GETADDR, body):
        if mtype != RTM_NEWADDR or len(data) < at + _IFADDRMSG.size:
            continue
        family, _, flags, scope, index = _IFADDRMSG.unpack_from(data, at)
        if family not in (socket.AF_INET, socket.AF_INET6) or scope != RT_SCOPE_UNIVERSE:
            continue
        attrs = _attrs(data, at + _IFADDRMSG.size, len(data))
        if len(attrs.get(IFA_FLAGS, b"")) == 4:
            flags = _U32.unpack(attrs[IFA_FLAGS])[0]
        if flags & SKIPPED_ADDRS:
            continue
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if raw is not None and len(raw) in (4, 16):
            out.setdefault(index, []).append(ipaddress.ip_address(raw))
    return out


def read_addresses(names: list[str]) -> dict[str, list[IPAddress]]:
    """Each of `names`' global addresses ([] for a link that is missing, down or not running)."""
    links = running_links()
    addrs = global_addresses()
    return {n: addrs.get(links[n], []) if n in links else [] for n in names}
