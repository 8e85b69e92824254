"""The router's nftables ruleset for gateway mode, built as data and rendered as text.

`gateway_table(settings)` builds a `Table` (sets, chains, rules); `Table.render()` prints it in
`nft -f` syntax, by default preceded by the two lines that make loading it replace an earlier copy
atomically (`table inet mptun` + `delete table inet mptun`: nft 1.0.6 has no `destroy`). The
OpenWrt package renders the same table for an fw4 include.

What is never redirected, and why:
- packets that do not come in on a LAN interface: the router's own connections (the tunnel to the
  VPS among them) use the output path and never reach a prerouting hook, so nothing loops;
- destinations on the router itself (`fib daddr type local`);
- the VPS server's addresses (a LAN connection to the VPS goes out as it is);
- the bypass ranges (by default loopback, private, shared, link-local, multicast, reserved);
- what the bypassed LAN hosts send (`source_bypass`), TCP and UDP.

With `udp_port` the LAN's UDP is handed to the client's `--tproxy-udp` listener by nftables
`tproxy` (UDP has no conntrack original destination to read back, so REDIRECT cannot serve it),
whatever the TCP mode, with the same exceptions, broadcast and multicast, port 53 when
`dns_port` catches it, and the `udp_bypass_ports`. It never uses the `socket transparent 1`
shortcut of the TCP chain: the client's reply sockets are transparent, bound to remote addresses
and unconnected, so for UDP that match would take the LAN's datagrams to them (client/tproxy.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mptun.common.address import IPAddress, IPNetwork
from mptun.common.address import parse_networks as _parse_networks
from mptun.common.errors import ConfigError

# What a router should never send through the tunnel unless told to: RFC 6890's special-purpose
# ranges that are not globally reachable (documentation ranges excepted: test beds use them).
DEFAULT_BYPASS_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
DEFAULT_BYPASS_V6 = ("::/127", "fc00::/7", "fe80::/10", "ff00::/8")
DEFAULT_BYPASS = DEFAULT_BYPASS_V4 + DEFAULT_BYPASS_V6

DEFAULT_TABLE = "mptun"
DEFAULT_LAN = ("br-lan",)  # OpenWrt's LAN bridge
DEFAULT_MARK = 0x10000  # outside mwan3's default mark mask (0x3F00)
DEFAULT_ROUTE_TABLE = 100

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")  # IFNAMSIZ-1; no quotes or spaces
_TABLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")

Mode = Literal["redirect", "tproxy"]


@dataclass
class NftSet:
    name: str
    type: str  # ipv4_addr, ipv6_addr, ifname
    elements: list[str]
    interval: bool = False

    def render(self) -> list[str]:
        lines = [f"set {self.name} {{", f"\ttype {self.type}"]
        if self.interval:
            lines.append("\tflags interval")
        if self.elements:
            lines.append(f"\telements = {{ {', '.join(self.elements)} }}")
        return [*lines, "}"]


@dataclass
class Chain:
    name: str
    type: str | None = None  # a base chain: filter, nat
    hook: str | None = None
    priority: str | None = None
    policy: str = "accept"
    rules: list[str] = field(default_factory=list)
    comment: str | None = None

    def render(self) -> list[str]:
        lines = [f"chain {self.name} {{"]
        if self.comment:
            lines.append(f"\t# {self.comment}")
        if self.type:
            lines.append(
                f"\ttype {self.type} hook {self.hook} priority {self.priority}; "
                f"policy {self.policy};"
            )
        lines += [f"\t{r}" for r in self.rules]
        return [*lines, "}"]


@dataclass
class Table:
    family: str
    name: str
    sets: list[NftSet] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    header: list[str] = field(default_factory=list)  # comment lines printed first

    def delete_command(self) -> str:
        return f"nft delete table {self.family} {self.name}"

    def render(self, replace: bool = True) -> str:
        """`nft -f` text; `replace` prefixes what makes loading it replace an older copy."""
        out = [f"# {line}" if line else "#" for line in self.header]
        if replace:
            out += [f"table {self.family} {self.name}", f"delete table {self.family} {self.name}"]
        out.append(f"table {self.family} {self.name} {{")
        blocks = [s.render() for s in self.sets] + [c.render() for c in self.chains]
        for i, block in enumerate(blocks):
            if i:
                out.append("")
            out += [f"\t{line}" for line in block]
        out.append("}")
        return "\n".join(out) + "\n"


@dataclass
class GatewaySettings:
    """What `mptun nft` is told: the listener, the LAN, what to leave alone, the extras."""

    port: int  # the client's --redir (mode redirect) or --tproxy (mode tproxy) port
    mode: Mode = "redirect"
    lan_interfaces: Sequence[str] = DEFAULT_LAN
    servers: Sequence[IPAddress] = ()
    bypass: Sequence[IPNetwork] = field(
        default_factory=lambda: [ipaddress.ip_network(c) for c in DEFAULT_BYPASS]
    )
    dns_port: int | None = None  # redirect the LAN's port 53 (UDP and TCP) here
    block_quic: bool = False
    ipv6: bool = True
    table: str = DEFAULT_TABLE
    mark: int = DEFAULT_MARK
    route_table: int = DEFAULT_ROUTE_TABLE
    udp_port: int | None = None  # the client's --tproxy-udp port: the LAN's UDP through it
    source_bypass: Sequence[IPNetwork] = ()  # LAN hosts whose TCP and UDP leave directly
    udp_bypass_ports: Sequence[tuple[int, int]] = ()  # UDP from or to these ports leaves directly

    @property
    def policy_routing(self) -> bool:
        """Whether the ruleset marks packets for local delivery (tproxy of TCP or UDP)."""
        return self.mode == "tproxy" or self.udp_port is not None

    def validate(self) -> None:
        ports = (
            (self.port, "listener port"),
            (self.dns_port, "DNS port"),
            (self.udp_port, "UDP port"),
        )
        for p, what in ports:
            if p is not None and not 0 < p <= 0xFFFF:
                raise ConfigError(f"{what} must be 1-65535, not {p}")
        if not self.lan_interfaces:
            raise ConfigError("give at least one LAN interface")
        for name in self.lan_interfaces:
            if not _IFNAME.match(name):
                raise ConfigError(f"lan: not an interface name: {name!r}")
        if not _TABLE_NAME.match(self.table):
            raise ConfigError(f"table: not a table name: {self.table!r} (letters, digits, _)")
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise ConfigError(f"mark must be 1-0xffffffff, not {self.mark:#x}")
        if not 0 < self.route_table < 0xFFFFFFFF or self.route_table in (253, 254, 255):
            raise ConfigError(f"route table {self.route_table} is reserved or out of range")
        if self.udp_bypass_ports and self.udp_port is None:
            raise ConfigError("UDP bypass ports need the UDP port (--udp-port): no UDP is caught")
        for lo, hi in self.udp_bypass_ports:
            if not 0 < lo <= hi <= 0xFFFF:
                raise ConfigError(f"UDP bypass ports {lo}-{hi}: give 1-65535, the lower first")


def parse_port_ranges(values: Iterable[str]) -> list[tuple[int, int]]:
    """Ports and ranges (`3074`, `3478-3480`) as (low, high) pairs; ConfigError if one is bad."""
    out = []
    for value in values:
        text = value.strip()
        lo, sep, hi = text.partition("-")
        try:
            pair = (int(lo), int(hi) if sep else int(lo))
        except ValueError:
            raise ConfigError(f"not a port or a port range (PORT or LOW-HIGH): {value!r}") from None
        if not 0 < pair[0] <= pair[1] <= 0xFFFF:
            raise ConfigError(f"port range {value!r}: ports 1-65535, the lower first")
        out.append(pair)
    return out


def _port_elements(ranges: Iterable[tuple[int, int]]) -> list[str]:
    """Sorted, merged port ranges (an interval set refuses overlapping elements)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merged]


