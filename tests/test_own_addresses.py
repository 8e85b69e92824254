"""The server's own addresses come before `--allow-target`, asked of the routing table in both
families (server/policy.py, common/routes.py).

The namespace tests build a server namespace on 198.51.100.1/24 with a peer at 198.51.100.2 over
a veth pair, and an IPv6 prefix routed `local` to the server (AnyIP): what a client must not
reach through `--allow-target 198.51.100.0/24` is the server itself.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from mptun.server.policy import TargetPolicy, parse_cidrs
from tests.helpers import ROOT, wait_listening


def ip(text: str):
    return ipaddress.ip_address(text)


def test_own_addresses_are_refused_before_allow_target():
    own = {ip("198.51.100.1"), ip("2001:db8:77::5")}
    p = TargetPolicy(
        allow=parse_cidrs(["198.51.100.0/24", "2001:db8::/32"]), is_own=own.__contains__
    )
    for text in ["198.51.100.1", "::ffff:198.51.100.1", "2001:db8:77::5"]:
        why = p.check(ip(text))
        assert why and "own address" in why, text
        assert p.hint(ip(text), why) == "only --allow-private opens the server's own addresses"
    assert p.check(ip("198.51.100.2")) is None  # the range still opens the rest
    assert p.check(ip("2001:db8:77::6")) is None
    opened = TargetPolicy(
        allow=parse_cidrs(["198.51.100.0/24"]), allow_private=True, is_own=own.__contains__
    )
    assert opened.check(ip("198.51.100.1")) is None  # --allow-private opens everything


def test_loopback_is_opened_only_by_a_loopback_range():
    own = lambda _: True  # noqa: E731 (every address here is the host's)
    assert (
        TargetPolicy(allow=parse_cidrs(["127.0.0.0/8"]), is_own=own).check(ip("127.0.0.1")) is None
    )
    assert TargetPolicy(allow=parse_cidrs(["::1/128"]), is_own=own).check(ip("::1")) is None
    wide = TargetPolicy(allow=parse_cidrs(["0.0.0.0/0", "::/0"]), is_own=own)
    for text in ["127.0.0.1", "::1", "::ffff:127.0.0.1"]:
        assert "loopback" in (wide.check(ip(text)) or ""), text
    assert "--allow-target 127.0.0.1/32" in wide.hint(ip("127.0.0.1"))


# -- in namespaces ------------------------------------------------------------------------------

needs_netns = pytest.mark.skipif(not have_netns()[0], reason=have_netns()[1])

ANYIP = "2001:db8:77::/64"  # routed `local` to the server: every address in it is the host's


def build(srv: Netns, peer: Netns) -> None:
    """srv 198.51.100.1/24, fd00:5::1/64 <-veth-> peer 198.51.100.2/24; ANYIP local on srv."""
    srv.ip("link", "add", "name", "v0", "type", "veth", "peer", "name", "v1", "netns", peer.name)
    srv.ip("link", "set", "v0", "up")
    srv.ip("addr", "add", "198.51.100.1/24", "dev", "v0")
    srv.ip("-6", "addr", "add", "fd00:5::1/64", "dev", "v0", "nodad")
    srv.ip("-6", "route", "add", "local", ANYIP, "dev", "lo")
    peer.ip("link", "set", "v1", "up")
    peer.ip("addr", "add", "198.51.100.2/24", "dev", "v1")


@pytest.mark.root
@pytest.mark.netns
@needs_netns
def test_route_types_in_both_families():
    code = (
        "import ipaddress as i, json; from mptun.common.routes import is_own_address as f; "
        "print(json.dumps({a: f(i.ip_address(a)) for a in ["
        "'198.51.100.1', '198.51.100.255', '198.51.100.2', '2001:db8:77::5', '2001:db8:78::5', "
        "'fd00:5::1', 'fd00:5::', 'fd00:5::9', '0.0.0.0', '::', '127.0.0.9', '::1']}))"
    )
    with Netns("own-s") as srv, Netns("own-p") as peer:
        build(srv, peer)
        srv.sysctl("net.ipv4.ip_nonlocal_bind", 1)  # a bind test would call every address own
        # A forwarding host (a VPS running containers) joins its subnets' subnet-router anycast.
        srv.sysctl("net.ipv6.conf.all.forwarding", 1)
        out = json.loads(srv.exec(sys.executable, "-c", code, cwd=str(ROOT)).stdout)
    assert out == {
        "198.51.100.1": True,  # an address of the host
        "198.51.100.255": True,  # its subnet's broadcast
        "198.51.100.2": False,  # the peer
        "2001:db8:77::5": True,  # in the prefix routed local (a UDP-connect test misses it)
        "2001:db8:78::5": False,
        "fd00:5::1": True,
        "fd00:5::": True,  # subnet-router anycast (RFC 4291 2.6.1): delivered to the host
        "fd00:5::9": False,
        "0.0.0.0": True,
        "::": True,
        "127.0.0.9": True,
        "::1": True,
    }


DRIVER = """
import json, sys
from mptun.common.address import Address
from mptun.common.crypto import load_key_file
from tests.peers import connect_status
port, key, targets = int(sys.argv[1]), load_key_file(sys.argv[2]), sys.argv[3:]
print(json.dumps([connect_status(port, key, Address.parse(t)).name for t in targets]))
"""

LISTENER = """
import socket, sys
s = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
print("ready", flush=True)
while True:
    c, a = s.accept()
    print("hit", a[0], flush=True)
    c.close()
