"""`mptun server`: options -> ServerConfig -> run."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from mptun.common import runtime
from mptun.common.crypto import cipher_by_name
from mptun.common.errors import MptunError
from mptun.common.relay import Coalescing, choose_bulk, choose_engine
from mptun.common.replay import DEFAULT_CAPACITY, DEFAULT_WINDOW
from mptun.common.stats import StatsDump
from mptun.options import (
    MAX_CONNECTIONS,
    HostPort,
    OutputFile,
    ReloadableCommand,
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
)
from mptun.server.policy import TargetPolicy, parse_cidrs
from mptun.server.service import Server, ServerConfig

log = logging.getLogger("mptun.server")
# ~200 bytes a salt (common/replay.py): 10 million is ~2 GB, more than a VPS should give it.
MAX_REPLAY_CAPACITY = 10_000_000


@click.command(cls=ReloadableCommand)
@config_option
@click.option(
    "--listen",
    type=HostPort(ip_only=True),
    required=True,
    envvar=env("listen"),
    help="Address to accept tunnels on, e.g. 0.0.0.0:8443 or [::]:8443 (both families).",
)
@key_options
@cipher_option
@click.option(
    "--allow-target",
    multiple=True,
    envvar=env("allow-target"),
    help="CIDR the server may connect to even though the default policy refuses it (repeatable).",
)
@click.option(
    "--allow-private",
    is_flag=True,
    default=False,
    envvar=env("allow-private"),
    help="Allow every target: loopback, private, link-local, the server's own addresses.",
)
@transport_option
@relay_option
@bulk_option
@coalesce_option
@timeout_option("handshake-timeout", 10.0, "Seconds from accept to a complete first flight.")
@timeout_option("connect-timeout", 10.0, "Seconds to resolve and connect to a target.")
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
    help="Concurrent connections; at the limit the server stops accepting.",
)
@click.option(
    "--replay-window",
    type=seconds(min=1),
    default=DEFAULT_WINDOW,
    show_default=True,
    envvar=env("replay-window"),
    help="Seconds a client's clock may differ from the server's.",
)
@click.option(
    "--replay-capacity",
    type=click.IntRange(1, MAX_REPLAY_CAPACITY),
    default=DEFAULT_CAPACITY,
    show_default=True,
    envvar=env("replay-capacity"),
    help="Salts the replay cache holds (~200 bytes each); when full, new tunnels are refused.",
)
@click.option(
    "--replay-file",
    type=OutputFile(),
    envvar=env("replay-file"),
    help="Save the replay cache here on stop and restore it on start (survives restarts).",
)
@stats_option
@timeout_option("drain-timeout", 10.0, "On SIGTERM, seconds open connections may take to end.")
@click.pass_context
def server(ctx: click.Context, **_: object) -> None:
    """Run the tunnel server (the VPS end). SIGHUP reloads config and key; SIGUSR1 dumps stats."""
    srv = Server(build_config(ctx))

    def reload() -> None:
        try:
            with ctx.command.reparse(ctx) as new:  # type: ignore[attr-defined]
                config = build_config(new)
        except (MptunError, click.ClickException) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            log.error("reload failed, keeping the running configuration: %s", msg)
            return
        srv.reload(config)

    dump = StatsDump(ctx.params["stats_file"], srv.snapshot)
    runtime.run(srv.start, srv.stop, ctx.params["drain_timeout"], reload=reload, dump=dump)


def build_config(ctx: click.Context) -> ServerConfig:
    """The server's configuration from a parsed context (at start and on SIGHUP)."""
    p = ctx.params
    coalescing = Coalescing(delay=p["coalesce_ms"] / 1000)
    return ServerConfig(
        listen=p["listen"],
        psk=resolve_key(ctx, p["key_file"]),
        cipher=cipher_by_name(p["cipher"]),
        engine=choose_bulk(
            p["bulk"],
            choose_engine(p["relay"], coalescing),
            mptcp=p["transport"] == "mptcp",
            coalescing=coalescing,
        ),
        accept_plain=p["bulk"] == "plain",
        policy=TargetPolicy(allow=parse_cidrs(p["allow_target"]), allow_private=p["allow_private"]),
        mptcp=p["transport"] == "mptcp",
        handshake_timeout=p["handshake_timeout"],
        connect_timeout=p["connect_timeout"],
        idle_timeout=p["idle_timeout"] or None,
        replay_window=p["replay_window"],
        replay_capacity=p["replay_capacity"],
        replay_file=Path(p["replay_file"]) if p["replay_file"] else None,
        max_connections=p["max_connections"],
    )