def parse_networks(values: Iterable[str], what: str = "bypass") -> list[IPNetwork]:
    """Bypass ranges: addresses or CIDRs (common/address.py's parser, in this option's words)."""
    return _parse_networks(values, what)


def _elements(nets: Iterable[IPNetwork], version: int) -> list[str]:
    """Sorted, merged CIDRs of one family (an interval set refuses overlapping elements)."""
    chosen = [n for n in nets if n.version == version]
    merged = ipaddress.collapse_addresses(chosen)  # type: ignore[type-var]
    return [str(n) if n.prefixlen != n.max_prefixlen else str(n.network_address) for n in merged]


def _skip_rules(ipv6: bool) -> list[str]:
    """Destinations never redirected: this router, the VPS server, the bypass ranges."""
    rules = [
        "fib daddr type local return",
        "ip daddr @server_v4 return",
        "ip daddr @bypass_v4 return",
    ]
    if ipv6:
        rules += ["ip6 daddr @server_v6 return", "ip6 daddr @bypass_v6 return"]
    else:
        rules.append("meta nfproto ipv6 return")
    return rules


def gateway_table(s: GatewaySettings) -> Table:
    """The whole gateway ruleset for `s` as one table."""
    s.validate()
    servers = [ipaddress.ip_network(ip) for ip in s.servers]
    sets = [
        NftSet("lan_ifaces", "ifname", [f'"{n}"' for n in dict.fromkeys(s.lan_interfaces)]),
        NftSet("server_v4", "ipv4_addr", _elements(servers, 4), interval=True),
        NftSet("bypass_v4", "ipv4_addr", _elements(s.bypass, 4), interval=True),
    ]
    if s.ipv6:
        sets += [
            NftSet("server_v6", "ipv6_addr", _elements(servers, 6), interval=True),
            NftSet("bypass_v6", "ipv6_addr", _elements(s.bypass, 6), interval=True),
        ]
    chains: list[Chain] = []
    only_lan = "iifname != @lan_ifaces return"
    from_bypassed = []  # the bypassed LAN hosts' rules (none without them: the usual ruleset)
    if s.source_bypass:
        v4 = NftSet("source_bypass_v4", "ipv4_addr", _elements(s.source_bypass, 4), interval=True)
        sets.append(v4)
        from_bypassed.append("ip saddr @source_bypass_v4 return")
        if s.ipv6:
            v6 = _elements(s.source_bypass, 6)
            sets.append(NftSet("source_bypass_v6", "ipv6_addr", v6, interval=True))
            from_bypassed.append("ip6 saddr @source_bypass_v6 return")
    dns_family = "" if s.ipv6 else "meta nfproto ipv4 "
    dns_rule = (
        f"{dns_family}meta l4proto {{ tcp, udp }} th dport 53 redirect to :{s.dns_port}"
        if s.dns_port
        else None
    )
    if s.mode == "redirect":
        nat = [only_lan]
        if dns_rule:
            nat.append(dns_rule)  # before the local-address rule: catches queries to the router
        nat += [*from_bypassed, *_skip_rules(s.ipv6), f"meta l4proto tcp redirect to :{s.port}"]
        chains.append(
            Chain(
                "lan_redirect",
                "nat",
                "prerouting",
                "dstnat",
                rules=nat,
                comment="the LAN's TCP to the mptun client's --redir port",
            )
        )
    else:
        mark = f"{s.mark:#x}"
        chains.append(
            Chain(
                "lan_tproxy",
                "filter",
                "prerouting",
                "mangle",
                rules=[
                    only_lan,
                    *from_bypassed,
                    *_skip_rules(s.ipv6),
                    # packets of connections already handed over: mark them for local delivery
                    f"meta l4proto tcp socket transparent 1 meta mark set {mark} accept",
                    f"meta l4proto tcp tproxy to :{s.port} meta mark set {mark} accept",
                ],
                comment="the LAN's TCP to the mptun client's --tproxy port",
            )
        )
        if dns_rule:
            chains.append(
                Chain("lan_dns", "nat", "prerouting", "dstnat", rules=[only_lan, dns_rule])
            )
    if s.udp_port is not None:
        if s.udp_bypass_ports:
            ports = _port_elements(s.udp_bypass_ports)
            sets.append(NftSet("udp_bypass_ports", "inet_service", ports, interval=True))
        chains.append(_udp_chain(s, only_lan, from_bypassed))
    if s.block_quic:
        chains.append(
            Chain(
                "lan_block_quic",
                "filter",
                "forward",
                "filter",
                rules=["iifname @lan_ifaces udp dport 443 reject"],
                comment="QUIC is UDP and would bypass the tunnel: refuse it so browsers use TCP",
            )
        )
    return Table("inet", s.table, sets, chains, _header(s))


