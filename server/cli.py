"""`mptun server`: options -> ServerConfig -> run."""

from __future__ import annotations

import click

from mptun.common import runtime
from mptun.common.crypto import cipher_by_name
from mptun.common.relay import choose_engine
from mptun.common.replay import DEFAULT_WINDOW
from mptun.options import (
    HostPort,
    cipher_option,
    config_option,
    env,
    key_options,
    relay_option,
    resolve_key,
    timeout_option,
    transport_option,
)
from mptun.server.policy import TargetPolicy, parse_cidrs
from mptun.server.service import Server, ServerConfig


@click.command()
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
@timeout_option("handshake-timeout", 10.0, "Seconds from accept to a complete first flight.")
@timeout_option("connect-timeout", 10.0, "Seconds to resolve and connect to a target.")
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    envvar=env("idle-timeout"),
    help="Reset a relayed connection after this many seconds without traffic (0: never).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    envvar=env("max-connections"),
    help="Concurrent connections; at the limit the server stops accepting.",
)
@click.option(
    "--replay-window",
    type=click.FloatRange(min=1),
    default=DEFAULT_WINDOW,
    show_default=True,
    envvar=env("replay-window"),
    help="Seconds a client's clock may differ from the server's.",
)
@click.pass_context
def server(
    ctx: click.Context,
    listen,
    key_file,
    cipher,
    allow_target,
    allow_private,
    transport,
    relay,
    handshake_timeout,
    connect_timeout,
    idle_timeout,
    max_connections,
    replay_window,
) -> None:
    """Run the tunnel server (the VPS end)."""
    config = ServerConfig(
        listen=listen,
        psk=resolve_key(ctx, key_file),
        cipher=cipher_by_name(cipher),
        engine=choose_engine(relay),
        policy=TargetPolicy(allow=parse_cidrs(allow_target), allow_private=allow_private),
        mptcp=transport == "mptcp",
        handshake_timeout=handshake_timeout,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout or None,
        replay_window=replay_window,
        max_connections=max_connections,
    )
    srv = Server(config)
    runtime.run(srv.start, srv.stop)
