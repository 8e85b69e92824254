"""Uplink configuration for multipath: what the kernel needs, as a pure plan over a snapshot.

Upstream MPTCP opens an extra subflow only from a local address that has a `subflow` endpoint,
and that subflow leaves through its own uplink only if policy routing sends its source address
there (without it every subflow follows the default route). For each uplink interface mptun keeps:

- a routing table (`--table-base` upwards) holding the uplink's default route;
- per global address: rule N `from ADDR lookup main suppress_prefixlength 0` (the LAN and other
  specific routes still win) and rule N+1 `from ADDR lookup TABLE` (N = `--rule-priority`);
- per global address, while the link is up: an MPTCP endpoint `ADDR dev IFACE subflow`;
- the MPTCP limits (`--subflows`), set once for the namespace.

How mptun recognises what it added, so it lives beside netifd, mwan3 and hand-made config:
rules and routes carry protocol number `MPTUN_PROTO` (the rtm_protocol/FRA_PROTOCOL field that
`ip rule` shows as `proto 247`); endpoints have ids in `ENDPOINT_IDS`, taken from the top down
(the kernel numbers endpoints added without an id upwards from 1, continuing after the highest id
in use and wrapping past 255: net/mptcp/pm_kernel.c, mptcp_pm_nl_append_new_local_addr).

This module reads nothing and changes nothing: `plan()` turns a `State` (read by
`client/netlink.py`) into `Action`s, so the logic is testable without root.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mptun.common.address import IPAddress
from mptun.common.sockets import family_of

# Not in iproute2's rt_protos; `echo "247 mptun" > /etc/iproute2/rt_protos.d/mptun.conf` names it.
MPTUN_PROTO = 247
ENDPOINT_IDS = range(192, 256)  # mptun's endpoint ids, allocated highest first
MAIN_TABLE = 254
DEFAULT_TABLE_BASE = 1500
DEFAULT_RULE_PRIORITY = 1500
DEFAULT_SUBFLOWS = 8  # the kernel's maximum (MPTCP_PM_ADDR_MAX)
TABLE_SPAN = 256  # tables table_base .. table_base+255 are candidates for uplinks

FLAG_SIGNAL = 1
FLAG_SUBFLOW = 2
FLAG_BACKUP = 4
FLAG_FULLMESH = 8
FLAG_IMPLICIT = 16
FLAG_NAMES = {
    FLAG_SIGNAL: "signal",
    FLAG_SUBFLOW: "subflow",
    FLAG_BACKUP: "backup",
    FLAG_FULLMESH: "fullmesh",
    FLAG_IMPLICIT: "implicit",
}


def fam(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def flag_names(flags: int) -> str:
    return " ".join(n for bit, n in FLAG_NAMES.items() if flags & bit) or "-"


# -- the snapshot ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool  # IFF_UP: administratively up
    running: bool  # IFF_RUNNING: carrier (a veth whose peer is down is not running)
    pointopoint: bool = False  # IFF_POINTOPOINT (PPP, some LTE modems): no gateway needed

    @property
    def operational(self) -> bool:
        return self.up and self.running


@dataclass(frozen=True)
class Addr:
    index: int
    ip: IPAddress


@dataclass(frozen=True)
class Rule:
    family: int
    priority: int
    src: IPAddress | None
    table: int
    suppress_prefixlen: int | None = None
    protocol: int = MPTUN_PROTO

    def describe(self) -> str:
        src = f"from {self.src}" if self.src is not None else "from all"
        table = "main" if self.table == MAIN_TABLE else str(self.table)
        sup = "" if self.suppress_prefixlen is None else " suppress_prefixlength 0"
        return f"rule {self.priority}: {src} lookup {table}{sup}"


@dataclass(frozen=True)
class Route:
    """A default route (the only kind mptun adds or needs to read)."""

    family: int
    table: int
    gateway: IPAddress | None  # None: a device route (point-to-point uplink)
    oif: int | None
    protocol: int = MPTUN_PROTO
    metric: int = 0

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        dev = (names or {}).get(self.oif or 0, str(self.oif))
        via = f"via {self.gateway} " if self.gateway is not None else ""
        default = "default" if self.family == socket.AF_INET else "default (IPv6)"
        return f"route {default} {via}dev {dev} table {self.table}"


@dataclass(frozen=True)
class Endpoint:
    id: int
    ip: IPAddress
    flags: int
    ifindex: int | None = None
    port: int = 0

    @property
    def ours(self) -> bool:
        return self.id in ENDPOINT_IDS

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        dev = f" dev {(names or {}).get(self.ifindex, self.ifindex)}" if self.ifindex else ""
        return f"endpoint {self.ip} id {self.id} {flag_names(self.flags)}{dev}"


@dataclass(frozen=True)
class Limits:
    subflows: int
    add_addr_accepted: int


@dataclass
class State:
    """What the kernel holds, as far as uplinks are concerned (one network namespace)."""

    links: dict[str, Link]
    addrs: list[Addr]
    rules: list[Rule]  # every IPv4/IPv6 rule, any protocol
    routes: list[Route]  # default routes of every table
    used_tables: set[int]  # tables holding any route
    endpoints: list[Endpoint]
    limits: Limits | None  # None: no MPTCP in this kernel

    def link_by_index(self, index: int | None) -> Link | None:
        return next((ln for ln in self.links.values() if ln.index == index), None)

    def ips_of(self, link: Link) -> list[IPAddress]:
        return [a.ip for a in self.addrs if a.index == link.index]

    def owner_of(self, ip: IPAddress) -> Link | None:
        return next((self.link_by_index(a.index) for a in self.addrs if a.ip == ip), None)

    @property
    def names(self) -> dict[int, str]:
        return {ln.index: ln.name for ln in self.links.values()}


# -- what to do -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    verb: str  # "add" or "del" (or "set" for limits)
    obj: Rule | Route | Endpoint | Limits

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        o = self.obj
        if isinstance(o, Limits):
            return (
                f"set MPTCP limits: subflows {o.subflows} add_addr_accepted {o.add_addr_accepted}"
            )
        text = o.describe() if isinstance(o, Rule) else o.describe(names)
        return f"{self.verb} {text}"


@dataclass(frozen=True)
class Settings:
    table_base: int = DEFAULT_TABLE_BASE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    subflows: int = DEFAULT_SUBFLOWS
    gateways: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    backup: frozenset[str] = frozenset()
    # Uplinks the client's health checks found dead (client/health.py, the health file): their
    # endpoints are withdrawn, so no new subflow opens over them; routes and rules stay, so the
    # probes through them still leave by them and see them recover.
    withdrawn: frozenset[str] = frozenset()


@dataclass
class Memory:
    """What a long-running `--watch` remembers between passes (gateways vanish with the link)."""

    gateways: dict[tuple[str, int], IPAddress | None] = field(default_factory=dict)
    tables: dict[str, int] = field(default_factory=dict)


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should know
    tables: dict[str, int] = field(default_factory=dict)  # uplink -> its table


def _ours_rule(r: Rule) -> bool:
    return r.protocol == MPTUN_PROTO


def _ours_route(r: Route) -> bool:
    return r.protocol == MPTUN_PROTO


def _in_range(table: int, s: Settings) -> bool:
    return s.table_base <= table < s.table_base + TABLE_SPAN


def _table_for(
    state: State, link: Link, s: Settings, memory: Memory, claimed: dict[int, str]
) -> int:
    """The uplink's table: the one mptun already uses for it, else the lowest free one."""
    ips = set(state.ips_of(link))
    evidence = [r.table for r in state.routes if _ours_route(r) and r.oif == link.index]
    evidence += [
        r.table
        for r in state.rules
        if _ours_rule(r) and r.src in ips and r.table != MAIN_TABLE and r.suppress_prefixlen is None
    ]
    remembered = memory.tables.get(link.name)
    if remembered is not None:
        evidence.append(remembered)
    for t in evidence:
        if _in_range(t, s) and claimed.get(t, link.name) == link.name:
            return t
    referenced = {r.table for r in state.rules}
    for t in range(s.table_base, s.table_base + TABLE_SPAN):
        if t not in state.used_tables and t not in referenced and t not in claimed:
            return t
    raise ValueError(f"no free routing table in {s.table_base}..{s.table_base + TABLE_SPAN - 1}")


