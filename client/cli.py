"""`mptun client`: options -> Dialer + listeners -> run."""

from __future__ import annotations

import asyncio
import os

import click

from mptun.client.check import run_check
from mptun.client.control import control_option, tunnels_snapshot, wrap_service
from mptun.client.dns import DnsForwarder, DnsTcpHandler, DnsUdpServer, TunnelExchange
from mptun.client.dnscache import DnsCache
from mptun.client.redirect import gateway_listeners
from mptun.client.service import Client, ListenerSpec
from mptun.client.socks import ReplyPolicy, SocksListener
from mptun.client.tunnel import Dialer, TunnelConfig
from mptun.common import runtime
from mptun.common.crypto import cipher_by_name
from mptun.common.errors import ConfigError
from mptun.common.handshake import WireMode
from mptun.common.relay import Coalescing, choose_bulk, choose_engine
from mptun.common.stats import StatsDump
from mptun.options import (
    MAX_CONNECTIONS,
    ForwardPair,
    HostPort,
    Text,
    bulk_option,
    cipher_option,
    coalesce_option,
    config_option,
    env,
    key_options,
    relay_option,
    resolve_key,
    seconds,
    stats_option,
    timeout_option,
    transport_option,
    uci_option,
)


@click.command()
@config_option
@uci_option
@click.option(
    "--server",
    type=HostPort(),
    required=True,
    envvar=env("server"),
    help="The mptun server, HOST:PORT ([2001:db8::1]:8443 for IPv6).",
)
@key_options
@click.option(
    "--socks",
    type=HostPort(ip_only=True),
    envvar=env("socks"),
    help="Accept SOCKS5 clients here, e.g. 127.0.0.1:1080 (keep it on loopback or the LAN).",
)
@click.option(
    "--socks-user",
    type=Text(1, 255, "RFC 1929"),
    envvar=env("socks-user"),
    help="Require RFC 1929 username/password auth with this user (with --socks-password).",
)
@click.option(
    "--socks-password",
    type=Text(1, 255, "RFC 1929"),
    envvar=env("socks-password"),
    help="Password for --socks-user (prefer the MPTUN_SOCKS_PASSWORD variable or the config).",
)
@click.option(
    "--reply",
    type=click.Choice([p.value for p in ReplyPolicy]),
    default=ReplyPolicy.OPTIMISTIC.value,
    show_default=True,
    envvar=env("reply"),
    help="optimistic: answer SOCKS at once and send the first bytes with the handshake; "
    "verified: wait for the server's connect status and report it.",
)
@click.option(
    "--redir",
    type=HostPort(ip_only=True),
    envvar=env("redir"),
    help="Accept connections nftables `redirect` sends here (see `mptun nft`), e.g. [::]:1234 "
    "for IPv4 and IPv6; the original destination comes from conntrack.",
)
@click.option(
    "--tproxy",
    type=HostPort(ip_only=True),
    envvar=env("tproxy"),
    help="Accept connections nftables `tproxy` hands here (see `mptun nft --mode tproxy`); "
    "needs CAP_NET_ADMIN.",
)
@click.option(
    "--forward",
    type=ForwardPair(),
    multiple=True,
    envvar=env("forward"),
    help="LOCAL_HOST:PORT=TARGET_HOST:PORT: tunnel every connection to LOCAL to TARGET, like "
    "ss-tunnel (repeatable).",
)
@click.option(
    "--dns",
    type=HostPort(ip_only=True),
    envvar=env("dns"),
    help="Answer DNS over UDP and TCP here, e.g. [::]:5353, by asking --dns-upstream through "
    "the tunnel (DNS over TCP).",
)
@click.option(
    "--dns-upstream",
    type=HostPort(default_port=53),
    envvar=env("dns-upstream"),
    help="The resolver the VPS asks for --dns, HOST[:PORT] (port 53 by default), e.g. 9.9.9.9.",
)
@click.option(
    "--dns-cache",
    type=click.IntRange(0, MAX_CONNECTIONS),
    default=1024,
    show_default=True,
    envvar=env("dns-cache"),
    help="Answers the DNS cache keeps (each for its TTL, at most an hour); 0 turns it off.",
)
@click.option(
    "--dns-max-inflight",
    type=click.IntRange(1, 65535),
    default=64,
    show_default=True,
    envvar=env("dns-max-inflight"),
    help="Tunnel connections open for DNS at once; more queries wait (up to 512, then SERVFAIL).",
)
@timeout_option("dns-timeout", 5.0, "Seconds for an upstream DNS answer before SERVFAIL.")
@cipher_option
@transport_option
@relay_option
@bulk_option
@coalesce_option
@timeout_option("connect-timeout", 10.0, "Seconds to connect to the server.")
@timeout_option(
    "handshake-timeout", 15.0, "Seconds for the server's answer (includes its connect)."
)
@click.option(
    "--idle-timeout",
    type=seconds(),
    default=0,
    show_default=True,
    envvar=env("idle-timeout"),
    help="Reset a relayed connection after this many seconds without traffic (0: never).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, MAX_CONNECTIONS),
    default=4096,
    show_default=True,
    envvar=env("max-connections"),
    help="Concurrent connections per listener; at the limit it stops accepting.",
)
@click.option(
    "--socks-per-client",
    type=click.IntRange(1, MAX_CONNECTIONS),
    default=256,
    show_default=True,
    envvar=env("socks-per-client"),
    help="Concurrent SOCKS connections one LAN address may hold; more are reset (and counted).",
)
@stats_option
@control_option
@click.option(
    "--check",
    is_flag=True,
    default=False,
    envvar=env("check"),
    help="Do one handshake with the server and exit: 0 ok, 3 unreachable, 4 no answer "
    "(key, cipher or clock wrong), 5 not an mptun server with this key.",
)
@click.pass_context
def client(
    ctx: click.Context,
    server,
    key_file,
    socks,
    socks_user,
    socks_password,
    reply,
    redir,
    tproxy,
    forward,
    dns,
    dns_upstream,
    dns_cache,
    dns_max_inflight,
    dns_timeout,
    cipher,
    transport,
    relay,
    bulk,
    coalesce_ms,
    connect_timeout,
    handshake_timeout,
    idle_timeout,
    max_connections,
    socks_per_client,
    stats_file,
    control,
    check,
) -> None:
    """Run the tunnel client (the router end)."""
    if (socks_user is None) != (socks_password is None):
        raise ConfigError("--socks-user and --socks-password go together")
    credentials = (socks_user, socks_password) if socks_user is not None else None
    if dns is not None and dns_upstream is None:
        raise ConfigError("--dns needs --dns-upstream (the resolver to ask through the tunnel)")
    coalescing = Coalescing(delay=coalesce_ms / 1000)
    dialer = Dialer(
        TunnelConfig(
            server=server,
            psk=resolve_key(ctx, key_file),
            cipher=cipher_by_name(cipher),
            engine=choose_bulk(
                bulk,
                choose_engine(relay, coalescing),
                mptcp=transport == "mptcp",
                coalescing=coalescing,
            ),
            mptcp=transport == "mptcp",
            mode=WireMode.PLAIN if bulk == "plain" else WireMode.ENCRYPTED,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout or None,
        )
    )
    if check:
        result = asyncio.run(run_check(dialer, handshake_timeout))
        click.echo(f"mptun: check: {result.message}", err=result.result != 0)
        ctx.exit(int(result.result))
    listeners = []
    if socks is not None:
        check_socks_bind(socks, credentials is not None)
        handler = SocksListener(
            dialer, ReplyPolicy(reply), credentials, per_client=socks_per_client
        )
        listeners.append(ListenerSpec(socks, handler))
    listeners += gateway_listeners(dialer, redir, tproxy, forward)
    services = []
    if dns is not None:
        forwarder = DnsForwarder(
            TunnelExchange(dialer, dns_upstream),
            DnsCache(max_entries=dns_cache),
            max_inflight=dns_max_inflight,
            timeout=dns_timeout,
            counters=dialer.counters,
        )
        listeners.append(ListenerSpec(dns, DnsTcpHandler(forwarder)))
        services.append(DnsUdpServer(dns, forwarder))
    app = Client(dialer, listeners, max_connections, services)

    def status() -> dict:
        return {
            **app.snapshot(),
            "pid": os.getpid(),
            "server": str(server),
            "transport": transport,
            "listeners": [str(a) for a in app.addresses],
            "connections": tunnels_snapshot(dialer),
        }

    start, stop = wrap_service(control, app.start, app.stop, status)
    runtime.run(start, stop, dump=StatsDump(stats_file, app.snapshot))


def check_socks_bind(bind, has_auth: bool) -> None:
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
