"""`mptun status`: live tunnels with their subflows, the uplinks, and why speeds don't add up.

Sources, all in the caller's network namespace: each running client's control socket
(client/control.py: tunnels and per-subflow addresses/bytes from getsockopt, and the client's
counters), netlink (uplinks, endpoints, limits, `ip route get` per endpoint; optional: needs
pyroute2), and the kernel's MPTCP counters in /proc/net/netstat (MPTcpExt: fallbacks, joins sent
and answered). Those count every program's connections in the namespace since it was created
(since boot for the host's), so they are shown as what they are, apart from the client's own.
Everything a control socket answered is printed through `control.clean`.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptun.client import control
from mptun.client.control import clean
from mptun.client.uplinks import FLAG_SUBFLOW, State, describe
from mptun.common.errors import MptunError
from mptun.common.logutil import human_bytes

MAX_NOT_READ_SHOWN = 20  # control sockets not read, listed in the text output
MIB_KEYS = (
    "MPCapableSYNTX",
    "MPCapableSYNACKRX",
    "MPCapableFallbackSYNACK",
    "MPJoinSynTx",
    "MPJoinSynAckRx",
    "MPJoinSynTxConnectErr",
    "MPJoinRejected",
    # Kernel 6.12+ blackhole detection (net/mptcp/ctrl.c): how often it tripped, and SYNs sent
    # without MPTCP while it held MPTCP off (`mptun uplinks` sets blackhole_timeout to 0).
    "Blackhole",
    "MPCapableSYNTXDisabled",
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
    unreachable: list[str] = field(default_factory=list)  # "NAME: why it was not read"
    notes: list[str] = field(default_factory=list)  # the namespace's kernel counters, in words
    uplinks: list[str] = field(default_factory=list)  # lines of `mptun uplinks --show`
    problems: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "clients": self.clients,
            "unreachable": self.unreachable,
            "uplinks": self.uplinks,
            "problems": self.problems,
            "notes": self.notes,
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
    for sf in conn.get("subflows") or []:
        remote = sf.get("remote") or ""
        return remote.rsplit(":", 1)[0].strip("[]") or None
    return None


def diagnose(conn: dict, state: State | None, route_get: Any | None) -> list[str]:
    """Why this connection may not use every uplink, in words a router owner can act on."""
    cid, kind = clean(conn.get("id", "?")), conn.get("kind")
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
    used = {sf.get("local_ip") for sf in conn.get("subflows") or []}
    eps = [
        e
        for e in state.endpoints
        if e.flags & FLAG_SUBFLOW
        and (socket.AF_INET6 if e.ip.version == 6 else socket.AF_INET) == family
    ]
    out = []
    if not eps and not plain_host(state):
        out.append(
            f"{cid}: no MPTCP subflow endpoints for its address family: it uses one uplink "
            "(run `mptun uplinks IFACE...`)"
        )
    extra = max(0, len(conn.get("subflows") or []) - 1)
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


def plain_host(state: State) -> bool:
    """One way out (at most one interface with an address and a default route) and no MPTCP
    endpoints: nothing to aggregate, so no advice to configure uplinks."""
    if any(e.flags & FLAG_SUBFLOW for e in state.endpoints):
        return False
    ways_out = {
        r.oif
        for r in state.routes
        if (link := state.link_by_index(r.oif)) is not None and state.ips_of(link)
    }
    return len(ways_out) < 2


def uplink_problems(state: State) -> list[str]:
    """Interfaces that look like uplinks (a default route through them) but have no endpoint."""
    out = []
    if state.limits is None:
        return ["this kernel has no MPTCP: tunnels run over plain TCP on one uplink"]
    if plain_host(state):
        return []
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


def counter_notes(c: dict[str, int]) -> list[str]:
    """The kernel's MPTcpExt counters that hint at trouble, saying what they count: every
    program's MPTCP connections in this network namespace since it was created, not only the
    client's tunnels."""
    out = []
    if c.get("MPCapableFallbackSYNACK"):
        out.append(
            f"{c['MPCapableFallbackSYNACK']} MPTCP connection(s) fell back to TCP because the "
            "SYN-ACK had no MPTCP option (MPCapableFallbackSYNACK)"
        )
    if c.get("Blackhole") or c.get("MPCapableSYNTXDisabled"):
        out.append(
            f"the kernel suspected an MPTCP blackhole {c.get('Blackhole', 0)} time(s) "
            f"(MPTcpExtBlackhole) and sent {c.get('MPCapableSYNTXDisabled', 0)} SYN(s) without "
            "MPTCP while it held MPTCP off (MPCapableSYNTXDisabled): set "
            "net.mptcp.blackhole_timeout to 0 (`mptun uplinks` does)"
        )
    if c.get("MPJoinSynTx", 0) > c.get("MPJoinSynAckRx", 0):
        out.append(
            f"{c['MPJoinSynTx'] - c['MPJoinSynAckRx']} of {c['MPJoinSynTx']} subflow joins got "
            "no answer (MPJoinSynTx vs MPJoinSynAckRx): the peers' limits or the paths"
        )
    return out


