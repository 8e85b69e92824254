"""The gateway ruleset's UDP capture (`mptun nft --udp-port`): built, rendered, checked by the
real `nft -c`, and the command line's answers to bad input."""

from __future__ import annotations

import ipaddress
import itertools
import shutil
import subprocess
import sys

import pytest

from mptun.client.nftables import (
    GatewaySettings,
    parse_port_ranges,
    policy_routing_commands,
    render_gateway,
)
from mptun.common.errors import ConfigError
from mptun.lab.netns import Netns, have_netns
from tests.helpers import ROOT
from tests.test_nftables import SERVERS, chain_rules


def udp_settings(**kw) -> GatewaySettings:
    return GatewaySettings(port=1234, servers=SERVERS, udp_port=1236, **kw)


def test_udp_chain_order_and_no_socket_shortcut():
    text = render_gateway(udp_settings(dns_port=5353))
    assert chain_rules(text, "lan_udp") == [
        "iifname != @lan_ifaces return",
        "meta l4proto != udp return",
        "udp dport 53 return",  # the dstnat chain sends it to --dns
        "fib daddr type { local, broadcast, multicast } return",
        "ip daddr @server_v4 return",
        "ip daddr @bypass_v4 return",
        "ip6 daddr @server_v6 return",
        "ip6 daddr @bypass_v6 return",
        "meta l4proto udp tproxy to :1236 meta mark set 0x10000 accept",
    ]
    # the reply sockets are transparent and bound to remote addresses: a `socket transparent`
    # match would hand them the LAN's datagrams (tests/test_udp_gateway_capture.py shows it)
    assert "socket" not in "\n".join(chain_rules(text, "lan_udp"))
    # the TCP redirect is as it was, DNS still redirected for UDP and TCP
    assert "meta l4proto tcp redirect to :1234" in chain_rules(text, "lan_redirect")
    assert "meta l4proto { tcp, udp } th dport 53 redirect to :5353" in text
    # tproxy needs the policy routing even when TCP is redirected: the header says it
    assert "#   ip rule add fwmark 0x10000 lookup 100" in text
    assert "#   ip -6 route add local ::/0 dev lo table 100" in text
    # without --dns-port, the LAN's DNS is UDP like any other and goes through the tunnel
    assert "udp dport 53 return" not in render_gateway(udp_settings())


def test_policy_routing_follows_udp_capture():
    assert policy_routing_commands(udp_settings())[0] == [
        "ip", "rule", "add", "fwmark", "0x10000", "lookup", "100",
    ]  # fmt: skip
    plain = render_gateway(GatewaySettings(port=1234, servers=SERVERS))
    assert "fwmark" not in plain and "lan_udp" not in plain


def test_bypassed_hosts_and_ports():
    hosts = [ipaddress.ip_network("192.0.2.9/32"), ipaddress.ip_network("fd00:1::9/128")]
    ports = parse_port_ranges(["3074", "3478-3480", "3479-3500", " 88 "])
    assert ports == [(3074, 3074), (3478, 3480), (3479, 3500), (88, 88)]
    for mode in ("redirect", "tproxy"):
        text = render_gateway(
            udp_settings(mode=mode, source_bypass=hosts, udp_bypass_ports=ports)  # type: ignore[arg-type]
        )
        assert "elements = { 88, 3074, 3478-3500 }" in text  # merged: nft refuses overlaps
        assert "elements = { 192.0.2.9 }" in text and "elements = { fd00:1::9 }" in text
        tcp = chain_rules(text, "lan_redirect" if mode == "redirect" else "lan_tproxy")
        udp = chain_rules(text, "lan_udp")
        for rules in (tcp, udp):  # a bypassed host leaves directly, TCP and UDP
            assert rules.index("ip saddr @source_bypass_v4 return") < len(rules) - 1
            assert "ip6 saddr @source_bypass_v6 return" in rules
        assert udp[-3:-1] == [
            "udp sport @udp_bypass_ports return",
            "udp dport @udp_bypass_ports return",
        ]
    # none given: the usual ruleset, no empty sets
    assert "source_bypass" not in render_gateway(udp_settings())
    assert "udp_bypass_ports" not in render_gateway(udp_settings())


@pytest.mark.parametrize("bad", ["", "x", "0", "65536", "9-3", "1-2-3", "-5"])
def test_bad_port_ranges_are_refused(bad: str):
    with pytest.raises(ConfigError):
        parse_port_ranges([bad])


def test_udp_bypass_ports_need_udp_capture():
    with pytest.raises(ConfigError, match="--udp-port"):
        render_gateway(GatewaySettings(port=1, servers=SERVERS, udp_bypass_ports=[(1, 2)]))


def run_mptun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mptun", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_options_and_one_line_errors(tmp_path):
    base = ("nft", "--port", "1234", "--server", "203.0.113.100", "--lan", "lan0")
    r = run_mptun(
        *base, "--udp-port", "1236", "--bypass-source", "192.0.2.9",
        "--bypass-udp-port", "3478-3480",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "meta l4proto udp tproxy to :1236" in r.stdout
    assert "elements = { 3478-3480 }" in r.stdout and "elements = { 192.0.2.9 }" in r.stdout
    for args, msg in [
        (("--udp-port", "0"), "--udp-port"),
        (("--udp-port", "1236", "--bypass-udp-port", "9-3"), "--bypass-udp-port"),
        (("--bypass-udp-port", "3074"), "--udp-port"),
        (("--udp-port", "1236", "--bypass-source", "nope"), "bypass-source"),
    ]:
        r = run_mptun(*base, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
    uci = tmp_path / "mptun"
    uci.write_text(
        "config nft 'nft'\n\toption port '1081'\n\tlist server '203.0.113.100'\n"
        "\toption udp_port '1082'\n\tlist bypass_udp_port '3074'\n"
        "\tlist bypass_source '192.0.2.9'\n"
    )
    r = run_mptun("nft", "--uci", str(uci))
    assert r.returncode == 0, r.stderr
    assert "tproxy to :1082" in r.stdout and "elements = { 3074 }" in r.stdout


@pytest.mark.root
@pytest.mark.netns
def test_every_udp_variant_passes_nft_check():
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make test installs it)")
    hosts = [ipaddress.ip_network("192.0.2.9/32"), ipaddress.ip_network("fd00:1::/120")]
    with Netns("nftudp") as ns:
        for mode, dns_port, ipv6, bypass in itertools.product(
            ("redirect", "tproxy"), (None, 5353), (False, True), (False, True)
        ):
            s = udp_settings(
                mode=mode,
                dns_port=dns_port,
                ipv6=ipv6,
                lan_interfaces=["lan0", "br-lan"],
                source_bypass=hosts if bypass else (),
                udp_bypass_ports=[(3074, 3074), (3478, 3480)] if bypass else (),
                block_quic=bypass,
            )
            text = render_gateway(s)
            r = ns.exec("nft", "-c", "-f", "-", input=text, check=False)
            assert r.returncode == 0, (s, r.stderr)
            ns.exec("nft", "-f", "-", input=text)
            ns.exec("nft", "-f", "-", input=text)  # loading again replaces it
            assert ns.exec("nft", "list", "tables").stdout.split() == ["table", "inet", "mptun"]
            ns.exec("nft", "delete", "table", "inet", "mptun")
        r = ns.exec(
            *[sys.executable, "-m", "mptun", "nft", "--port", "1", "--server", "203.0.113.1"],
            *["--udp-port", "2", "--bypass-udp-port", "3074", "--check"],
            cwd=ROOT,
            check=False,
        )
        assert r.returncode == 0 and "chain lan_udp {" in r.stdout, r.stderr