def _gateway(
    state: State, link: Link, family: int, s: Settings, memory: Memory
) -> tuple[bool, IPAddress | None]:
    """(found, gateway) for the uplink's default route; gateway None means a device route.

    Order: --gateway; a default route through the link in any other table (main first, lowest
    metric: what netifd/DHCP put there, which follows gateway changes); mptun's own route; what
    this process saw before the link went down; a device route on a point-to-point link.
    """
    for gw in s.gateways.get(link.name, ()):
        if family_of(gw) == family:
            return True, gw
    foreign = sorted(
        (r for r in state.routes if not _ours_route(r) and r.oif == link.index),
        key=lambda r: (r.table != MAIN_TABLE, r.metric),
    )
    for r in foreign:
        if r.family == family and r.gateway is not None:
            return True, r.gateway
    for r in state.routes:
        if _ours_route(r) and r.oif == link.index and r.family == family:
            return True, r.gateway
    if (link.name, family) in memory.gateways:
        return True, memory.gateways[(link.name, family)]
    if link.pointopoint:
        return True, None
    return False, None


def plan(
    state: State,
    ifaces: Iterable[str],
    s: Settings,
    memory: Memory | None = None,
) -> Plan:
    """The actions that make `ifaces` configured uplinks; empty when they already are."""
    memory = memory if memory is not None else Memory()
    out = Plan()
    if state.limits is None:
        out.notes.append("this kernel has no MPTCP: nothing to configure")
        return out
    want_limits = Limits(s.subflows, s.subflows)
    if state.limits != want_limits:
        out.actions.append(Action("set", want_limits))
    dels: list[Action] = []
    adds: list[Action] = []
    claimed: dict[int, str] = {}
    all_ips = {a.ip for a in state.addrs}
    used_ids = {e.id for e in state.endpoints}
    names = list(dict.fromkeys(ifaces))
    for name in names:
        link = state.links.get(name)
        if link is None:
            out.notes.append(f"{name}: no such interface (yet): nothing configured for it")
            continue
        table = _table_for(state, link, s, memory, claimed)
        claimed[table] = name
        memory.tables[name] = table
        out.tables[name] = table
        ips = state.ips_of(link)
        if not ips:
            out.notes.append(f"{name}: no global address: no rules or endpoint yet")
        # rules: the two per address; ours that point at this uplink but no longer fit go
        want_rules = set()
        for ip in ips:
            f = family_of(ip)
            want_rules.add(Rule(f, s.rule_priority, ip, MAIN_TABLE, 0))
            want_rules.add(Rule(f, s.rule_priority + 1, ip, table, None))
        have_rules = {
            r for r in state.rules if _ours_rule(r) and (r.src in ips or r.table == table)
        }
        dels += [Action("del", r) for r in sorted(have_rules - want_rules, key=str)]
        adds += [Action("add", r) for r in sorted(want_rules - have_rules, key=str)]
        # the uplink's default route(s), while the link is up (link down deletes them anyway)
        want_routes = set()
        families = sorted({family_of(ip) for ip in ips})
        if link.operational:
            for f in families:
                found, gw = _gateway(state, link, f, s, memory)
                if not found:
                    out.notes.append(
                        f"{name}: no {fam(f)} gateway (no default route through {name}): "
                        f"give --gateway {name}=ADDRESS"
                    )
                    continue
                memory.gateways[(name, f)] = gw
                want_routes.add(Route(f, table, gw, link.index))
        else:
            out.notes.append(f"{name} is down: its route and endpoint wait until it comes up")
        have_routes = {
            r for r in state.routes if _ours_route(r) and (r.oif == link.index or r.table == table)
        }
        have_routes = {_normalise(r) for r in have_routes}
        dels += [Action("del", r) for r in sorted(have_routes - want_routes, key=str)]
        adds += [Action("add", r) for r in sorted(want_routes - have_routes, key=str)]
        # endpoints, while the link is up and not dead by the health checks
        flags = FLAG_SUBFLOW | (FLAG_BACKUP if name in s.backup else 0)
        serving = link.operational and name not in s.withdrawn
        if link.operational and not serving:
            out.notes.append(
                f"{name} is dead by the uplink health checks: its endpoint is withdrawn until "
                "it answers again"
            )
        have_eps = [
            e for e in state.endpoints if e.ours and (e.ip in ips or e.ifindex == link.index)
        ]
        keep: set[IPAddress] = set()
        for e in have_eps:
            if serving and e.ip in ips and e.flags == flags and e.ifindex == link.index:
                keep.add(e.ip)
            else:
                dels.append(Action("del", e))
        if serving:
            for ip in ips:
                if ip in keep:
                    continue
                foreign = next((e for e in state.endpoints if e.ip == ip and not e.ours), None)
                if foreign is not None:
                    out.notes.append(
                        f"{name}: {ip} already has an endpoint that is not mptun's "
                        f"(id {foreign.id}, {flag_names(foreign.flags)}): left alone"
                        + ("" if foreign.flags & FLAG_SUBFLOW else "; it opens no subflows")
                    )
                    continue
                free = [i for i in reversed(ENDPOINT_IDS) if i not in used_ids]
                if not free:
                    out.notes.append(f"{name}: no free endpoint id for {ip}")
                    continue
                used_ids.add(free[0])
                adds.append(Action("add", Endpoint(free[0], ip, flags, link.index)))
    # leftovers whose address is gone from every interface (a new DHCP lease, a vanished link)
    for r in state.rules:
        if _ours_rule(r) and r.src is not None and r.src not in all_ips:
            a = Action("del", r)
            if a not in dels:
                dels.append(a)
    for e in state.endpoints:
        if e.ours and e.ip not in all_ips:
            a = Action("del", e)
            if a not in dels:
                dels.append(a)
    out.actions += _ordered(dels, adds)
    return out


