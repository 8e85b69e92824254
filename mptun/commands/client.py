"""`mptun client`: options -> ClientSettings -> tunneler and listeners -> run."""

from __future__ import annotations

import asyncio

import click

from mptun.client.app import ClientSettings, DnsSettings, build_client, build_tunneler
from mptun.client.check import run_check
from mptun.client.control import wrap_service
from mptun.client.socks import ReplyPolicy
from mptun.commands.options import (
    MAX_CONNECTIONS,
    ForwardPair,
    HostPort,
    Text,
    bulk_option,
    cipher_option,
    coalesce_option,
    config_option,
    control_option,
    idle_timeout_option,
    key_options,
    max_connections_option,
    option,
    relay_option,
    relay_settings,
    resolve_key,
    stats_option,
    timeout_option,
    transport_option,
    uci_option,
)
from mptun.common import runtime
from mptun.common.errors import ConfigError
from mptun.common.stats import StatsDump


@click.command()
@config_option
@uci_option
@option(
    "server",
    type=HostPort(),
    required=True,
    help="The mptun server, HOST:PORT ([2001:db8::1]:8443 for IPv6).",
)
@key_options
@option(
    "socks",
    type=HostPort(ip_only=True),
    help="Accept SOCKS5 clients here, e.g. 127.0.0.1:1080 (keep it on loopback or the LAN).",
)
@option(
    "socks-user",
    type=Text(1, 255, "RFC 1929"),
    help="Require RFC 1929 username/password auth with this user (with --socks-password).",
)
@option(
    "socks-password",
    type=Text(1, 255, "RFC 1929"),
    help="Password for --socks-user (prefer the MPTUN_SOCKS_PASSWORD variable or the config).",
)
@option(
    "reply",
    type=click.Choice([p.value for p in ReplyPolicy]),
    default=ReplyPolicy.OPTIMISTIC.value,
    help="optimistic: answer SOCKS at once and send the first bytes with the handshake; "
    "verified: wait for the server's connect status and report it.",
)
@option(
    "redir",
    type=HostPort(ip_only=True),
    help="Accept connections nftables `redirect` sends here (see `mptun nft`), e.g. [::]:1234 "
    "for IPv4 and IPv6; the original destination comes from conntrack.",
)
@option(
    "tproxy",
    type=HostPort(ip_only=True),
    help="Accept connections nftables `tproxy` hands here (see `mptun nft --mode tproxy`); "
    "needs CAP_NET_ADMIN.",
)
@option(
    "forward",
    type=ForwardPair(),
    multiple=True,
    help="LOCAL_HOST:PORT=TARGET_HOST:PORT: tunnel every connection to LOCAL to TARGET, like "
    "ss-tunnel (repeatable).",
)
@option(
    "dns",
    type=HostPort(ip_only=True),
    help="Answer DNS over UDP and TCP here, e.g. [::]:5353, by asking --dns-upstream through "
    "the tunnel (DNS over TCP).",
)
@option(
    "dns-upstream",
    type=HostPort(default_port=53),
    help="The resolver the VPS asks for --dns, HOST[:PORT] (port 53 by default), e.g. 9.9.9.9.",
)
@option(
    "dns-cache",
    type=click.IntRange(0, MAX_CONNECTIONS),
    default=1024,
    help="Answers the DNS cache keeps (each for its TTL, at most an hour); 0 turns it off.",
)
@option(
    "dns-max-inflight",
    type=click.IntRange(1, 65535),
    default=64,
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
@idle_timeout_option
@max_connections_option("Concurrent connections per listener; at the limit it stops accepting.")
@option(
    "socks-per-client",
    type=click.IntRange(1, MAX_CONNECTIONS),
    default=256,
    help="Concurrent SOCKS connections one LAN address may hold; more are reset (and counted).",
)
@stats_option
@control_option
@option(
    "check",
    is_flag=True,
    default=False,
    help="Do one handshake with the server and exit: 0 ok, 3 unreachable, 4 no answer "
    "(key, cipher or clock wrong), 5 not an mptun server with this key.",
)
@click.pass_context
def client(ctx: click.Context, check: bool, **_: object) -> None:
    """Run the tunnel client (the router end)."""
    settings = client_settings(ctx)
    tunneler = build_tunneler(settings)
    if check:
        result = asyncio.run(run_check(tunneler, settings.handshake_timeout))
        click.echo(f"mptun: check: {result.message}", err=result.result != 0)
        ctx.exit(int(result.result))
    built = build_client(settings, tunneler)
    start, stop = wrap_service(settings.control, built.app.start, built.app.stop, built.status)
    runtime.run(start, stop, dump=StatsDump(settings.stats_file, built.app.snapshot))


def client_settings(ctx: click.Context) -> ClientSettings:
    """The settings of the parsed options; checks the options that go in pairs, reads the key."""
    p = ctx.params
    if (p["socks_user"] is None) != (p["socks_password"] is None):
        raise ConfigError("--socks-user and --socks-password go together")
    dns = None
    if p["dns"] is not None:
        if p["dns_upstream"] is None:
            raise ConfigError("--dns needs --dns-upstream (the resolver to ask through the tunnel)")
        dns = DnsSettings(
            listen=p["dns"],
            upstream=p["dns_upstream"],
            cache=p["dns_cache"],
            max_inflight=p["dns_max_inflight"],
            timeout=p["dns_timeout"],
        )
    return ClientSettings(
        server=p["server"],
        psk=resolve_key(ctx, p["key_file"]),
        socks=p["socks"],
        credentials=(p["socks_user"], p["socks_password"]) if p["socks_user"] is not None else None,
        reply=ReplyPolicy(p["reply"]),
        redir=p["redir"],
        tproxy=p["tproxy"],
        forward=tuple(p["forward"]),
        dns=dns,
        cipher=p["cipher"],
        relay=relay_settings(p),
        connect_timeout=p["connect_timeout"],
        handshake_timeout=p["handshake_timeout"],
        idle_timeout=p["idle_timeout"] or None,
        max_connections=p["max_connections"],
        socks_per_client=p["socks_per_client"],
        stats_file=p["stats_file"],
        control=p["control"],
    )
