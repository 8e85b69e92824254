"""The gateway ruleset: built from settings, rendered, checked by the real `nft -c`."""

from __future__ import annotations

import ipaddress
import itertools
import shutil
import subprocess
import sys

import pytest

from mptun.client.nftables import (
    DEFAULT_BYPASS,
    GatewaySettings,
    gateway_table,
    parse_networks,
    policy_routing_commands,
    render_gateway,
)
from mptun.common.errors import ConfigError
from mptun.lab.netns import Netns, have_netns
from tests.helpers import ROOT

SERVERS = [ipaddress.ip_address("203.0.113.100"), ipaddress.ip_address("fd00:ff::100")]


def chain_rules(text: str, chain: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {chain} {{")
    end = lines.index("\t}", start)
    return [ln.strip() for ln in lines[start + 1 : end] if not ln.strip().startswith(("#", "type"))]


def test_redirect_ruleset_order_and_sets():
    text = render_gateway(
        GatewaySettings(port=1234, lan_interfaces=["lan0", "lan1"], servers=SERVERS, dns_port=53)
    )
    assert text.splitlines()[2:4] == ["table inet mptun", "delete table inet mptun"]
    assert "# Remove: nft delete table inet mptun" in text
    assert chain_rules(text, "lan_redirect") == [
        "iifname != @lan_ifaces return",
        "meta l4proto { tcp, udp } th dport 53 redirect to :53",
        "fib daddr type local return",
        "ip daddr @server_v4 return",
        "ip daddr @bypass_v4 return",
        "ip6 daddr @server_v6 return",
        "ip6 daddr @bypass_v6 return",
        "meta l4proto tcp redirect to :1234",
    ]
    assert 'elements = { "lan0", "lan1" }' in text
    assert "elements = { 203.0.113.100 }" in text and "elements = { fd00:ff::100 }" in text
    assert "192.168.0.0/16" in text and "fc00::/7" in text
    assert "lan_block_quic" not in text and "tproxy" not in text


def test_bypass_is_merged_and_defaults_can_go():
    nets = parse_networks(["10.1.0.0/16", "10.0.0.0/8", "198.51.100.7", "2001:db8::/32"])
    text = render_gateway(GatewaySettings(port=1, servers=SERVERS, bypass=nets))
    assert "elements = { 10.0.0.0/8, 198.51.100.7 }" in text  # overlaps merged: nft refuses them
    assert "elements = { 2001:db8::/32 }" in text
    text = render_gateway(GatewaySettings(port=1, servers=[], bypass=[]))
    assert "elements" not in text.split("set lan_ifaces")[1].split("chain")[0].replace(
        'elements = { "br-lan" }', ""
    )
    with pytest.raises(ConfigError, match="not an address"):
        parse_networks(["10.0.0.0/33"])


def test_ipv4_only_tproxy_dns_and_quic():
    s = GatewaySettings(
        port=1235, mode="tproxy", servers=SERVERS, dns_port=5353, block_quic=True, ipv6=False
    )
    text = render_gateway(s)
    rules = chain_rules(text, "lan_tproxy")
    assert "meta nfproto ipv6 return" in rules and "server_v6" not in text
    assert rules[-2:] == [
        "meta l4proto tcp socket transparent 1 meta mark set 0x10000 accept",
        "meta l4proto tcp tproxy to :1235 meta mark set 0x10000 accept",
    ]
    assert chain_rules(text, "lan_dns")[-1] == (
        "meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 redirect to :5353"
    )
    assert chain_rules(text, "lan_block_quic") == ["iifname @lan_ifaces udp dport 443 reject"]
    assert "ip rule add fwmark 0x10000 lookup 100" in text and "ip -6" not in text
    assert policy_routing_commands(s)[0] == [
        "ip",
        "rule",
        "add",
        "fwmark",
        "0x10000",
        "lookup",
        "100",
    ]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"port": 0}, "port"),
        ({"lan_interfaces": []}, "LAN interface"),
        ({"lan_interfaces": ['lan" ; flush ruleset']}, "interface name"),
        ({"lan_interfaces": ["a" * 16]}, "interface name"),
        ({"table": "my table"}, "table name"),
        ({"route_table": 254}, "reserved"),
        ({"dns_port": 70000}, "DNS port"),
    ],
)
def test_bad_settings(kw: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        gateway_table(GatewaySettings(**{"port": 1234, **kw}))


def test_default_bypass_covers_what_the_issue_names():
    nets = parse_networks(DEFAULT_BYPASS)
    for ip in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.1.1",
        "172.31.0.1",
        "169.254.1.1",
        "224.0.0.1",
        "::1",
        "fd12::1",
        "fe80::1",
        "ff02::1",
        "100.64.0.1",
    ):
        assert any(ipaddress.ip_address(ip) in n for n in nets), ip
    for ip in ("203.0.113.5", "8.8.8.8", "2001:4860::8888"):
        assert not any(ipaddress.ip_address(ip) in n for n in nets), ip


