"""The server's Prometheus metrics (`--metrics`): what `--stats-file` shows, read when scraped.

docs/CLI.md ("Metrics") lists the names. The counter families are the client's (the same
`mptun_connections_total` outcomes, `mptun_bytes_total` directions), so one dashboard reads both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mptun.common.metrics import Metrics, add_stats_counters
from mptun.common.metrics_http import Collect

if TYPE_CHECKING:
    from mptun.server.service import Server

# Counters that are not a connection's outcome, each in its own family.
_OWN_FAMILIES = {"reload": "mptun_reloads_total", "check": "mptun_checks_total"}


def server_metrics(srv: Server) -> Collect:
    """What a scrape of the server reads."""

    def collect(m: Metrics) -> None:
        snap = srv.snapshot()
        add_stats_counters(m, snap["counters"], _OWN_FAMILIES)
        traffic = m.counter(
            "mptun_bytes_total",
            "Bytes the tunnels carried, counted when a tunnel ends: up from the client to the "
            "target, down back.",
        )
        traffic.add(srv.bytes_up, direction="up")
        traffic.add(srv.bytes_down, direction="down")
        m.gauge("mptun_tunnels_active", "Tunnels relaying now.", srv.relaying)
        m.gauge(
            "mptun_connections_active",
            "Accepted connections open now (handshaking, answering or relaying).",
            snap["active"],
        )
        m.counter(
            "mptun_limit_pauses_total",
            "Times --max-connections stopped the server accepting.",
            snap["limit_pauses"],
        )
        m.counter(
            "mptun_accept_errors_total",
            "accept() failures for want of file descriptors or memory.",
            snap["accept_errors"],
        )
        replay = snap["replay"]
        m.gauge("mptun_replay_cache_salts", "Salts the replay cache holds now.", replay["size"])
        m.gauge(
            "mptun_replay_cache_capacity",
            "Salts the replay cache may hold (--replay-capacity).",
            replay["capacity"],
        )
        m.gauge(
            "mptun_replay_cache_sources",
            "Sources (IPv4 addresses, IPv6 /64s) with salts in the replay cache.",
            replay["sources"],
        )
        hs = snap["handshakes"]
        m.gauge(
            "mptun_handshakes_open",
            "Unauthenticated connections held now (the handshake budget in use).",
            hs["open"],
        )
        m.gauge(
            "mptun_handshakes_budget",
            "Unauthenticated connections held at most (--max-handshakes, as lowered at start).",
            hs["budget"],
        )
        m.counter(
            "mptun_handshakes_evicted_total",
            "Unauthenticated connections closed early to make room in the handshake budget.",
            hs["evicted"],
        )
        if "udp_associations" in snap:  # server/udp.py
            m.gauge(
                "mptun_udp_associations", "UDP associations open now.", snap["udp_associations"]
            )

    return collect