def _udp_chain(s: GatewaySettings, only_lan: str, from_bypassed: list[str]) -> Chain:
    """The LAN's UDP to the client's --tproxy-udp listener (nftables `tproxy`, marked)."""
    mark = f"{s.mark:#x}"
    rules = [only_lan, "meta l4proto != udp return", *from_bypassed]
    if s.dns_port:
        rules.append("udp dport 53 return")  # the dstnat chain sends it to --dns
    rules += [
        # to the router, and to broadcast and multicast (DHCP, mDNS, SSDP) it never tunnels
        "fib daddr type { local, broadcast, multicast } return",
        *_skip_rules(s.ipv6)[1:],
    ]
    if s.udp_bypass_ports:
        rules += ["udp sport @udp_bypass_ports return", "udp dport @udp_bypass_ports return"]
    rules.append(f"meta l4proto udp tproxy to :{s.udp_port} meta mark set {mark} accept")
    return Chain(
        "lan_udp",
        "filter",
        "prerouting",
        "mangle",
        rules=rules,
        comment="the LAN's UDP to the mptun client's --tproxy-udp port",
    )


def _header(s: GatewaySettings) -> list[str]:
    lines = [
        "mptun gateway ruleset (generated by `mptun nft`). Load: nft -f FILE",
        f"Remove: nft delete table inet {s.table}",
    ]
    if s.policy_routing:
        lines += [
            "tproxy also needs policy routing that delivers marked packets locally:",
            f"  ip rule add fwmark {s.mark:#x} lookup {s.route_table}",
            f"  ip route add local 0.0.0.0/0 dev lo table {s.route_table}",
        ]
        if s.ipv6:
            lines += [
                f"  ip -6 rule add fwmark {s.mark:#x} lookup {s.route_table}",
                f"  ip -6 route add local ::/0 dev lo table {s.route_table}",
            ]
    return lines


def policy_routing_commands(s: GatewaySettings) -> list[list[str]]:
    """The `ip` commands tproxy (TCP or UDP) needs (the ruleset's header says the same)."""
    cmds = [
        ["ip", "rule", "add", "fwmark", f"{s.mark:#x}", "lookup", str(s.route_table)],
        ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(s.route_table)],
    ]
    if s.ipv6:
        cmds += [
            ["ip", "-6", "rule", "add", "fwmark", f"{s.mark:#x}", "lookup", str(s.route_table)],
            ["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", str(s.route_table)],
        ]
    return cmds


def render_gateway(s: GatewaySettings, replace: bool = True) -> str:
    """The ruleset text for `s` (the function the OpenWrt package calls)."""
    return gateway_table(s).render(replace)
