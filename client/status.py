"""`mptun status`: live tunnels with their subflows, the uplinks, and why speeds don't add up.

Sources, all in the caller's network namespace: each running client's control socket
(client/control.py: tunnels and per-subflow addresses/bytes from getsockopt), netlink (uplinks,
endpoints, limits, `ip route get` per endpoint; optional: needs pyroute2), and the kernel's MPTCP
counters in /proc/net/netstat (MPTcpExt: fallbacks, joins sent and answered).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptun.client import control
from mptun.client.uplinks import FLAG_SUBFLOW, State, describe
from mptun.common.errors import MptunError
from mptun.common.logutil import human_bytes

MIB_KEYS = (
    "MPCapableSYNTX",
    "MPCapableSYNACKRX",
    "MPCapableFallbackSYNACK",
    "MPJoinSynTx",
    "MPJoinSynAckRx",
    "MPJoinSynTxConnectErr",
    "MPJoinRejected",
)


def mptcp_counters() -> dict[str, int]:
    """MPTcpExt counters of this namespace (the two-line layout of /proc/net/netstat)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("MPTcpExt:"):
            pairs = zip(names.split()[1:], values.split()[1:], strict=False)
            return {k: int(v) for k, v in pairs if k in MIB_KEYS}
    return {}


@dataclass
class Report:
    clients: list[dict] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # control sockets that did not answer
    uplinks: list[str] = field(default_factory=list)  # lines of `mptun uplinks --show`
    problems: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "clients": self.clients,
            "unreachable": self.unreachable,
            "uplinks": self.uplinks,
            "problems": self.problems,
            "counters": self.counters,
        }


def _iface_of(state: State | None, ip: str) -> str:
    if state is None:
        return "?"
    try:
        link = state.owner_of(ipaddress.ip_address(ip))
    except ValueError:
        return "?"
    return link.name if link else "?"


def _server_ip(conn: dict) -> str | None:
    for sf in conn.get("subflows", []):
        remote = sf.get("remote", "")
        return remote.rsplit(":", 1)[0].strip("[]") or None
    return None


def diagnose(conn: dict, state: State | None, route_get: Any | None) -> list[str]:
    """Why this connection may not use every uplink, in words a router owner can act on."""
    cid, kind = conn["id"], conn.get("kind")
    if kind == "fallback":
        return [
            f"{cid} fell back to plain TCP: the server's SYN-ACK carried no MPTCP option (a "
            "middlebox on the path strips it, or MPTCP is off on the server), so it uses one "
            "uplink only"
        ]
    if kind == "tcp":
        return [f"{cid} is plain TCP (--transport tcp, or no MPTCP in this kernel): one uplink"]
    if kind != "mptcp" or state is None or state.limits is None:
        return []
    server = _server_ip(conn)
    if server is None:
        return []
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    used = {sf["local_ip"] for sf in conn.get("subflows", [])}
    eps = [
        e
        for e in state.endpoints
        if e.flags & FLAG_SUBFLOW
        and (socket.AF_INET6 if e.ip.version == 6 else socket.AF_INET) == family
    ]
    out = []
    if not eps:
        out.append(
            f"{cid}: no MPTCP subflow endpoints for its address family: it uses one uplink "
            "(run `mptun uplinks IFACE...`)"
        )
    extra = max(0, len(conn.get("subflows", [])) - 1)
    limit = conn.get("subflows_max")
    for e in eps:
        if str(e.ip) in used:
            continue
        link = state.owner_of(e.ip)
        name = link.name if link else "?"
        why = "the server did not accept the join (check `ip mptcp limits` on the server: "
        why += "subflows at least the number of extra uplinks) or the path drops it"
        if link is not None and not link.operational:
            why = f"{name} is down"
        elif limit is not None and extra >= limit:
            why = f"the subflow limit ({limit}) is reached: `mptun uplinks --subflows N`"
        elif route_get is not None and link is not None:
            oif = route_get(server, str(e.ip))
            if oif is None:
                why = f"no route from {e.ip} to the server: its table has no default route"
            elif oif != link.index:
                other = state.link_by_index(oif)
                why = (
                    f"traffic from {e.ip} to the server leaves through "
                    f"{other.name if other else oif}, not {name}: policy routing is missing "
                    f"(`mptun uplinks {name}`)"
                )
        out.append(f"{cid}: no subflow from {name} ({e.ip}): {why}")
    return out


