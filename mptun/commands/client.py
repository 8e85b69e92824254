"""`mptun client`: options -> ClientSettings -> tunneler and listeners -> run."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import click

from mptun.client.app import (
    DEFAULT_RATE_LIMIT,
    ClientSettings,
    DnsSettings,
    build_client,
    build_tunneler,
)
from mptun.client.control import wrap_service
from mptun.client.health import DEFAULT_HEALTH_FILE, HealthSettings
from mptun.client.pool import MAX_POOL
from mptun.client.servers import Policy, Server, WhenDown
from mptun.client.socks import ReplyPolicy, socks_credentials
from mptun.commands.options import (
    MAX_CONNECTIONS,
    FlightPrefix,
    ForwardPair,
    HostPort,
    ProgramLine,
    ReloadableCommand,
    ServerSpec,
    Text,
    bulk_option,
    cipher_option,
    coalesce_option,
    config_option,
    control_option,
    given,
    idle_timeout_option,
    key_options,
    log_connections_option,
    max_connections_option,
    metrics_options,
    option,
    relay_option,
    relay_settings,
    resolve_key,
    seconds,
    stats_option,
    timeout_option,
    transport_option,
    uci_option,
)
from mptun.common import runtime
from mptun.common.crypto import load_key_file
from mptun.common.errors import ConfigError, MptunError
from mptun.common.stats import StatsDump

log = logging.getLogger("mptun.client")


@click.command(cls=ReloadableCommand)
@config_option
@uci_option
@option(
    "server",
    type=ServerSpec(),
    multiple=True,
    required=True,
    help="The mptun server, HOST:PORT ([2001:db8::1]:8443 for IPv6). Repeat it for backup "
    "servers, in the order of preference; HOST:PORT,key-file=PATH gives a server its own key.",
)
@option(
    "server-policy",
    type=click.Choice([p.value for p in Policy]),
    default=Policy.FAILOVER.value,
    help="With several --server: failover uses the first that answers, in the order given; "
    "lowest-rtt the one with the lowest check round trip.",
)
@option(
    "server-check-interval",
    type=seconds(min=0.2),
    default=2.0,
    help="Seconds between two health checks of each server; a server that stops answering is "
    "skipped for new tunnels within about three of them.",
)
@option(
    "when-down",
    type=click.Choice([w.value for w in WhenDown]),
    default=WhenDown.REJECT.value,
    help="While every server is down: reject refuses new connections at once (SOCKS failure, "
    "reset, DNS SERVFAIL); direct connects them straight to their destination, untunnelled.",
)
@key_options
@option(
    "socks",
    type=HostPort(ip_only=True, any_port=True),
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
    help="Password for --socks-user (prefer --socks-password-file: the command line is "
    "visible to every local user).",
)
@option(
    "socks-password-file",
    type=click.Path(dir_okay=False),
    help="File holding the password for --socks-user (one line; mode 600, owned by root or "
    "the user running mptun, as the key file).",
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
    type=HostPort(ip_only=True, any_port=True),
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
    "tproxy-udp",
    type=HostPort(ip_only=True),
    help="Take the LAN's UDP that nftables `tproxy` hands here (see `mptun nft --udp-port`) "
    "through the tunnel, replies sent back from the address they came from; needs "
    "CAP_NET_ADMIN.",
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
    help="Answer DNS over UDP and TCP here, e.g. 127.0.0.1:5353, by asking --dns-upstream through "
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
@option(
    "dns-open",
    is_flag=True,
    default=False,
    help="Let --dns bind a wildcard ([::]) or public address; it then answers whoever reaches "
    "it, so the firewall must keep the WAN out.",
)
@option(
    "dns-rate-limit",
    type=click.IntRange(0, MAX_CONNECTIONS),
    default=DEFAULT_RATE_LIMIT,
    help="UDP DNS queries a second one address may send (bursts of twice that); more are "
    "dropped. Loopback is exempt; 0 turns it off.",
)
@cipher_option
@transport_option
@relay_option
@bulk_option
@coalesce_option
@option(
    "prefix",
    type=FlightPrefix(),
    help="Start every first flight with these bytes (at most 16; \\xHH escapes, e.g. "
    "'\\x16\\x03\\x01' or 'POST /') so it looks less like random bytes to classifiers that "
    "block fully encrypted traffic. The server needs no setting (docs/PROTOCOL.md).",
)
@option(
    "fast-open",
    is_flag=True,
    default=False,
    help="TCP Fast Open: once the kernel holds the server's cookie, the first flight rides the "
    "SYN (one round trip less); the server needs net.ipv4.tcp_fastopen=3 and Linux 6.2.",
)
@option(
    "pool",
    type=click.IntRange(0, MAX_POOL),
    default=0,
    help="Keep up to N tunnels connected ahead to the server, while in use (one round trip "
    "less; each is replaced every 8 s, docs/PROBING.md); 0: none.",
)
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
@option(
    "udp-per-host",
    type=click.IntRange(1, 65535),
    default=256,
    help="UDP associations (one per source port) one LAN host may have; datagrams from more "
    "source ports are dropped (and counted).",
)
@option(
    "udp-max",
    type=click.IntRange(1, 65535),
    default=2048,
    help="UDP associations in all; datagrams from more sources are dropped (and counted).",
)
@option(
    "udp-idle-timeout",
    type=seconds(min=1.0),
    default=300.0,
    help="Seconds a UDP association may stay idle before it ends (its tunnel closes).",
)
@option(
    "uplink",
    multiple=True,
    metavar="IFACE",
    help="Probe the server through this uplink (repeatable): a dead one gets no new subflows "
    "and no new tunnel's first subflow (docs/MULTIPATH.md, uplink health).",
)
@option(
    "uplink-check-interval",
    type=seconds(min=0.05),
    default=0.5,
    help="Seconds between two rounds of uplink probes.",
)
@option(
    "uplink-checks",
    type=click.IntRange(1, 20),
    default=3,
    help="Probes per uplink and round.",
)
@option(
    "uplink-dead-after",
    type=seconds(min=0.2),
    default=1.5,
    help="Seconds without an answer that make an uplink dead (each probe waits half of it).",
)
@option(
    "uplink-degraded-loss",
    type=click.IntRange(1, 100),
    default=20,
    help="Percent of probes lost (over 10 s) that make an uplink degraded.",
)
@option(
    "uplink-degraded-rtt-ms",
    type=click.IntRange(1, 60000),
    default=500,
    help="Median probe round trip (ms, over 10 s) that makes an uplink degraded.",
)
@option(
    "uplink-hold",
    type=seconds(),
    default=10.0,
    help="Seconds a degraded uplink must look good before it is up again (no flapping).",
)
@option(
    "uplink-hook",
    type=ProgramLine(),
    help="Run this program (no shell; 'PROGRAM ARGS...') with IFACE STATE added at each uplink "
    "health change (up, degraded, dead, mptcp-broken); it then owns the endpoints, not `mptun "
    "uplinks` (the OpenWrt service's shell withdraws and re-adds them).",
)
@option(
    "health-file",
    default=DEFAULT_HEALTH_FILE,
    help="Where the uplinks' health is written for `mptun uplinks`, which withdraws dead "
    "uplinks' endpoints ('' for nowhere).",
)
@stats_option
@log_connections_option
@control_option
@metrics_options
@option(
    "check",
    is_flag=True,
    default=False,
    help="Do one handshake with each server and exit: 0 ok, 3 unreachable, 4 no answer "
    "(key, cipher or clock wrong), 5 not an mptun server with this key.",
)
@click.pass_context
def client(ctx: click.Context, check: bool, **_: object) -> None:
    """Run the tunnel client (the router end). SIGHUP reloads config and key; SIGUSR1 dumps
    stats."""
    settings = client_settings(ctx)
    tunneler = build_tunneler(settings)
    if check:
        from mptun.client.check import run_check  # `--check` only, not the service

        # every server in turn; the status is the first failure's (0 when all pass)
        status = 0
        for server in (Server(settings.server, settings.psk), *settings.more_servers):
            one = replace(settings, server=server.address, psk=server.psk, more_servers=())
            result = asyncio.run(run_check(build_tunneler(one), settings.handshake_timeout))
            click.echo(f"mptun: check: {result.message}", err=result.result != 0)
            status = status or int(result.result)
        ctx.exit(status)
    built = build_client(settings, tunneler)
    start, stop = wrap_service(settings.control, built.app.start, built.app.stop, built.status)
    if built.metrics is not None:
        from mptun.common.metrics_http import serve_metrics  # only with --metrics

        start, stop = serve_metrics(built.metrics, start, stop)

    def reload() -> None:
        nonlocal settings
        # Here, not at the top: the reload code is not needed until the first SIGHUP.
        from mptun.client.reload import reload_client

        try:
            with ctx.command.reparse(ctx) as new:  # type: ignore[attr-defined]
                settings = reload_client(built.app, tunneler, settings, client_settings(new))
        except (MptunError, click.ClickException) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            log.error("reload failed, keeping the running configuration: %s", msg)

    dump = StatsDump(settings.stats_file, built.app.snapshot)
    runtime.run(start, stop, reload=reload, dump=dump)


def client_settings(ctx: click.Context) -> ClientSettings:
    """The settings of the parsed options; checks the options that go in pairs, reads the key."""
    p = ctx.params
    credentials = socks_credentials(p["socks_user"], p["socks_password"], p["socks_password_file"])
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
            allow_open=p["dns_open"],
            rate_limit=p["dns_rate_limit"],
        )
    servers = client_servers(ctx)
    uplinks, health = uplink_health_settings(p)
    return ClientSettings(
        server=servers[0].address,
        psk=servers[0].psk,
        more_servers=tuple(servers[1:]),
        server_policy=Policy(p["server_policy"]),
        server_check_interval=p["server_check_interval"],
        when_down=WhenDown(p["when_down"]),
        socks=p["socks"],
        credentials=credentials,
        reply=ReplyPolicy(p["reply"]),
        redir=p["redir"],
        tproxy=p["tproxy"],
        tproxy_udp=p["tproxy_udp"],
        forward=tuple(p["forward"]),
        dns=dns,
        cipher=p["cipher"],
        relay=relay_settings(p),
        connect_timeout=p["connect_timeout"],
        handshake_timeout=p["handshake_timeout"],
        idle_timeout=p["idle_timeout"] or None,
        max_connections=p["max_connections"] if given(ctx, "max_connections") else None,
        socks_per_client=p["socks_per_client"],
        udp_per_host=p["udp_per_host"],
        udp_max=p["udp_max"],
        udp_idle_timeout=p["udp_idle_timeout"],
        stats_file=p["stats_file"],
        control=p["control"],
        prefix=p["prefix"] or b"",
        fast_open=p["fast_open"],
        pool=p["pool"],
        log_connections=p["log_connections"],
        uplinks=uplinks,
        health=health,
        health_file=p["health_file"] or None,
        metrics=p["metrics"],
        metrics_public=p["metrics_public"],
        uplink_hook=p["uplink_hook"] or (),
    )


def uplink_health_settings(p: dict) -> tuple[tuple[str, ...], HealthSettings]:
    """The --uplink interfaces and the thresholds of their health checks."""
    uplinks = tuple(dict.fromkeys(p["uplink"]))
    interval, dead_after = p["uplink_check_interval"], p["uplink_dead_after"]
    if uplinks and dead_after < 2 * interval:
        raise ConfigError(
            f"--uplink-dead-after {dead_after:g} must be at least twice --uplink-check-interval "
            f"({interval:g}): an uplink is dead only after two rounds without an answer"
        )
    if p["uplink_hook"] and not uplinks:
        raise ConfigError("--uplink-hook needs --uplink (the uplinks whose health it is told)")
    health = HealthSettings(
        interval=interval,
        checks=p["uplink_checks"],
        dead_after=dead_after,
        degraded_loss=p["uplink_degraded_loss"] / 100,
        degraded_rtt=p["uplink_degraded_rtt_ms"] / 1000,
        hold=p["uplink_hold"],
    )
    return uplinks, health


def client_servers(ctx: click.Context) -> list[Server]:
    """The --server list with each server's key: its own key-file=, else the common key."""
    common: bytes | None = None
    servers: list[Server] = []
    seen: set[str] = set()
    for address, key_file in ctx.params["server"]:
        if str(address) in seen:
            raise ConfigError(f"--server {address} is given twice")
        seen.add(str(address))
        if key_file is not None:
            psk = load_key_file(key_file)
        else:
            if common is None:
                common = resolve_key(ctx, ctx.params["key_file"])
            psk = common
        servers.append(Server(address, psk))
    return servers
