r"""The `--tproxy-udp` capture (client/tproxy.py) on real sockets, real nftables, two namespaces.

    lan 192.0.2.2, fd00:1::2 ---- router 192.0.2.1, fd00:1::1: `mptun nft --udp-port` rules,
                                  the listener with a stand-in for the tunnels that answers
                                  every datagram at once, as if from where it was sent

The destinations (203.0.113.9, 2001:db8::9) exist nowhere: only the capture can answer, and
only a reply from the original destination reaches the LAN host's connected socket.
(tests/test_udp_gateway.py does the same through the real tunnel on the multipath test bed.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from mptun.client.nftables import GatewaySettings, policy_routing_commands, render_gateway
from mptun.client.tproxy import ReplySockets, original_destination
from mptun.common.address import Address
from mptun.common.sockets import IP_ORIGDSTADDR, IPV6_ORIGDSTADDR
from mptun.lab.netns import Netns, have_netns
from mptun.lab.wait import wait_listening
from tests.helpers import ROOT

PORT = 1236
LAN_V4, ROUTER_V4 = "192.0.2.2", "192.0.2.1"
LAN_V6, ROUTER_V6 = "fd00:1::2", "fd00:1::1"
FAR_V4, FAR_V6 = "203.0.113.9", "2001:db8::9"
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


# -- the router's program: the listener around a stand-in for client/udp.py's UdpTunnels --------
class EchoTunnels:
    """Answers each datagram at once from where it was sent (what the server's reply would be)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def send(self, lan_source, target: Address, payload: bytes, deliver) -> None:
        self.loop.call_soon(deliver, target, b"echo:" + payload)


async def _serve(port: int) -> None:
    from mptun.client.tproxy import UdpTproxy

    loop = asyncio.get_running_loop()
    counters: Counter[str] = Counter()
    listener = UdpTproxy(Address(ipaddress.ip_address("::"), port), EchoTunnels(loop), counters)
    listener.start(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    print(json.dumps({**counters, "reply_sockets": listener.snapshot()}), flush=True)
    listener.close()


# -- the LAN host's client ----------------------------------------------------------------------
def _exchange(host: str, port: int, messages: list[str]) -> None:
    """From one connected socket, each message in turn; prints what came back (or "nothing")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((host, port))
    out = []
    for m in messages:
        s.send(m.encode())
        try:
            out.append(s.recv(2048).decode())
        except (TimeoutError, ConnectionRefusedError):
            out.append("nothing")
    print(json.dumps(out))


# -- the test bed -------------------------------------------------------------------------------
def program(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_udp_gateway_capture", *args]


class Bed:
    def __init__(self, lan: Netns, router: Netns) -> None:
        self.lan, self.router = lan, router
        self.proc: subprocess.Popen | None = None

    def rules(self, text: str | None = None) -> str:
        s = GatewaySettings(
            port=1234, lan_interfaces=["lan0"], servers=[], bypass=[], udp_port=PORT
        )
        text = text or render_gateway(s)
        self.router.exec("nft", "-f", "-", input=text)
        return text

    def exchange(self, host: str, port: int, *messages: str) -> list[str]:
        r = self.lan.exec(*program("exchange", host, str(port), *messages), cwd=ROOT)
        return json.loads(r.stdout)

    def counters(self) -> dict:
        """Stop the listener; the counters it printed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return json.loads(out.splitlines()[-1])


@pytest.fixture
def bed() -> Iterator[Bed]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make test installs it)")
    with Netns("ulan") as lan, Netns("urouter", lan.suffix) as router:
        lan.ip("link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", router.name)
        for ns, dev, v4, v6 in (
            (lan, "eth0", LAN_V4, LAN_V6),
            (router, "lan0", ROUTER_V4, ROUTER_V6),
        ):
            ns.ip("addr", "add", f"{v4}/24", "dev", dev)
            ns.ip("-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ns.ip("link", "set", dev, "up")
        lan.ip("route", "add", "default", "via", ROUTER_V4)
        lan.ip("-6", "route", "add", "default", "via", ROUTER_V6)
        s = GatewaySettings(port=1234, udp_port=PORT)
        for cmd in policy_routing_commands(s):
            router.exec(*cmd)
        b = Bed(lan, router)
        b.proc = router.popen(
            program("serve", str(PORT)), stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        wait_listening("[::]", PORT, 10, b.proc, prefix=router.prefix(), udp=True)
        yield b


@pytest.mark.root
@pytest.mark.netns
def test_replies_come_from_the_original_destination(bed: Bed):
    bed.rules()
    for host in (FAR_V4, FAR_V6):
        # the second datagram goes out once the reply socket bound to the destination exists:
        # it must still reach the listener
        assert bed.exchange(host, 5000, "a", "b") == ["echo:a", "echo:b"], host
        assert bed.exchange(host, 5001, "c") == ["echo:c"]
    counters = bed.counters()
    assert counters["tproxy-udp-datagrams"] == 6 and counters["tproxy-udp-replies"] == 6
    assert counters["reply_sockets"]["reply_sockets"] == 4  # one per destination


@pytest.mark.root
@pytest.mark.netns
def test_the_socket_transparent_shortcut_would_swallow_the_lans_datagrams(bed: Bed):
    """Why the UDP chain has no `socket transparent 1` rule, unlike TCP's: with it, a datagram
    to a destination a reply socket is bound to goes to that socket, not to the listener."""
    text = bed.rules().replace(
        "\t\tmeta l4proto udp tproxy",
        "\t\tmeta l4proto udp socket transparent 1 meta mark set 0x10000 accept\n"
        "\t\tmeta l4proto udp tproxy",
    )
    bed.rules(text)
    assert bed.exchange(FAR_V4, 5000, "a", "b") == ["echo:a", "nothing"]


@pytest.mark.root
@pytest.mark.netns
def test_a_datagram_sent_to_the_listener_itself_is_dropped(bed: Bed):
    bed.rules()
    # the router's own address is not handed over (`fib daddr type local`): it arrives as it
    # is, and tunnelling it would send it to itself
    assert bed.exchange(ROUTER_V4, PORT, "loop") == ["nothing"]
    assert bed.exchange(ROUTER_V6, PORT, "loop") == ["nothing"]
    counters = bed.counters()
    assert counters.get("tproxy-udp-no-target") == 2, counters
    assert "tproxy-udp-datagrams" not in counters


def test_original_destination_control_messages():
    v4 = (2).to_bytes(2, "little") + (443).to_bytes(2, "big") + bytes([203, 0, 113, 9]) + bytes(8)
    v6 = (
        (10).to_bytes(2, "little")
        + (3478).to_bytes(2, "big")
        + bytes(4)
        + ipaddress.IPv6Address(FAR_V6).packed
        + bytes(4)
    )
    mapped = v6[:8] + ipaddress.IPv6Address("::ffff:203.0.113.9").packed + bytes(4)
    assert original_destination([(socket.IPPROTO_IP, IP_ORIGDSTADDR, v4)]) == Address(
        ipaddress.ip_address(FAR_V4), 443
    )
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, v6)]) == Address(
        ipaddress.ip_address(FAR_V6), 3478
    )
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, mapped)]) == Address(
        ipaddress.ip_address(FAR_V4), 3478
    )
    assert original_destination([]) is None
    assert original_destination([(socket.IPPROTO_IP, IP_ORIGDSTADDR, v4[:6])]) is None