def _normalise(r: Route) -> Route:
    """Drop fields the kernel fills in (metric) so a read route equals a planned one."""
    return Route(r.family, r.table, r.gateway, r.oif, r.protocol)


def _ordered(dels: list[Action], adds: list[Action]) -> list[Action]:
    """Endpoints go first and come last: a new endpoint opens subflows at once, so its route
    and rules must already be there; a rule goes only after nothing routes by it."""
    kind = {Endpoint: 0, Route: 1, Rule: 2}
    out = sorted(dels, key=lambda a: kind[type(a.obj)])
    out += sorted(adds, key=lambda a: -kind[type(a.obj)])
    return out


def clear_plan(state: State, ifaces: Iterable[str] | None) -> Plan:
    """Remove what mptun added: everything, or what belongs to `ifaces` (limits stay)."""
    out = Plan()
    chosen = list(ifaces or [])
    if not chosen:
        dels = [Action("del", e) for e in state.endpoints if e.ours]
        dels += [Action("del", _normalise(r)) for r in state.routes if _ours_route(r)]
        dels += [Action("del", r) for r in state.rules if _ours_rule(r)]
        out.actions = _ordered(dels, [])
        return out
    dels = []
    for name in chosen:
        link = state.links.get(name)
        if link is None:
            out.notes.append(f"{name}: no such interface")
            continue
        ips = set(state.ips_of(link))
        tables = {r.table for r in state.routes if _ours_route(r) and r.oif == link.index}
        tables |= {
            r.table for r in state.rules if _ours_rule(r) and r.src in ips and r.table != MAIN_TABLE
        }
        dels += [
            Action("del", e)
            for e in state.endpoints
            if e.ours and (e.ip in ips or e.ifindex == link.index)
        ]
        dels += [
            Action("del", _normalise(r))
            for r in state.routes
            if _ours_route(r) and (r.oif == link.index or r.table in tables)
        ]
        dels += [
            Action("del", r)
            for r in state.rules
            if _ours_rule(r) and (r.src in ips or (r.table in tables and r.table != MAIN_TABLE))
        ]
    # what no interface has an address for any more serves nobody (a PPP link that is gone)
    dels += [
        Action("del", r)
        for r in state.rules
        if _ours_rule(r) and r.src is not None and r.src not in {a.ip for a in state.addrs}
    ]
    dels += [
        Action("del", e)
        for e in state.endpoints
        if e.ours and e.ip not in {a.ip for a in state.addrs}
    ]
    out.actions = _ordered(list(dict.fromkeys(dels)), [])
    return out


