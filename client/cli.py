"""`mptun client`: options -> Dialer + listeners -> run."""

from __future__ import annotations

import click

from mptun.client.service import Client, ListenerSpec
from mptun.client.socks import ReplyPolicy, SocksListener
from mptun.client.tunnel import Dialer, TunnelConfig
from mptun.common import runtime
from mptun.common.crypto import cipher_by_name
from mptun.common.errors import ConfigError
from mptun.common.relay import choose_engine
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


@click.command()
@config_option
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
    envvar=env("socks-user"),
    help="Require RFC 1929 username/password auth with this user (with --socks-password).",
)
@click.option(
    "--socks-password",
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
@cipher_option
@transport_option
@relay_option
@timeout_option("connect-timeout", 10.0, "Seconds to connect to the server.")
@timeout_option(
    "handshake-timeout", 15.0, "Seconds for the server's answer (includes its connect)."
)
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
    help="Concurrent connections per listener; at the limit it stops accepting.",
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
    cipher,
    transport,
    relay,
    connect_timeout,
    handshake_timeout,
    idle_timeout,
    max_connections,
) -> None:
    """Run the tunnel client (the router end)."""
    if (socks_user is None) != (socks_password is None):
        raise ConfigError("--socks-user and --socks-password go together")
    credentials = (socks_user, socks_password) if socks_user is not None else None
    dialer = Dialer(
        TunnelConfig(
            server=server,
            psk=resolve_key(ctx, key_file),
            cipher=cipher_by_name(cipher),
            engine=choose_engine(relay),
            mptcp=transport == "mptcp",
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout or None,
        )
    )
    listeners = []
    if socks is not None:
        handler = SocksListener(dialer, ReplyPolicy(reply), credentials)
        listeners.append(ListenerSpec(socks, handler))
    app = Client(dialer, listeners, max_connections)
    runtime.run(app.start, app.stop)
