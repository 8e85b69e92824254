"""The client from plain settings: the tunneler, the listeners, the DNS forwarder, the app.

`mptun client` (mptun/commands/client.py) maps its options onto `ClientSettings` and runs what
`build_tunneler` and `build_client` return; anything else embedding the client does the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mptun.client.control import tunnels_snapshot
from mptun.client.health import DEFAULT_HEALTH_FILE, HealthMonitor, HealthSettings
from mptun.client.servers import Policy, Server, WhenDown
from mptun.client.service import Client, ListenerSpec, Service
from mptun.client.socks import Reach, ReplyPolicy, SocksListener, bind_reach
from mptun.client.tunnel import TunnelConfig, Tunneler
from mptun.client.udp import UdpTunnels
from mptun.common.address import Address
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name
from mptun.common.errors import ConfigError
from mptun.common.handshake import WireMode
from mptun.common.relay import RelaySettings

if TYPE_CHECKING:
    from mptun.common.metrics_http import MetricsServer

# The DNS forwarder, the gateway listeners, the UDP tproxy and the uplink hook are imported where
# their option is set, not here: a client without them never loads them (each is ~50-200 KiB of
# an idle router's memory; benchmarks/footprint.py, tests/test_footprint.py).

# UDP queries a second per source address (--dns-rate-limit); client/dns.py's own default,
# repeated so that DnsSettings needs no import of the forwarder (tests/test_footprint.py keeps
# the two equal).
DEFAULT_RATE_LIMIT = 50


@dataclass(frozen=True)
class DnsSettings:
    """Answer DNS at `listen` (UDP and TCP) by asking `upstream` through the tunnel."""

    listen: Address
    upstream: Address
    cache: int = 1024  # answers kept; 0: no cache
    max_inflight: int = 64
    timeout: float = 5.0
    allow_open: bool = False  # a wildcard or public `listen` (--dns-open)
    rate_limit: int = DEFAULT_RATE_LIMIT  # UDP queries a second per source but loopback; 0: off


@dataclass(frozen=True)
class ClientSettings:
    """Everything `mptun client` is told, as plain values; the defaults are the command's."""

    server: Address
    psk: bytes = field(repr=False)
    more_servers: tuple[Server, ...] = ()  # after `server`, in the order of preference
    server_policy: Policy = Policy.FAILOVER
    server_check_interval: float = 2.0
    when_down: WhenDown = WhenDown.REJECT
    socks: Address | None = None
    credentials: tuple[str, str] | None = None  # RFC 1929 user and password
    reply: ReplyPolicy = ReplyPolicy.OPTIMISTIC
    redir: Address | None = None
    tproxy: Address | None = None
    tproxy_udp: Address | None = None  # the LAN's UDP that nftables tproxy hands over
    forward: tuple[tuple[Address, Address], ...] = ()
    dns: DnsSettings | None = None
    cipher: str = DEFAULT_CIPHER
    relay: RelaySettings = field(default_factory=RelaySettings)
    connect_timeout: float = 10.0
    handshake_timeout: float = 15.0
    idle_timeout: float | None = None
    max_connections: int | None = None  # None: not given (the default, lowered quietly)
    socks_per_client: int = 256
    udp_per_host: int = 256  # UDP associations one LAN host may have (client/udp.py)
    udp_max: int = 2048  # UDP associations in all
    udp_idle_timeout: float = 300.0  # seconds a UDP association may be idle
    stats_file: str | None = None
    control: str = "auto"  # auto, @NAME, a path, none
    prefix: bytes = b""  # first bytes of every first flight (`parse_prefix` of --prefix)
    log_connections: bool = False  # each connection's lines at info, not debug
    fast_open: bool = False  # --fast-open: first flights in the SYN (client/fastopen.py)
    pool: int = 0  # --pool: tunnels connected ahead (client/pool.py)
    uplinks: tuple[str, ...] = ()  # uplink interfaces whose health is probed (--uplink)
    health: HealthSettings = field(default_factory=HealthSettings)
    health_file: str | None = DEFAULT_HEALTH_FILE  # read by `mptun uplinks`; None: not written
    # --uplink-hook: argv told `IFACE STATE` per health change (client/hook.py); () for none
    uplink_hook: tuple[str, ...] = ()
    metrics: Address | None = None  # --metrics: Prometheus page (common/metrics_http.py)
    metrics_public: bool = False  # --metrics-public: a non-loopback --metrics address too


@dataclass(frozen=True)
class BuiltClient:
    app: Client
    status: Callable[[], dict]  # the control socket's answer
    metrics: MetricsServer | None = None  # --metrics, started and stopped around the app


def build_tunneler(s: ClientSettings) -> Tunneler:
    """The one dial-handshake-relay path every listener uses (all `--check` needs)."""
    return Tunneler(tunnel_config(s))


def tunnel_config(s: ClientSettings) -> TunnelConfig:
    """The tunnel settings of `s` (at start, and on SIGHUP: client/reload.py)."""
    return TunnelConfig(
        server=s.server,
        psk=s.psk,
        cipher=cipher_by_name(s.cipher),
        engine=s.relay.choose(),
        mptcp=s.relay.mptcp,
        mode=WireMode.PLAIN if s.relay.plain else WireMode.ENCRYPTED,
        connect_timeout=s.connect_timeout,
        handshake_timeout=s.handshake_timeout,
        idle_timeout=s.idle_timeout,
        prefix=s.prefix,
        more_servers=s.more_servers,
        policy=s.server_policy,
        when_down=s.when_down,
        check_interval=s.server_check_interval,
        log_connections=s.log_connections,
        fast_open=s.fast_open,
        pool=s.pool,
    )