def parse_gateways(values: Iterable[str]) -> dict[str, tuple[IPAddress, ...]]:
    """`IFACE=ADDRESS` (repeatable, one per family) -> {iface: (addresses)}; ValueError if bad."""
    out: dict[str, list[IPAddress]] = {}
    for v in values:
        name, sep, addr = v.partition("=")
        if not sep or not name or not addr:
            raise ValueError(f"--gateway {v!r}: expected IFACE=ADDRESS, e.g. wan2=192.0.2.1")
        try:
            ip = ipaddress.ip_address(addr.strip("[]"))
        except ValueError:
            raise ValueError(f"--gateway {v!r}: {addr!r} is not an IP address") from None
        got = out.setdefault(name, [])
        if any(g.version == ip.version for g in got):
            raise ValueError(f"--gateway: two IPv{ip.version} gateways for {name}")
        got.append(ip)
    return {k: tuple(v) for k, v in out.items()}


def describe(state: State, ifaces: Iterable[str] | None = None) -> list[str]:
    """Human lines: what mptun configured, per uplink, and endpoints that are not mptun's."""
    names = state.names
    lines = []
    if state.limits is None:
        return ["this kernel has no MPTCP (no mptcp_pm netlink family)"]
    lim = state.limits
    lines.append(
        f"MPTCP limits: subflows {lim.subflows}, add_addr_accepted {lim.add_addr_accepted}"
    )
    ours_rules = [r for r in state.rules if _ours_rule(r)]
    ours_routes = [r for r in state.routes if _ours_route(r)]
    ours_eps = [e for e in state.endpoints if e.ours]
    chosen = list(ifaces or [])
    if not chosen:
        seen = {r.oif for r in ours_routes} | {e.ifindex for e in ours_eps}
        seen |= {getattr(state.owner_of(r.src), "index", None) for r in ours_rules if r.src}
        chosen = [ln.name for ln in sorted(state.links.values(), key=lambda x: x.index)]
        chosen = [n for n in chosen if state.links[n].index in seen]
    if not chosen:
        lines.append("no uplinks configured by mptun (mptun uplinks IFACE... configures them)")
    for name in chosen:
        link = state.links.get(name)
        if link is None:
            lines.append(f"{name}: no such interface")
            continue
        ips = state.ips_of(link)
        routes = [r for r in ours_routes if r.oif == link.index]
        tables = sorted(
            {r.table for r in routes}
            | {r.table for r in ours_rules if r.src in ips and r.table != MAIN_TABLE}
        )
        state_word = "up" if link.operational else ("no carrier" if link.up else "down")
        head = f"{name} ({state_word})"
        head += f": table {', '.join(map(str, tables))}" if tables else ": no table"
        lines.append(head)
        for r in routes:
            lines.append(f"  {r.describe(names)}")
        if link.operational and not routes:
            lines.append("  no default route in its table: subflows from it cannot leave")
        for ip in ips:
            eps = [e for e in state.endpoints if e.ip == ip]
            ep = (
                ", ".join(
                    f"endpoint id {e.id} {flag_names(e.flags)}"
                    + ("" if e.ours else " (not mptun's)")
                    for e in eps
                )
                or "no endpoint"
            )
            prios = sorted(r.priority for r in ours_rules if r.src == ip)
            rules = f"rules {', '.join(map(str, prios))}" if prios else "no rules"
            lines.append(f"  {ip}: {ep}; {rules}")
        for e in ours_eps:
            if e.ifindex == link.index and e.ip not in ips:
                lines.append(f"  stale: {e.describe(names)} (address no longer on {name})")
    foreign = [e for e in state.endpoints if not e.ours]
    if foreign and not list(ifaces or []):
        lines.append("endpoints that are not mptun's:")
        lines += [f"  {e.describe(names)}" for e in foreign]
    return lines
