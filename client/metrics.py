"""The client's Prometheus metrics (`--metrics`): what `mptun status` and `--stats-file` show.

Read when scraped, from the objects that keep them: the tunneler's counters and byte totals,
the listeners' accept loops, the relaying tunnels' subflows (getsockopt on each tunnel socket,
common/mptcpinfo.py, as the control socket does), the servers' health (client/servers.py) and
the uplinks' (client/health.py). docs/CLI.md ("Metrics") lists the names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mptun.client.control import tunnels_snapshot
from mptun.client.health import UplinkState
from mptun.client.servers import State
from mptun.common.metrics import Metrics, add_stats_counters
from mptun.common.metrics_http import Collect

if TYPE_CHECKING:
    from mptun.client.health import HealthMonitor
    from mptun.client.service import Client
    from mptun.client.tunnel import Tunneler

# Counters of the tunneler that are not a connection's outcome, and the family each goes to.
_OWN_FAMILIES = {"reload": "mptun_reloads_total", "mptcp-fallback": "mptun_mptcp_fallbacks_total"}


def client_metrics(
    app: Client,
    tunneler: Tunneler,
    health: HealthMonitor | None,
    udp_associations: Callable[[], int] | None = None,
) -> Collect:
    """What a scrape of the client reads. `udp_associations`: how many UDP associations are
    open (client/udp.py), when the client relays UDP."""

    def collect(m: Metrics) -> None:
        add_stats_counters(m, dict(tunneler.counters), _OWN_FAMILIES)
        traffic = m.counter(
            "mptun_bytes_total",
            "Bytes the tunnels carried, counted when a tunnel ends: up from the LAN to the "
            "server, down back.",
        )
        traffic.add(tunneler.bytes_up, direction="up")
        traffic.add(tunneler.bytes_down, direction="down")
        m.gauge("mptun_tunnels_active", "Tunnels relaying now.", len(tunneler.live))
        m.gauge(
            "mptun_connections_active",
            "Accepted connections open now (handshaking or relaying).",
            sum(a.active for a in app.loops),
        )
        m.counter(
            "mptun_limit_pauses_total",
            "Times --max-connections stopped a listener accepting.",
            sum(a.pauses for a in app.loops),
        )
        m.counter(
            "mptun_accept_errors_total",
            "accept() failures for want of file descriptors or memory.",
            sum(a.accept_errors for a in app.loops),
        )
        _subflows(m, tunneler, health)
        _servers(m, tunneler)
        if health is not None:
            _uplink_health(m, health)
        if udp_associations is not None:
            m.gauge("mptun_udp_associations", "UDP associations open now.", udp_associations())

    return collect


def _uplink_of(health: HealthMonitor | None) -> dict[str, str]:
    """Local address -> the --uplink interface that has it (as the health monitor read them)."""
    if health is None:
        return {}
    return {str(ip): name for name, up in health.uplinks.items() for ip in up.addresses}


def _subflows(m: Metrics, tunneler: Tunneler, health: HealthMonitor | None) -> None:
    """Per local address (an uplink's), the relaying tunnels' subflows and their bytes."""
    names = _uplink_of(health)
    count: dict[str, int] = {}
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    kinds = {"mptcp": 0, "fallback": 0, "tcp": 0}
    for conn in tunnels_snapshot(tunneler):
        kind = conn.get("kind") or "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
        for sf in conn.get("subflows") or []:
            ip = sf.get("local_ip") or ""
            count[ip] = count.get(ip, 0) + 1
            sent[ip] = sent.get(ip, 0) + (sf.get("bytes_acked") or 0)
            received[ip] = received.get(ip, 0) + (sf.get("bytes_received") or 0)
    by_kind = m.gauge(
        "mptun_tunnels_by_kind",
        "Tunnels relaying now by what the kernel says they are: mptcp, fallback (MPTCP socket, "
        "plain TCP on the wire), tcp.",
    )
    for kind, n in kinds.items():
        by_kind.add(n, kind=kind)
    subflows = m.gauge(
        "mptun_uplink_subflows",
        "Subflows of the tunnels relaying now, by local address (and its --uplink name).",
    )
    moved = m.gauge(
        "mptun_uplink_bytes",
        "Bytes the subflows of the tunnels relaying now moved, by local address (tcp_info: "
        "up acknowledged by the server, down received); they leave the sum when a tunnel ends.",
    )
    for ip in sorted(count):
        uplink = names.get(ip, "")
        subflows.add(count[ip], local=ip, uplink=uplink)
        moved.add(sent[ip], local=ip, uplink=uplink, direction="up")
        moved.add(received[ip], local=ip, uplink=uplink, direction="down")


def _servers(m: Metrics, tunneler: Tunneler) -> None:
    """Each server's state (1 for the one it is in) and its check round trip."""
    state = m.gauge(
        "mptun_server_state", "1 for the state each --server is in now (unknown, up, down)."
    )
    rtt = m.gauge("mptun_server_rtt_seconds", "Each --server's smoothed check round trip.")
    for s in tunneler.servers.snapshot():
        for st in State:
            state.add(int(s["state"] == st.value), server=s["server"], state=st.value)
        if s.get("rtt_ms") is not None:
            rtt.add(s["rtt_ms"] / 1000, server=s["server"])


def _uplink_health(m: Metrics, health: HealthMonitor) -> None:
    """Each --uplink's health state (1 for the one it is in), loss and probe round trip."""
    state = m.gauge(
        "mptun_uplink_health",
        "1 for the health state each --uplink is in now (unknown, up, degraded, dead, "
        "mptcp-broken).",
    )
    loss = m.gauge("mptun_uplink_loss_ratio", "Share of an --uplink's probes lost (last 10 s).")
    rtt = m.gauge("mptun_uplink_rtt_seconds", "Median probe round trip of an --uplink (10 s).")
    for h in health.healths():
        for st in UplinkState:
            state.add(int(h.state is st), uplink=h.name, state=st.value)
        if (value := h.loss()) is not None:
            loss.add(value, uplink=h.name)
        if (value := h.rtt()) is not None:
            rtt.add(value, uplink=h.name)