def run_mptun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mptun", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_cli_prints_the_ruleset_and_rejects_bad_input():
    r = run_mptun(
        "nft",
        "--port",
        "1234",
        "--server",
        "203.0.113.100",
        "--server",
        "[fd00:ff::100]:8443",
        "--lan",
        "lan0",
        "--block-quic",
    )
    assert r.returncode == 0, r.stderr
    assert "fd00:ff::100" in r.stdout and "lan_block_quic" in r.stdout
    for args, msg in [
        (("--port", "1234"), "--server"),
        (("--port", "1234", "--server", "203.0.113.1", "--bypass", "nope"), "not an address"),
        (("--port", "1234", "--server", "203.0.113.1", "--lan", "a b"), "interface name"),
    ]:
        r = run_mptun("nft", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


def test_cli_reads_uci_and_toml(tmp_path):
    uci = tmp_path / "mptun"
    uci.write_text(
        "config nft 'nft'\n"
        "\toption port '1081'\n"
        "\tlist server '203.0.113.100'\n"
        "\tlist lan 'br-lan'\n"
        "\tlist lan 'lan2'\n"
        "\toption block_quic '1'\n"
        "\toption default_bypass '0'\n"
        "\tlist bypass '10.0.0.0/8'\n"
    )
    r = run_mptun("nft", "--uci", str(uci))
    assert r.returncode == 0, r.stderr
    assert 'elements = { "br-lan", "lan2" }' in r.stdout and "redirect to :1081" in r.stdout
    assert "elements = { 10.0.0.0/8 }" in r.stdout and "lan_block_quic" in r.stdout
    toml = tmp_path / "c.toml"
    toml.write_text('[nft]\nport = 1082\nserver = ["fd00:ff::100"]\nipv6 = true\n')
    r = run_mptun("nft", "--config", str(toml))
    assert r.returncode == 0, r.stderr
    assert "elements = { fd00:ff::100 }" in r.stdout and "redirect to :1082" in r.stdout


@pytest.mark.root
@pytest.mark.netns
def test_every_variant_passes_nft_check():
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make test installs it)")
    with Netns("nftcheck") as ns:
        for mode, dns_port, quic, ipv6 in itertools.product(
            ("redirect", "tproxy"), (None, 5353), (False, True), (False, True)
        ):
            s = GatewaySettings(
                port=1234,
                mode=mode,  # type: ignore[arg-type]
                lan_interfaces=["lan0", "br-lan"],
                servers=SERVERS,
                dns_port=dns_port,
                block_quic=quic,
                ipv6=ipv6,
            )
            text = render_gateway(s)
            r = ns.exec("nft", "-c", "-f", "-", input=text, check=False)
            assert r.returncode == 0, (s, r.stderr)
            # and loads for real, twice (the second load replaces the first)
            ns.exec("nft", "-f", "-", input=text)
            ns.exec("nft", "-f", "-", input=text)
            assert ns.exec("nft", "list", "tables").stdout.split() == ["table", "inet", "mptun"]
            ns.exec("nft", "delete", "table", "inet", "mptun")
            assert ns.exec("nft", "list", "ruleset").stdout.strip() == ""
        r = ns.exec(
            sys.executable,
            "-m",
            "mptun",
            "nft",
            "--port",
            "1",
            "--server",
            "203.0.113.1",
            "--check",
            cwd=ROOT,
            check=False,
        )
        assert r.returncode == 0 and "table inet mptun {" in r.stdout, r.stderr
