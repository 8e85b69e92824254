"""`mptun server`: options -> ServerSettings -> Server -> run (and on SIGHUP, reload)."""

from __future__ import annotations

import logging
from typing import Any

import click

from mptun.commands.options import (
    HostPort,
    OutputFile,
    ReloadableCommand,
    bulk_option,
    cipher_option,
    coalesce_option,
    config_option,
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
)
from mptun.common import runtime
from mptun.common.address import Address
from mptun.common.errors import MptunError
from mptun.common.replay import DEFAULT_CAPACITY, DEFAULT_WINDOW
from mptun.common.stats import StatsDump
from mptun.server.admission import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE
from mptun.server.app import ServerSettings, build_metrics, metrics_restart, server_config
from mptun.server.service import Server
from mptun.server.udp import DEFAULT_IDLE_TIMEOUT, Filter

log = logging.getLogger("mptun.server")
# ~200 bytes a salt (common/replay.py): 10 million is ~2 GB, more than a VPS should give it.
MAX_REPLAY_CAPACITY = 10_000_000
MAX_HANDSHAKES = 1_000_000


class NameserverAddress(HostPort):
    """IP[:PORT] of a DNS server, port 53 by default: an address, since a name would need one."""

    name = "ip[:port]"

    def __init__(self) -> None:
        super().__init__(default_port=53)

    def convert(self, value: Any, param, ctx) -> Address:
        addr = super().convert(value, param, ctx)
        if addr.is_domain:
            self.fail(f"{value!r}: give the DNS server's IP address, e.g. 192.0.2.53", param, ctx)
        return addr


@click.command(cls=ReloadableCommand)
@config_option
@option(
    "listen",
    type=HostPort(ip_only=True, any_port=True),
    required=True,
    help="Address to accept tunnels on, e.g. 0.0.0.0:8443 or [::]:8443 (both families).",
)
@key_options
@cipher_option
@option(
    "allow-target",
    multiple=True,
    help="CIDR the server may connect to even though the default policy refuses it (repeatable).",
)
@option(
    "allow-private",
    is_flag=True,
    default=False,
    help="Allow every target: loopback, private, link-local, the server's own addresses.",
)
@option(
    "nameserver",
    multiple=True,
    type=NameserverAddress(),
    help="DNS server for target names, IP[:PORT] (repeatable, at most 3); "
    "default: those of /etc/resolv.conf.",
)
@transport_option
@relay_option
@bulk_option
@coalesce_option
@timeout_option("handshake-timeout", 10.0, "Seconds from accept to a complete first flight.")
@timeout_option("connect-timeout", 10.0, "Seconds to resolve and connect to a target.")
@idle_timeout_option
@max_connections_option("Concurrent connections; at the limit the server stops accepting.")
@option(
    "max-handshakes",
    type=click.IntRange(1, MAX_HANDSHAKES),
    default=DEFAULT_MAX_HANDSHAKES,
    help="Unauthenticated connections held at once (at most half of --max-connections); "
    "beyond it the oldest is closed.",
)
@option(
    "max-handshakes-per-source",
    type=click.IntRange(1, MAX_HANDSHAKES),
    default=DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
    help="Unauthenticated connections held at once per IPv4 address or IPv6 /64; beyond it "
    "that source's oldest is closed.",
)
@option(
    "replay-window",
    type=seconds(min=1),
    default=DEFAULT_WINDOW,
    help="Seconds a client's clock may differ from the server's.",
)
@option(
    "replay-capacity",
    type=click.IntRange(1, MAX_REPLAY_CAPACITY),
    default=DEFAULT_CAPACITY,
    help="Salts the replay cache holds (~90 bytes each; one source at most a quarter); when "
    "full, new tunnels are refused.",
)
@option(
    "replay-file",
    type=OutputFile(),
    help="Save the replay cache here on stop and restore it on start (survives restarts).",
)
@option(
    "udp-filter",
    type=click.Choice([f.value for f in Filter]),
    default=Filter.ENDPOINT.value,
    help="Who may send to a UDP association's address and port: 'endpoint' anyone "
    "(endpoint-independent filtering), 'address' only addresses it sent to.",
)
@option(
    "udp-idle-timeout",
    type=seconds(min=1.0),
    default=DEFAULT_IDLE_TIMEOUT,
    help="Seconds a UDP association (its address and port) may stay idle before it ends.",
)
@stats_option
@log_connections_option
@metrics_options
@timeout_option("drain-timeout", 10.0, "On SIGTERM, seconds open connections may take to end.")
@click.pass_context
def server(ctx: click.Context, **_: object) -> None:
    """Run the tunnel server (the VPS end). SIGHUP reloads config and key; SIGUSR1 dumps stats."""
    settings = server_settings(ctx)
    srv = Server(server_config(settings))
    metrics = build_metrics(settings, srv)

    def reload() -> None:
        try:
            with ctx.command.reparse(ctx) as new:  # type: ignore[attr-defined]
                fresh = server_settings(new)
                config = server_config(fresh)
        except (MptunError, click.ClickException) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            log.error("reload failed, keeping the running configuration: %s", msg)
            return
        srv.reload(config, tuple(metrics_restart(settings, fresh)))

    dump = StatsDump(settings.stats_file, srv.snapshot)
    start, stop = srv.start, srv.stop
    if metrics is not None:
        from mptun.common.metrics_http import serve_metrics  # only with --metrics

        start, stop = serve_metrics(metrics, srv.start, srv.stop)
    runtime.run(start, stop, settings.drain_timeout, reload=reload, dump=dump)


def server_settings(ctx: click.Context) -> ServerSettings:
    """The settings of a parsed context (at start and on SIGHUP); reads the key."""
    p = ctx.params
    return ServerSettings(
        listen=p["listen"],
        psk=resolve_key(ctx, p["key_file"]),
        cipher=p["cipher"],
        allow_target=tuple(p["allow_target"]),
        allow_private=p["allow_private"],
        nameserver=tuple(p["nameserver"]),
        relay=relay_settings(p),
        handshake_timeout=p["handshake_timeout"],
        connect_timeout=p["connect_timeout"],
        idle_timeout=p["idle_timeout"] or None,
        max_connections=p["max_connections"] if given(ctx, "max_connections") else None,
        max_handshakes=p["max_handshakes"],
        max_handshakes_per_source=p["max_handshakes_per_source"],
        replay_window=p["replay_window"],
        udp_filter=Filter(p["udp_filter"]),
        udp_idle_timeout=p["udp_idle_timeout"],
        replay_capacity=p["replay_capacity"],
        replay_file=p["replay_file"],
        stats_file=p["stats_file"],
        drain_timeout=p["drain_timeout"],
        log_connections=p["log_connections"],
        metrics=p["metrics"],
        metrics_public=p["metrics_public"],
    )
