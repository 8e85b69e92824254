"""UDP datagrams the target policy refuses never leave the server (server/udp.py), in namespaces.

The server's namespace has 198.51.100.1/24 and fd00:5::1/64 on a veth to a peer namespace
(198.51.100.2, fd00:5::2): a UDP receiver listens in each namespace on every address. Without
`--allow-target`, datagrams to loopback, to the server's own address and to the peer (a private
range, for Python's `ipaddress` the documentation ranges too) are dropped and counted, and both
receivers count zero. With `--allow-target 198.51.100.0/24`, the peer is reached (the setup
can deliver) and the server's own address is still refused.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from tests.helpers import ROOT, read_stats_after_usr1, wait_listening

needs_netns = pytest.mark.skipif(not have_netns()[0], reason=have_netns()[1])
PORT, UDP_PORT = 8443, 9000  # fixed: inside namespaces this test created

RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, sa = s.recvfrom(65535)
    print("hit", sa[0], data.decode(), flush=True)
"""

DRIVER = """
import asyncio, sys
from mptun.client.app import ClientSettings, build_tunneler
from mptun.client.udp import UdpTunnels
from mptun.common.address import Address
from mptun.common.crypto import load_key_file

async def main():
    port, key, targets = int(sys.argv[1]), load_key_file(sys.argv[2]), sys.argv[3:]
    settings = ClientSettings(server=Address.parse(f"127.0.0.1:{port}"), psk=key)
    u = UdpTunnels(build_tunneler(settings))
    for t in targets:
        u.send(("192.0.2.7", 1), Address.parse(t), t.encode(), lambda a, p: None)
    for _ in range(500):
        snap = u.snapshot()
        if snap and snap[0]["state"] == "open":
            break
        await asyncio.sleep(0.02)
    else:
        sys.exit("the association did not open")
    await asyncio.sleep(0.5)
    await u.aclose()

asyncio.run(main())
"""


def build(srv: Netns, peer: Netns) -> None:
    srv.ip("link", "add", "name", "v0", "type", "veth", "peer", "name", "v1", "netns", peer.name)
    srv.ip("link", "set", "v0", "up")
    srv.ip("addr", "add", "198.51.100.1/24", "dev", "v0")
    srv.ip("-6", "addr", "add", "fd00:5::1/64", "dev", "v0", "nodad")
    peer.ip("link", "set", "v1", "up")
    peer.ip("addr", "add", "198.51.100.2/24", "dev", "v1")
    peer.ip("-6", "addr", "add", "fd00:5::2/64", "dev", "v1", "nodad")


@pytest.mark.root
@pytest.mark.netns
@needs_netns
def test_refused_datagrams_never_leave_the_server(tmp_path: Path, key_file: Path) -> None:
    refused = [
        f"127.0.0.1:{UDP_PORT}",  # loopback
        f"[::1]:{UDP_PORT}",
        f"198.51.100.1:{UDP_PORT}",  # the server's own address
        f"[::ffff:198.51.100.1]:{UDP_PORT}",
        f"198.51.100.2:{UDP_PORT}",  # the peer: a private (documentation) range
        f"[fd00:5::2]:{UDP_PORT}",  # a private (ULA) range
    ]
    with Netns("udpref-s") as srv, Netns("udpref-p") as peer:
        build(srv, peer)
        receivers = {}
        for name, ns in (("server", srv), ("peer", peer)):
            receivers[name] = ns.popen(
                [sys.executable, "-c", RECEIVER, str(UDP_PORT)], stdout=subprocess.PIPE, text=True
            )
            assert receivers[name].stdout.readline().strip() == "ready"
        counters = {}
        for mode, extra in (
            ("default", []),
            ("allow-target", ["--allow-target", "198.51.100.0/24"]),
        ):
            stats = tmp_path / f"stats-{mode}.json"
            log = tmp_path / f"server-{mode}.log"
            proc = srv.popen(
                [sys.executable, "-m", "mptun", "--log-level", "debug", "server", "--listen",
                 f"127.0.0.1:{PORT}", "--key-file", str(key_file), "--transport", "tcp",
                 "--stats-file", str(stats), *extra],
                stdout=log.open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                wait_listening("127.0.0.1", PORT, proc=proc, prefix=srv.prefix())
                targets = refused if mode == "default" else [refused[2], refused[4]]
                r = srv.exec(
                    sys.executable, "-c", DRIVER, str(PORT), str(key_file), *targets,
                    cwd=str(ROOT), check=False,
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                counters[mode] = read_stats_after_usr1(proc.pid, stats)["counters"]
            finally:
                proc.terminate()
                proc.wait(15)
        for p in receivers.values():
            p.terminate()
        hits = {name: p.communicate(timeout=10)[0] for name, p in receivers.items()}
    assert counters["default"]["udp-refused"] == len(refused), counters
    assert counters["allow-target"]["udp-refused"] == 1  # its own address, still
    assert hits["server"].count("hit") == 0, hits
    # The one datagram allowed reached the peer: the receivers do count.
    assert hits["peer"].count("hit") == 1 and f"198.51.100.2:{UDP_PORT}" in hits["peer"], hits
    log = (tmp_path / "server-allow-target.log").read_text()
    assert "only --allow-private opens the server's own addresses" in log