"""


@pytest.mark.root
@pytest.mark.netns
@needs_netns
def test_server_refuses_its_own_addresses_inside_an_allowed_range(tmp_path: Path, key_file: Path):
    """The server on 198.51.100.1 with --allow-target 198.51.100.0/24: its own address, its
    broadcast and the AnyIP prefix are refused; the peer in the range is still reached."""
    port, local_port = 8443, 9000
    own_targets = [
        f"198.51.100.1:{port}",  # the server's own listener
        f"198.51.100.1:{local_port}",  # another service of the host
        f"[::ffff:198.51.100.1]:{local_port}",
        f"198.51.100.255:{local_port}",
        f"[2001:db8:77::5]:{local_port}",  # reaches the [::] listener through the local route
        f"[fd00:5::1]:{local_port}",
    ]
    targets = [*own_targets, f"198.51.100.2:{local_port}"]
    with Netns("own-s") as srv, Netns("own-p") as peer:
        build(srv, peer)
        listeners = {}
        for name, ns in (("server", srv), ("peer", peer)):
            listeners[name] = ns.popen(
                [sys.executable, "-c", LISTENER, str(local_port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert listeners[name].stdout.readline().strip() == "ready"
        # Without the fix the AnyIP address is reachable: prove the door exists.
        r = srv.exec(
            "python3",
            "-c",
            f"import socket; socket.create_connection(('2001:db8:77::5', {local_port}), 5)",
        )
        assert r.returncode == 0
        statuses = {}
        for mode, extra in (
            ("allow-target", ["--allow-target", "198.51.100.0/24", "--allow-target", ANYIP,
                              "--allow-target", "fd00::/8"]),
            ("allow-private", ["--allow-private"]),
        ):  # fmt: skip
            log = tmp_path / f"server-{mode}.log"
            proc = srv.popen(
                [sys.executable, "-m", "mptun", "--log-level", "debug", "server", "--listen",
                 f"0.0.0.0:{port}", "--key-file", str(key_file), "--transport", "tcp", *extra],
                stdout=log.open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_listening("127.0.0.1", port, proc=proc, prefix=srv.prefix())
            out = srv.exec(
                sys.executable, "-c", DRIVER, str(port), str(key_file), *targets, cwd=str(ROOT)
            )
            statuses[mode] = dict(zip(targets, json.loads(out.stdout), strict=True))
            proc.terminate()
            proc.wait(15)
        for p in listeners.values():
            p.terminate()
        hits = {name: p.communicate(timeout=10)[0].count("hit") for name, p in listeners.items()}
    for t in own_targets:
        assert statuses["allow-target"][t] == "NOT_ALLOWED", (t, statuses)
    assert statuses["allow-target"][targets[-1]] == "SUCCEEDED"
    assert (
        "only --allow-private opens the server's own addresses"
        in (tmp_path / "server-allow-target.log").read_text()
    )
    # --allow-private opens the host itself (connections to the listener, or the closed
    # broadcast target failing to connect: anything but a policy refusal).
    assert all(s != "NOT_ALLOWED" for s in statuses["allow-private"].values()), statuses
    # The connect test above, and allow-private's: 1 + 4 reachable own targets; the peer twice.
    assert hits["peer"] == 2
    assert hits["server"] >= 1 + 4
