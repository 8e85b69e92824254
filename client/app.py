"""The client from plain settings: the tunneler, the listeners, the DNS forwarder, the app.

`mptun client` (mptun/commands/client.py) maps its options onto `ClientSettings` and runs what
`build_tunneler` and `build_client` return; anything else embedding the client does the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mptun.client.control import tunnels_snapshot
from mptun.client.dns import DnsForwarder, DnsTcpHandler, DnsUdpServer, TunnelExchange
from mptun.client.dnscache import DnsCache
from mptun.client.redirect import gateway_listeners
from mptun.client.service import Client, ListenerSpec, Service
from mptun.client.socks import ReplyPolicy, SocksListener
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


@dataclass(frozen=True)
class ClientSettings:
    """Everything `mptun client` is told, as plain values; the defaults are the command's."""

    server: Address
    psk: bytes = field(repr=False)
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
    max_connections: int = 4096
    socks_per_client: int = 256
    stats_file: str | None = None
    control: str = "auto"  # auto, @NAME, a path, none


@dataclass(frozen=True)
class BuiltClient:
    app: Client
    status: Callable[[], dict]  # the control socket's answer


def build_tunneler(s: ClientSettings) -> Tunneler:
    """The one dial-handshake-relay path every listener uses (all `--check` needs)."""
    return Tunneler(
        TunnelConfig(
            server=s.server,
            psk=s.psk,
            cipher=cipher_by_name(s.cipher),
            engine=s.relay.choose(),
            mptcp=s.relay.mptcp,
            mode=WireMode.PLAIN if s.relay.plain else WireMode.ENCRYPTED,
            connect_timeout=s.connect_timeout,
            handshake_timeout=s.handshake_timeout,
            idle_timeout=s.idle_timeout,
        )
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
        forwarder = DnsForwarder(
            TunnelExchange(tunneler, s.dns.upstream),
            DnsCache(max_entries=s.dns.cache),
            max_inflight=s.dns.max_inflight,
            timeout=s.dns.timeout,
            counters=tunneler.counters,
        )
        listeners.append(ListenerSpec(s.dns.listen, DnsTcpHandler(forwarder)))
        services.append(DnsUdpServer(s.dns.listen, forwarder))
    app = Client(tunneler, listeners, s.max_connections, services)

    def status() -> dict:
        return {
            **app.snapshot(),
            "pid": os.getpid(),
            "server": str(s.server),
            "transport": s.relay.transport,
            "listeners": [str(a) for a in app.addresses],
            "connections": tunnels_snapshot(tunneler),
        }

    return BuiltClient(app, status)


def check_socks_bind(bind: Address, has_auth: bool) -> None:
    """Refuse a SOCKS listener reachable from the internet without auth (an open proxy).

    Loopback, private and link-local addresses are the LAN; the wildcard and public addresses
    need --socks-user/--socks-password.
    """
    ip = bind.host
    if (
        has_auth
        or ip.is_loopback
        or ((ip.is_private or ip.is_link_local) and not ip.is_unspecified)
    ):
        return
    raise ConfigError(
        f"--socks {bind}: without --socks-user/--socks-password the SOCKS listener binds only "
        "to loopback or a LAN address (e.g. 127.0.0.1:1080 or the router's LAN IP); "
        f"{'all addresses' if ip.is_unspecified else 'a public address'} would make an open proxy"
    )
