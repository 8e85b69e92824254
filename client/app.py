"""The client from plain settings: the tunneler, the listeners, the DNS forwarder, the app.

`mptun client` (mptun/commands/client.py) maps its options onto `ClientSettings` and runs what
`build_tunneler` and `build_client` return; anything else embedding the client does the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mptun.client.control import tunnels_snapshot
from mptun.client.dns import (
    DEFAULT_RATE_LIMIT,
    DnsForwarder,
    DnsTcpHandler,
    DnsUdpServer,
    SourceRateLimit,
    TunnelExchange,
    check_dns_bind,
)
from mptun.client.dnscache import DnsCache
from mptun.client.health import DEFAULT_HEALTH_FILE, HealthMonitor, HealthSettings
from mptun.client.redirect import gateway_listeners
from mptun.client.servers import Policy, Server, WhenDown
from mptun.client.service import Client, ListenerSpec, Service
from mptun.client.socks import Reach, ReplyPolicy, SocksListener, bind_reach
from mptun.client.tunnel import TunnelConfig, Tunneler
from mptun.common.address import Address
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name
from mptun.common.errors import ConfigError
from mptun.common.handshake import WireMode
from mptun.common.relay import RelaySettings


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
    forward: tuple[tuple[Address, Address], ...] = ()
    dns: DnsSettings | None = None
    cipher: str = DEFAULT_CIPHER
    relay: RelaySettings = field(default_factory=RelaySettings)
    connect_timeout: float = 10.0
    handshake_timeout: float = 15.0
    idle_timeout: float | None = None
    max_connections: int | None = None  # None: not given (the default, lowered quietly)
    socks_per_client: int = 256
    stats_file: str | None = None
    control: str = "auto"  # auto, @NAME, a path, none
    prefix: bytes = b""  # first bytes of every first flight (`parse_prefix` of --prefix)
    log_connections: bool = False  # each connection's lines at info, not debug
    uplinks: tuple[str, ...] = ()  # uplink interfaces whose health is probed (--uplink)
    health: HealthSettings = field(default_factory=HealthSettings)
    health_file: str | None = DEFAULT_HEALTH_FILE  # read by `mptun uplinks`; None: not written


@dataclass(frozen=True)
class BuiltClient:
    app: Client
    status: Callable[[], dict]  # the control socket's answer


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
    )


def build_client(s: ClientSettings, tunneler: Tunneler) -> BuiltClient:
    """The listeners and services of the settings around `tunneler`, and the client's status."""
    listeners = []
    if s.socks is not None:
        check_socks_bind(s.socks, s.credentials is not None)
        handler = SocksListener(tunneler, s.reply, s.credentials, per_client=s.socks_per_client)
        listeners.append(ListenerSpec(s.socks, handler))
    listeners += gateway_listeners(tunneler, s.redir, s.tproxy, s.forward)
    services: list[Service] = []
    if s.dns is not None:
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
    app = Client(tunneler, listeners, s.max_connections, services)
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
            "uplink_health": health.snapshot() if health is not None else [],
        }

    return BuiltClient(app, status)


def uplink_health(s: ClientSettings, tunneler: Tunneler) -> HealthMonitor | None:
    """The uplink health monitor of `--uplink` (None without): probes the server the tunnels
    go to, and steers new tunnels' first subflow through the tunneler's `uplinks` hook."""
    if not s.uplinks:
        return None

    def psk() -> bytes:
        now = tunneler.preferred
        return next((sv.psk for sv in tunneler.servers.servers if sv.address == now), s.psk)

    monitor = HealthMonitor(
        list(s.uplinks),
        lambda: tunneler.preferred,
        psk,
        cipher_by_name(s.cipher),
        s.health,
        s.health_file,
        s.prefix,
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