@pytest.mark.root
@pytest.mark.netns
def test_reply_sockets_are_capped_and_closed_when_idle():
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    now = [0.0]
    with Netns("ureply") as ns, _inside(ns):
        replies = ReplySockets(cap=3, idle=60.0, clock=lambda: now[0])
        origins = [Address(ipaddress.ip_address(FAR_V4), 5000 + i) for i in range(4)]
        first = replies.get(origins[0])
        assert first.getsockname() == (FAR_V4, 5000)  # bound to a foreign address
        assert replies.get(origins[0]) is first  # kept
        for i, o in enumerate(origins[1:], 1):
            now[0] = i
            replies.get(o)
        # the cap: the least recently used went first
        assert len(replies) == 3 and replies.evicted == 1 and first.fileno() == -1
        now[0] = 62.5  # origins 1 and 2 idle for over 60 s, origin 3 for 59.5 s
        assert replies.sweep() == 2 and len(replies) == 1
        replies.close()
        assert len(replies) == 0


@contextlib.contextmanager
def _inside(ns: Netns) -> Iterator[None]:
    """Run this thread's new sockets in `ns` (setns), back to the test's namespace after."""
    libc = ctypes.CDLL(None, use_errno=True)  # os.setns is Python 3.12's

    def setns(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        setns(target)
        yield
    finally:
        setns(own)
        os.close(own)
        os.close(target)


@pytest.mark.root
def test_without_cap_net_admin_one_line_error():
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    from mptun.common.crypto import generate_key

    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable]
    argv += ["-m", "mptun", "client", "--server", "127.0.0.1:1", "--control", "none"]
    r = subprocess.run(
        [*argv, "--tproxy-udp", "127.0.0.1:1236"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        env={**os.environ, "MPTUN_KEY": generate_key()},
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "IP_TRANSPARENT needs CAP_NET_ADMIN" in lines[0], r.stderr
    assert "tproxy-udp" in lines[0]


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(_serve(int(sys.argv[2])))
    elif sys.argv[1] == "exchange":
        _exchange(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
