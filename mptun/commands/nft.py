"""`mptun nft`: print (and optionally check) the gateway ruleset for the router."""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import click

from mptun.client.nftables import (
    DEFAULT_BYPASS,
    DEFAULT_LAN,
    DEFAULT_MARK,
    DEFAULT_ROUTE_TABLE,
    DEFAULT_TABLE,
    GatewaySettings,
    IPAddress,
    parse_networks,
    parse_port_ranges,
    render_gateway,
)
from mptun.commands.options import config_option, option, uci_option
from mptun.common.address import Address
from mptun.common.errors import ConfigError, MptunError


def _server_addresses(values: tuple[str, ...]) -> list[IPAddress]:
    """The VPS addresses for the ruleset: literal IPs as given, names resolved now."""
    out: list[IPAddress] = []
    for value in values:
        text = value.strip()
        try:
            host: str | IPAddress = ipaddress.ip_address(text)
        except ValueError:
            try:
                host = Address.parse(text, default_port=0).host
            except MptunError as e:
                raise ConfigError(f"--server: {e}") from None
        if not isinstance(host, str):
            ips: list[IPAddress] = [host]
        else:
            try:
                infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as e:
                raise ConfigError(f"--server {host}: cannot resolve: {e.strerror}") from None
            ips = [ipaddress.ip_address(sa[0].split("%")[0]) for *_, sa in infos]
        out += [ip for ip in ips if ip not in out]
    return out


class PortRange(click.ParamType):
    """PORT or LOW-HIGH (`3074`, `3478-3480`), as a (low, high) pair."""

    name = "port-range"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_port_ranges([str(value)])[0]
        except ConfigError as e:
            self.fail(str(e), param, ctx)


@click.command()
@config_option
@uci_option
@option(
    "port",
    type=click.IntRange(1, 65535),
    required=True,
    help="The mptun client's --redir port (--tproxy port with --mode tproxy).",
)
@option(
    "mode",
    type=click.Choice(["redirect", "tproxy"]),
    default="redirect",
    help="redirect: nat REDIRECT (pairs with --redir); tproxy: nftables tproxy and policy "
    "routing (pairs with --tproxy).",
)
@option(
    "server",
    multiple=True,
    required=True,
    help="The VPS server (HOST or HOST:PORT; names are resolved now): never redirected "
    "(repeatable).",
)
@option(
    "lan",
    multiple=True,
    default=DEFAULT_LAN,
    help="LAN interface whose TCP is redirected (repeatable).",
)
@option(
    "bypass",
    multiple=True,
    help="Destination CIDR reached directly, not through the tunnel (repeatable; added to the "
    "defaults).",
)
@option(
    "default-bypass",
    "--default-bypass/--no-default-bypass",
    default=True,
    help="Bypass loopback, private (RFC 1918, fc00::/7), shared, link-local, multicast and "
    "reserved ranges.",
)
@option(
    "bypass-source",
    multiple=True,
    help="LAN host (address or CIDR) whose TCP and UDP leave directly, untunnelled: a console, "
    "a game that must see the home address (repeatable).",
)
@option(
    "udp-port",
    type=click.IntRange(1, 65535),
    help="The mptun client's --tproxy-udp port: the LAN's UDP is handed to it with nftables "
    "tproxy (it needs the policy routing of --mode tproxy, printed in the header).",
)
@option(
    "bypass-udp-port",
    type=PortRange(),
    multiple=True,
    help="UDP from or to this port (PORT or LOW-HIGH) leaves directly, with --udp-port "
    "(repeatable).",
)
@option(
    "dns-port",
    type=click.IntRange(1, 65535),
    help="Redirect the LAN's DNS (UDP and TCP port 53, to any address) to the client's --dns port.",
)
@option(
    "block-quic",
    is_flag=True,
    default=False,
    help="Reject UDP port 443 from the LAN, so browsers use TCP (which is tunneled) over QUIC; "
    "not needed with --udp-port, which carries QUIC.",
)
@option(
    "ipv6",
    "--ipv6/--no-ipv6",
    default=True,
    help="Redirect IPv6 too (the client must listen on an IPv6 or dual-stack address).",
)
@option(
    "table",
    default=DEFAULT_TABLE,
    help="Name of the nftables table (family inet).",
)
@option(
    "mark",
    type=click.IntRange(1, 0xFFFFFFFF),
    default=DEFAULT_MARK,
    help="tproxy: packet mark that routes handed-over packets to this host.",
)
@option(
    "route-table",
    type=click.IntRange(1, 0xFFFFFFFE),
    default=DEFAULT_ROUTE_TABLE,
    help="tproxy: routing table of the local-delivery route.",
)
@option(
    "check",
    is_flag=True,
    default=False,
    help="Also check the ruleset with `nft -c` (needs nft and privileges); exit 1 if it fails.",
)
def nft(
    port,
    mode,
    server,
    lan,
    bypass,
    default_bypass,
    bypass_source,
    udp_port,
    bypass_udp_port,
    dns_port,
    block_quic,
    ipv6,
    table,
    mark,
    route_table,
    check,
) -> None:
    """Print the nftables ruleset of router gateway mode (load it with `nft -f`)."""
    nets = parse_networks(DEFAULT_BYPASS if default_bypass else ())
    nets += parse_networks(bypass)
    settings = GatewaySettings(
        port=port,
        mode=mode,
        lan_interfaces=list(lan),
        servers=_server_addresses(server),
        bypass=nets,
        dns_port=dns_port,
        block_quic=block_quic,
        ipv6=ipv6,
        table=table,
        mark=mark,
        route_table=route_table,
        udp_port=udp_port,
        source_bypass=parse_networks(bypass_source, "bypass-source"),
        udp_bypass_ports=list(bypass_udp_port),
    )
    text = render_gateway(settings)
    if check:
        check_ruleset(text)
    click.echo(text, nl=False)


def check_ruleset(text: str) -> None:
    """Run `nft -c -f -` on the text; raise MptunError with nft's complaint if it fails."""
    try:
        r = subprocess.run(
            ["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        raise MptunError("--check: nft is not installed") from None
    if r.returncode != 0:
        first = (r.stderr.strip() or f"exit {r.returncode}").splitlines()[0]
        raise MptunError(f"nft -c rejected the ruleset: {first}")
