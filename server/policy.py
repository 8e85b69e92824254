"""Which target addresses the server may connect to.

By default the server refuses what a tunnel user should never reach through it: loopback, private,
link-local, multicast, reserved, unspecified and the server's own addresses. IPv4 addresses hidden
inside IPv6 forms are unwrapped first: IPv4-mapped (`::ffff:127.0.0.1`, which Python 3.11's
`ipaddress` does not call loopback), IPv4-compatible, 6to4 (2002::/16) and NAT64 (64:ff9b::/96).
Note: `ipaddress` counts the documentation ranges (192.0.2.0/24, ...) as private, so test beds
open them with `--allow-target`.

The server's own addresses are checked before `--allow-target`: a range opens a network beyond
the server, and the server sitting in that network must not open its own listeners with it. Own
means what the routing table delivers to this host, in both families (common/routes.py): its
addresses, prefixes routed `local` to it, its anycast and broadcast addresses. Only
`--allow-private` opens them. Loopback is the one exception: a range that lies within loopback
(127.0.0.0/8, ::1/128) names the host on purpose and opens those addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mptun.common.address import IPAddress, IPNetwork, parse_networks
from mptun.common.routes import is_own_address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(packed[12:])
    return None


def _forbidden(ip: IPAddress) -> str | None:
    for name in (
        "unspecified",
        "loopback",
        "link_local",
        "multicast",
        "private",
        "reserved",
        "site_local",
    ):
        if getattr(ip, f"is_{name}", False):
            return name.replace("_", "-")
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("100.64.0.0/10"):
        return "shared (CGNAT)"
    return None


def parse_cidrs(values: Iterable[str]) -> list[IPNetwork]:
    """`--allow-target` ranges (common/address.py's parser, in this option's words)."""
    return parse_networks(values, "allow-target", "a CIDR")


OWN = "the server's own address"


@dataclass
class TargetPolicy:
    """Decides per resolved address; `allow` opens ranges, `allow_private` opens all.

    `is_own` tells whether an address is one of the server's own (default: ask the kernel).
    """

    allow: list[IPNetwork] = field(default_factory=list)
    allow_private: bool = False
    is_own: Callable[[IPAddress], bool] = is_own_address

    def check(self, ip: IPAddress) -> str | None:
        """None if `ip` may be connected to, else the reason it may not."""
        if self.allow_private:
            return None
        inner = embedded_ipv4(ip)
        # A wrapper form is judged by the IPv4 address it carries; 6to4 by both.
        if inner is None:
            candidates = [ip]
        elif ip.sixtofour is not None:  # type: ignore[union-attr]
            candidates = [ip, inner]
        else:
            candidates = [inner]
        # The host itself first: no --allow-target range opens it (the module docstring).
        for c in candidates:
            if c.is_loopback:
                if not self._opened(c, loopback_only=True):
                    return f"loopback address {c}"
            elif self.is_own(c):
                return f"{OWN} {c}"
        for c in candidates:
            if self._opened(c):
                return None
        for c in candidates:
            why = _forbidden(c)
            if why:
                return f"{why} address {c}"
        return None

    def _opened(self, ip: IPAddress, loopback_only: bool = False) -> bool:
        """Whether an `allow` range holds `ip` (with `loopback_only`, a range within loopback)."""
        for n in self.allow:
            if ip.version != n.version or ip not in n:
                continue
            if not loopback_only or (n.network_address.is_loopback and n[-1].is_loopback):
                return True
        return False

    def hint(self, ip: IPAddress, why: str | None = None) -> str:
        """What would open `ip`, for the line that logs its refusal (`why`: `check`'s reason)."""
        why = self.check(ip) if why is None else why
        if why and why.startswith(OWN):
            return "only --allow-private opens the server's own addresses"
        return f"--allow-target {ip}/{ip.max_prefixlen} or --allow-private opens it"
