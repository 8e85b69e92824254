"""client/ifaddrs.py, the uplinks' addresses without pyroute2, against the real kernel.

In a namespace of its own: links up, down, and up without a carrier; IPv4 and IPv6 global
addresses, host-scope, deprecated, tentative, secondary and point-to-point ones.
The standard-library reader must answer what the pyroute2 reader (client/netlink.py, used by
`mptun uplinks`) answers for the same links, and what the test set up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from mptun.lab.wait import wait_until
from tests.helpers import ROOT

pytestmark = [pytest.mark.root, pytest.mark.netns]

# Both readers, run inside the namespace; prints {reader: {name: [addresses]}}.
READ = r"""
import json, sys
from mptun.client.ifaddrs import read_addresses
names = sys.argv[1:]
out = {"stdlib": {n: [str(a) for a in v] for n, v in read_addresses(names).items()}}
try:
    from mptun.client.netlink import Netlink
    with Netlink() as nl:
        st = nl.state()
    out["pyroute2"] = {
        n: [str(a) for a in st.ips_of(st.links[n])] if n in st.links and st.links[n].operational
        else [] for n in names
    }
except Exception as e:
    out["pyroute2_error"] = str(e)
print(json.dumps(out))
"""
NAMES = ["a0", "b0", "c0", "d0", "p0", "lo", "nosuch"]


@pytest.fixture
def ns() -> Iterator[Netns]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    n = Netns("ifaddr")
    try:
        n.ip("link", "add", "a0", "type", "veth", "peer", "name", "a1")
        n.ip("link", "add", "b0", "type", "veth", "peer", "name", "b1")
        n.ip("link", "add", "c0", "type", "veth", "peer", "name", "c1")
        n.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        n.ip("link", "add", "p0", "type", "veth", "peer", "name", "p1")
        for dev in ("a0", "a1", "b1", "c0", "c1", "d0", "p0", "p1", "lo"):
            n.ip("link", "set", dev, "up")
        # a0: v4 primary and secondary, v6 global, v6 deprecated (preferred lifetime 0),
        # v6 tentative (DAD pending: optimistic off, dad transmits slow), v4 host scope
        n.exec("sysctl", "-qw", "net.ipv6.conf.a0.dad_transmits=50")
        n.ip("addr", "add", "192.0.2.10/24", "dev", "a0")
        n.ip("addr", "add", "192.0.2.11/24", "dev", "a0")
        n.ip("addr", "add", "2001:db8:a::10/64", "dev", "a0", "nodad")
        n.ip("addr", "add", "2001:db8:a::11/64", "dev", "a0", "nodad", "preferred_lft", "0")
        n.ip("addr", "add", "2001:db8:a::12/64", "dev", "a0")
        n.ip("addr", "add", "198.51.100.9/32", "dev", "a0", "scope", "host")
        # b0: down; c0: up and running; d0: up but its peer down (no carrier)
        n.ip("addr", "add", "192.0.2.20/24", "dev", "b0")
        n.ip("addr", "add", "203.0.113.30/24", "dev", "c0")
        n.ip("addr", "add", "2001:db8:c::30/64", "dev", "c0", "nodad")
        n.ip("addr", "add", "192.0.2.40/24", "dev", "d0")
        # p0: point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer's
        n.ip("addr", "add", "198.51.100.50", "peer", "198.51.100.51", "dev", "p0")
        yield n
    finally:
        n.delete()


def test_matches_pyroute2_and_the_setup(ns: Netns) -> None:
    r = ns.exec(sys.executable, "-c", READ, *NAMES)
    got = json.loads(r.stdout)
    stdlib = got["stdlib"]
    # not the secondary 192.0.2.11: IFA_F_SECONDARY is IFA_F_TEMPORARY's bit (0x01,
    # include/uapi/linux/if_addr.h), skipped by both readers
    assert stdlib["a0"] == ["192.0.2.10", "2001:db8:a::10"], stdlib
    assert stdlib["b0"] == [] and stdlib["d0"] == [] and stdlib["nosuch"] == []
    assert stdlib["c0"] == ["203.0.113.30", "2001:db8:c::30"]
    assert stdlib["p0"] == ["198.51.100.50"]
    assert stdlib["lo"] == []  # 127.0.0.1 and ::1 are host scope
    if "pyroute2_error" in got:
        pytest.skip(f"pyroute2 reader unavailable: {got['pyroute2_error']}")
    for name in NAMES:
        assert sorted(stdlib[name]) == sorted(got["pyroute2"][name]), name


def test_many_addresses_span_several_datagrams(ns: Netns) -> None:
    """A dump longer than one datagram (the kernel fills about a page per recv): every
    address is read."""
    batch = "".join(f"address add 2001:db8:c::{i:x}/64 dev c0 nodad\n" for i in range(100, 500))
    ns.exec("ip", "-batch", "-", input=batch, text=True)
    r = ns.exec(sys.executable, "-c", READ, "c0")
    addrs = json.loads(r.stdout)["stdlib"]["c0"]
    assert len(addrs) == 2 + 400
    assert "2001:db8:c::1f3" in addrs


def test_a_client_probing_uplinks_imports_no_pyroute2(tmp_path: Path, key_file: Path) -> None:
    """`mptun client --uplink` on a router without python3-pyroute2: the uplink's addresses
    are read (the uplink, loopback here, has no global one: it is found dead) and pyroute2 is
    never imported."""
    log = tmp_path / "client.log"
    args = ["client", "--server", "192.0.2.1:8443", "--key-file", str(key_file), "--socks",
            "127.0.0.1:0", "--control", "none", "--uplink", "lo", "--health-file", ""]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "mptun", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        dead = "uplink lo: unknown -> dead"
        wait_until(lambda: dead in log.read_text(), 20, "lo found dead", proc=proc)
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert "no address of the server's family" in text
    mods = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", text, re.M))
    assert "mptun.client.ifaddrs" in mods
    assert not {m for m in mods if m.split(".")[0] == "pyroute2"}
