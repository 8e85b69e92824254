"""The server's configuration from plain settings (at start, and again on each reload).

`mptun server` (mptun/commands/server.py) maps its options onto `ServerSettings`, runs
`Server(server_config(settings))` and, on SIGHUP, hands `Server.reload` a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mptun.common.address import Address
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name
from mptun.common.errors import ConfigError
from mptun.common.relay import RelaySettings
from mptun.common.replay import DEFAULT_CAPACITY, DEFAULT_WINDOW
from mptun.server.admission import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE
from mptun.server.policy import TargetPolicy, parse_cidrs
from mptun.server.resolver import MAX_NAMESERVERS
from mptun.server.service import Server, ServerConfig
from mptun.server.udp import DEFAULT_IDLE_TIMEOUT, Filter

if TYPE_CHECKING:
    from mptun.common.metrics_http import MetricsServer


@dataclass(frozen=True)
class ServerSettings:
    """Everything `mptun server` is told, as plain values; the defaults are the command's."""

    listen: Address
    psk: bytes = field(repr=False)
    cipher: str = DEFAULT_CIPHER
    allow_target: tuple[str, ...] = ()  # CIDRs
    allow_private: bool = False
    nameserver: tuple[Address, ...] = ()  # replaces /etc/resolv.conf's nameservers
    relay: RelaySettings = field(default_factory=RelaySettings)
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float | None = None
    max_connections: int | None = None  # None: not given (the default, lowered quietly)
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_handshakes_per_source: int = DEFAULT_MAX_HANDSHAKES_PER_SOURCE
    replay_window: float = DEFAULT_WINDOW
    replay_capacity: int = DEFAULT_CAPACITY
    replay_file: str | None = None
    stats_file: str | None = None
    drain_timeout: float = 10.0  # on SIGTERM
    log_connections: bool = False  # each connection's lines at info, not debug
    metrics: Address | None = None  # --metrics: Prometheus page (common/metrics_http.py)
    metrics_public: bool = False  # --metrics-public: a non-loopback --metrics address too
    udp_filter: Filter = Filter.ENDPOINT  # who may answer a UDP association (--udp-filter)
    udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds a UDP association may be idle


def server_config(s: ServerSettings) -> ServerConfig:
    """The `Server`'s configuration (raises ConfigError for a bad --allow-target)."""
    return ServerConfig(
        listen=s.listen,
        psk=s.psk,
        cipher=cipher_by_name(s.cipher),
        engine=s.relay.choose(),
        accept_plain=s.relay.plain,
        policy=TargetPolicy(allow=parse_cidrs(s.allow_target), allow_private=s.allow_private),
        mptcp=s.relay.mptcp,
        handshake_timeout=s.handshake_timeout,
        connect_timeout=s.connect_timeout,
        idle_timeout=s.idle_timeout,
        replay_window=s.replay_window,
        replay_capacity=s.replay_capacity,
        replay_file=Path(s.replay_file) if s.replay_file else None,
        max_connections=s.max_connections,
        max_handshakes=s.max_handshakes,
        max_handshakes_per_source=s.max_handshakes_per_source,
        nameservers=nameservers(s.nameserver),
        log_connections=s.log_connections,
        udp_filter=s.udp_filter,
        udp_idle_timeout=s.udp_idle_timeout,
    )


def nameservers(servers: tuple[Address, ...]) -> tuple[Address, ...]:
    """`--nameserver` values as given; ConfigError past glibc's three (MAXNS)."""
    if len(servers) > MAX_NAMESERVERS:
        raise ConfigError(f"nameserver: at most {MAX_NAMESERVERS}, got {len(servers)}")
    return servers


def build_metrics(s: ServerSettings, srv: Server) -> MetricsServer | None:
    """The `--metrics` endpoint of `srv` (None without); ConfigError for a public address
    without --metrics-public."""
    if s.metrics is None:
        return None
    # Here, not at the top: a server without --metrics never loads the endpoint.
    from mptun.common.metrics_http import MetricsServer, check_metrics_bind
    from mptun.server.metrics import server_metrics

    check_metrics_bind(s.metrics, s.metrics_public)
    return MetricsServer(s.metrics, server_metrics(srv), "server")


def metrics_restart(old: ServerSettings, new: ServerSettings) -> list[str]:
    """The metrics options a reload found changed: they need a restart (the endpoint stays)."""
    if (old.metrics, old.metrics_public) == (new.metrics, new.metrics_public):
        return []
    return ["metrics"]