def gather(names: list[str] | None = None) -> Report:
    """Ask the clients, read netlink and counters, and diagnose."""
    rep = Report()
    for name in names or control.discover():
        try:
            rep.clients.append({**control.query(name), "control": name})
        except control.NotRead as e:
            rep.unreachable.append(f"{name}: {e}")
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
                for conn in c.get("connections") or []:
                    rep.problems += diagnose(conn, state, route_get)
    except MptunError as e:  # no pyroute2: tunnels still shown, uplink checks skipped
        rep.uplinks = [f"(uplinks not shown: {e})"]
        for c in rep.clients:
            for conn in c.get("connections") or []:
                rep.problems += diagnose(conn, None, None)
    for c in rep.clients:
        fell_back = (c.get("counters") or {}).get("mptcp-fallback", 0)
        if fell_back:
            rep.problems.append(
                f"{fell_back} tunnel(s) of client pid {c.get('pid')} since it started fell back "
                "to plain TCP: the server's SYN-ACK carried no MPTCP option (a middlebox strips "
                "it, or MPTCP is off on the server)"
            )
    rep.counters = mptcp_counters()
    rep.notes = counter_notes(rep.counters)
    for c in rep.clients:
        for conn in c.get("connections") or []:
            for sf in conn.get("subflows") or []:
                sf["iface"] = _iface_of(state, sf.get("local_ip", ""))
    return rep


def _rtt(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f}ms" if ms >= 1 else f"{ms * 1000:.0f}us"