def uplink_problems(state: State) -> list[str]:
    """Interfaces that look like uplinks (a default route through them) but have no endpoint."""
    out = []
    if state.limits is None:
        return ["this kernel has no MPTCP: tunnels run over plain TCP on one uplink"]
    with_ep = {e.ip for e in state.endpoints if e.flags & FLAG_SUBFLOW}
    gw_links = {r.oif for r in state.routes if r.oif is not None}
    for link in sorted(state.links.values(), key=lambda x: x.index):
        ips = state.ips_of(link)
        if link.index not in gw_links or not ips:
            continue
        missing = [ip for ip in ips if ip not in with_ep]
        if missing and link.operational:
            out.append(
                f"{link.name} has a default route but no MPTCP endpoint for "
                f"{', '.join(map(str, missing))}: it carries no extra subflow "
                f"(`mptun uplinks {link.name}`)"
            )
    n_eps = len(with_ep)
    if n_eps > 1 and state.limits.subflows < n_eps - 1:
        out.append(
            f"the MPTCP subflow limit ({state.limits.subflows}) is below the number of extra "
            f"uplinks ({n_eps - 1}): `mptun uplinks --subflows {n_eps}`"
        )
    return out


def gather(names: list[str] | None = None) -> Report:
    """Ask the clients, read netlink and counters, and diagnose."""
    rep = Report()
    for name in names or control.discover():
        try:
            rep.clients.append({"control": name, **control.query(name)})
        except MptunError as e:
            rep.unreachable.append(str(e))
    state = None
    route_get = None
    try:
        from mptun.client.netlink import Netlink

        with Netlink() as nl:
            state = nl.state()
            cache: dict[tuple[str, str], int | None] = {}

            def route_get(dst: str, src: str) -> int | None:
                if (dst, src) not in cache:
                    cache[(dst, src)] = nl.route_get(dst, src)
                return cache[(dst, src)]

            rep.uplinks = describe(state)
            rep.problems += uplink_problems(state)
            for c in rep.clients:
                for conn in c.get("connections", []):
                    rep.problems += diagnose(conn, state, route_get)
    except MptunError as e:  # no pyroute2: tunnels still shown, uplink checks skipped
        rep.uplinks = [f"(uplinks not shown: {e})"]
        for c in rep.clients:
            for conn in c.get("connections", []):
                rep.problems += diagnose(conn, None, None)
    rep.counters = mptcp_counters()
    c = rep.counters
    if c.get("MPCapableFallbackSYNACK"):
        rep.problems.append(
            f"{c['MPCapableFallbackSYNACK']} connection(s) from this namespace fell back to TCP "
            "because the SYN-ACK had no MPTCP option (kernel counter MPCapableFallbackSYNACK)"
        )
    if c.get("MPJoinSynTx", 0) > c.get("MPJoinSynAckRx", 0):
        rep.problems.append(
            f"{c['MPJoinSynTx'] - c['MPJoinSynAckRx']} of {c['MPJoinSynTx']} subflow joins got "
            "no answer (MPJoinSynTx vs MPJoinSynAckRx): the server's limits or the path"
        )
    for c in rep.clients:
        for conn in c.get("connections", []):
            for sf in conn.get("subflows", []):
                sf["iface"] = _iface_of(state, sf.get("local_ip", ""))
    return rep


def _rtt(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}ms" if ms >= 1 else f"{ms * 1000:.0f}us"


def _b(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def render(rep: Report) -> list[str]:
    lines = []
    if not rep.clients:
        lines.append("no mptun client answers in this network namespace")
    for c in rep.clients:
        conns = c.get("connections", [])
        lines.append(
            f"client pid {c.get('pid')} ({', '.join(c.get('listeners', []))}) -> server "
            f"{c.get('server')} over {c.get('transport')}: {len(conns)} tunnel(s) relaying"
        )
        for conn in conns:
            kind = {"mptcp": "MPTCP", "fallback": "TCP (MPTCP fell back)", "tcp": "TCP"}.get(
                conn.get("kind"), conn.get("kind")
            )
            sfs = conn.get("subflows", [])
            lines.append(
                f"  {conn['id']}  {conn['source']} -> {conn['target']}  {kind}, "
                f"{len(sfs)} subflow(s), {conn['seconds']:.0f} s, "
                f"down {_b(conn.get('bytes_received'))}, up {_b(conn.get('bytes_acked'))}"
            )
            if sfs:
                lines.append(
                    f"      {'#':>2}  {'iface':<8} {'local':<28} {'remote':<28} "
                    f"{'received':>10} {'sent':>10} {'rtt':>8}"
                )
            for sf in sfs:
                rtt = _rtt(sf.get("rtt_ms"))
                lines.append(
                    f"      {sf['id']:>2}  {sf.get('iface', '?'):<8} {sf['local']:<28} "
                    f"{sf['remote']:<28} {_b(sf.get('bytes_received')):>10} "
                    f"{_b(sf.get('bytes_acked')):>10} {rtt:>8}"
                )
            if conn.get("detail"):
                lines.append(f"      ({conn['detail']})")
    lines += [f"control socket: {u}" for u in rep.unreachable]
    lines.append("uplinks:")
    lines += [f"  {u}" for u in rep.uplinks]
    if rep.problems:
        lines.append("why speeds may not add up:")
        lines += [f"  - {p}" for p in rep.problems]
    return lines