def build_client(s: ClientSettings, tunneler: Tunneler) -> BuiltClient:
    """The listeners and services of the settings around `tunneler`, and the client's status."""
    listeners = []
    udp_tunnels = UdpTunnels(
        tunneler, per_host=s.udp_per_host, total=s.udp_max, idle_timeout=s.udp_idle_timeout
    )
    if s.socks is not None:
        check_socks_bind(s.socks, s.credentials is not None)
        handler = SocksListener(
            tunneler, s.reply, s.credentials, per_client=s.socks_per_client, udp=udp_tunnels
        )
        listeners.append(ListenerSpec(s.socks, handler))
    if s.redir is not None or s.tproxy is not None or s.forward:
        from mptun.client.redirect import gateway_listeners

        listeners += gateway_listeners(tunneler, s.redir, s.tproxy, s.forward)
    services: list[Service] = []
    if s.dns is not None:
        from mptun.client.dns import (
            DnsForwarder,
            DnsTcpHandler,
            DnsUdpServer,
            SourceRateLimit,
            TunnelExchange,
            check_dns_bind,
        )
        from mptun.client.dnscache import DnsCache

        check_dns_bind(s.dns.listen, s.dns.allow_open)
        forwarder = DnsForwarder(
            TunnelExchange(tunneler, s.dns.upstream),
            DnsCache(max_entries=s.dns.cache),
            max_inflight=s.dns.max_inflight,
            timeout=s.dns.timeout,
            counters=tunneler.counters,
        )
        listeners.append(ListenerSpec(s.dns.listen, DnsTcpHandler(forwarder)))
        limit = SourceRateLimit(s.dns.rate_limit)
        services.append(DnsUdpServer(s.dns.listen, forwarder, rate_limit=limit))
    if s.tproxy_udp is not None:
        from mptun.client.tproxy import UdpTproxy

        # the client's one set of associations (caps, status); the app ends them when it stops
        services.append(UdpTproxy(s.tproxy_udp, udp_tunnels, tunneler.counters))
    app = Client(tunneler, listeners, s.max_connections, services)
    app.udp = udp_tunnels
    health = uplink_health(s, tunneler)
    if health is not None:
        app.background.append(health)

    def status() -> dict:
        return {
            **app.snapshot(),
            "pid": os.getpid(),
            "server": str(tunneler.preferred),
            "servers": tunneler.servers.snapshot(),
            "server_policy": s.server_policy.value,
            "when_down": s.when_down.value,
            "transport": s.relay.transport,
            "listeners": [str(a) for a in app.addresses],
            "connections": tunnels_snapshot(tunneler),
            "udp": udp_tunnels.snapshot(),
            "uplink_health": health.snapshot() if health is not None else [],
        }

    metrics = None
    if s.metrics is not None:
        # Here, not at the top: a client without --metrics never loads the endpoint.
        from mptun.client.metrics import client_metrics
        from mptun.common.metrics_http import MetricsServer, check_metrics_bind

        check_metrics_bind(s.metrics, s.metrics_public)
        collect = client_metrics(app, tunneler, health, lambda: len(udp_tunnels))
        metrics = MetricsServer(s.metrics, collect, "client")
    return BuiltClient(app, status, metrics)


def uplink_health(s: ClientSettings, tunneler: Tunneler) -> HealthMonitor | None:
    """The uplink health monitor of `--uplink` (None without): probes the server the tunnels
    go to, and steers new tunnels' first subflow through the tunneler's `uplinks` hook."""
    if not s.uplinks:
        return None

    def psk() -> bytes:
        now = tunneler.preferred
        return next((sv.psk for sv in tunneler.servers.servers if sv.address == now), s.psk)

    hook = None
    if s.uplink_hook:
        from mptun.client.hook import UplinkHook

        hook = UplinkHook(s.uplink_hook)
    monitor = HealthMonitor(
        list(s.uplinks),
        lambda: tunneler.preferred,
        psk,
        cipher_by_name(s.cipher),
        s.health,
        s.health_file,
        s.prefix,
        hook=hook,
    )
    tunneler.uplinks = monitor
    # The servers' own checks leave through a fit uplink too: through a dead default uplink
    # they would call a reachable server down.
    tunneler.monitor.source = monitor.server_source
    return monitor


def check_socks_bind(bind: Address, has_auth: bool) -> None:
    """Refuse a SOCKS listener reachable from the internet without auth (an open proxy).

    Loopback, private and link-local addresses are the LAN; the wildcard and public addresses
    need --socks-user/--socks-password.
    """
    reach = bind_reach(bind.host)
    if has_auth or reach in (Reach.LOOPBACK, Reach.LAN):
        return
    raise ConfigError(
        f"--socks {bind}: without --socks-user/--socks-password the SOCKS listener binds only "
        "to loopback or a LAN address (e.g. 127.0.0.1:1080 or the router's LAN IP); "
        f"{'all addresses' if reach is Reach.EVERYWHERE else 'a public address'} would make "
        "an open proxy"
    )