def _b(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def render(rep: Report) -> list[str]:
    """The report as text lines; every string a client sent goes through `clean`."""
    lines = []
    if not rep.clients and not rep.unreachable:
        lines.append("no mptun client runs in this network namespace (no control socket found)")
    elif not rep.clients:
        lines.append(
            f"no mptun client answered: {len(rep.unreachable)} control socket(s) in this "
            "network namespace not read:"
        )
    for c in rep.clients:
        conns = c.get("connections") or []
        omitted = c.get("connections_omitted")
        more = f" (and {clean(omitted)} not shown: answer too long)" if omitted else ""
        lines.append(
            f"client pid {clean(c.get('pid'))} ({clean(', '.join(c.get('listeners') or []))}) "
            f"-> server {clean(c.get('server'))} over {clean(c.get('transport'))}: "
            f"{len(conns)} tunnel(s) relaying{more}"
        )
        lines += _render_servers(c)
        lines += _render_uplink_health(c)
        for conn in conns:
            lines += _render_conn(conn)
        lines += _render_udp(c)
    if rep.clients and rep.unreachable:
        lines.append("control sockets not read:")
    # Any user can bind names that look like clients': a few lines, then how many more.
    lines += [f"  {clean(u, 400)}" for u in rep.unreachable[:MAX_NOT_READ_SHOWN]]
    if len(rep.unreachable) > MAX_NOT_READ_SHOWN:
        more = len(rep.unreachable) - MAX_NOT_READ_SHOWN
        lines.append(f"  ... and {more} more (--json lists all)")
    lines.append("uplinks:")
    lines += [f"  {u}" for u in rep.uplinks]
    if rep.problems:
        lines.append("why speeds may not add up:")
        lines += [f"  - {clean(p, 1000)}" for p in rep.problems]
    if rep.notes:
        lines.append(
            "kernel counters of this network namespace (every program's MPTCP connections "
            "since it was created, not only the tunnels):"
        )
        lines += [f"  - {n}" for n in rep.notes]
    return lines


def _render_servers(client: dict) -> list[str]:
    """Each server's state (client/servers.py), when the client has several or one is down."""
    servers = client.get("servers") or []
    if len(servers) < 2 and all(s.get("state") != "down" for s in servers):
        return []
    lines = [
        f"  servers (--server-policy {clean(client.get('server_policy'))}, "
        f"--when-down {clean(client.get('when_down'))}):"
    ]
    for s in servers:
        rtt = s.get("rtt_ms")
        line = f"    {clean(s.get('server'))}  {clean(s.get('state'))}"
        line += f" for {s.get('for_seconds') or 0:.0f} s"
        if rtt is not None:
            line += f", check round trip {rtt:.1f} ms"
        if s.get("reason"):
            line += f": {clean(s.get('reason'), 300)}"
        if s.get("preferred"):
            line += " (new tunnels go here)"
        lines.append(line)
    return lines


def _render_uplink_health(client: dict) -> list[str]:
    """Each probed uplink's health (client/health.py, `--uplink`): state, since, reason."""
    uplinks = client.get("uplink_health") or []
    if not uplinks:
        return []
    lines = ["  uplink health (--uplink):"]
    for u in uplinks:
        since = u.get("since")
        when = "?"
        if isinstance(since, int | float):
            when = time.strftime("%H:%M:%S", time.localtime(since))
        line = f"    {clean(u.get('name')):<10} {clean(u.get('state')):<13} since {when}"
        if u.get("reason"):
            line += f": {clean(u.get('reason'), 300)}"
        lines.append(line)
    return lines


def _render_udp(client: dict) -> list[str]:
    """The client's UDP associations (client/udp.py): LAN source, destinations, bytes, age."""
    assocs = client.get("udp") or []
    if not assocs:
        return []
    lines = [f"  {len(assocs)} UDP association(s):"]
    for a in assocs:
        dests = [clean(d) for d in (a.get("destinations") or [])[:4]]
        more = len(a.get("destinations") or []) - len(dests)
        shown = ", ".join(dests) + (f" and {more} more" if more > 0 else "")
        lines.append(
            f"    {clean(a.get('id'))}  {clean(a.get('source'))} -> {shown or '-'}  "
            f"{clean(a.get('state'))}, {a.get('age') or 0:.0f} s "
            f"(idle {a.get('idle') or 0:.0f} s), "
            f"up {_b(a.get('up_bytes'))}, down {_b(a.get('down_bytes'))}, "
            f"{clean(a.get('drops'))} dropped"
        )
    return lines


def _render_conn(conn: dict) -> list[str]:
    kinds = {"mptcp": "MPTCP", "fallback": "TCP (MPTCP fell back)", "tcp": "TCP"}
    kind = kinds.get(conn.get("kind") or "", clean(conn.get("kind")))
    sfs = conn.get("subflows") or []
    lines = [
        f"  {clean(conn.get('id'))}  {clean(conn.get('source'))} -> {clean(conn.get('target'))}"
        f"  {kind}, {len(sfs)} subflow(s), {conn.get('seconds') or 0:.0f} s, "
        f"down {_b(conn.get('bytes_received'))}, up {_b(conn.get('bytes_acked'))}"
    ]
    if sfs:
        lines.append(
            f"      {'#':>2}  {'iface':<8} {'local':<28} {'remote':<28} "
            f"{'received':>10} {'sent':>10} {'rtt':>8}"
        )
    for sf in sfs:
        rtt = _rtt(sf.get("rtt_ms"))
        lines.append(
            f"      {clean(sf.get('id')):>2}  {clean(sf.get('iface', '?')):<8} "
            f"{clean(sf.get('local')):<28} {clean(sf.get('remote')):<28} "
            f"{_b(sf.get('bytes_received')):>10} {_b(sf.get('bytes_acked')):>10} {rtt:>8}"
        )
    if conn.get("detail"):
        lines.append(f"      ({clean(conn['detail'])})")
    return lines
