r"""The router gateway's transparent UDP on the multipath test bed, through the real tunnel.

    lan host ---- router: mptun client --redir/--tproxy-udp, `mptun nft --udp-port` ==3== vps
    192.0.2.2, 192.0.2.3 (bypassed)                    (mptun server 203.0.113.100)     |
    fd00:1::2                                                        inet host 203.0.113.2
                                                                     fd00:3::2 (the peers)

The VPS also routes the LAN plainly (no NAT), so the inet host tells the two paths apart by the
source address: the VPS's (203.0.113.1 / fd00:3::1) through the tunnel, the LAN host's around it.
The peers are this module run as a program (`python -m tests.test_udp_gateway peer ...`): a
UDP echo that says whom it saw, an HTTP/3 server (aioquic) and their LAN-side clients.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import itertools
import json
import random
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.client.nftables import GatewaySettings, policy_routing_commands
from mptun.lab.netns import have_mptcp, have_netns
from mptun.lab.rig import Rig, mptun_argv
from mptun.lab.testbed import (
    INET_HOST_V4,
    INET_HOST_V6,
    LAN_HOST_V4,
    SERVER_V4,
    SERVER_V6,
    VPS_INET_V4,
    VPS_INET_V6,
    Testbed,
)
from mptun.lab.wait import wait_listening, wait_until
from tests.helpers import ROOT

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.usefixtures("needs_mptcp_testbed")]

REDIR_PORT = 1234
UDP_PORT = 1236
WHOAMI_PORTS = (7000, 7001)  # the peer answers "HOST PORT" of the source it saw, then the data
ECHO_PORT = 7002  # the peer echoes the data as it is (the voice flow)
BYPASS_PORT = 7009  # --bypass-udp-port: the same echo, around the tunnel
H3_PORT = 4433
H3_NAME = "h3.example.test"
BYPASSED_HOST = "192.0.2.3"  # a second address of the LAN host, --bypass-source
TEST_BYPASS = ["127.0.0.0/8", "::1/128", "fe80::/10", "ff00::/8", "224.0.0.0/4"]


# -- the programs (run in the namespaces as `python -m tests.test_udp_gateway KIND ...`) ---------
def serve_peer() -> None:
    """The inet host's UDP peer: whoami on WHOAMI_PORTS, plain echo on ECHO_PORT/BYPASS_PORT."""
    socks = {}
    for port in (*WHOAMI_PORTS, ECHO_PORT, BYPASS_PORT):
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        socks[s] = port
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(list(socks), [], [])
        for s in ready:
            data, addr = s.recvfrom(65535)
            host = addr[0].removeprefix("::ffff:")
            if socks[s] in WHOAMI_PORTS:
                data = f"{host} {addr[1]}\n".encode() + data
            s.sendto(data, addr)


def ask(targets: list[str], bind: str | None, timeout: float = 5.0) -> None:
    """From one socket, one datagram to each HOST:PORT: print what each peer saw (JSON)."""
    out = []
    first = targets[0].rpartition(":")[0].strip("[]")
    family = socket.AF_INET6 if ":" in first else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((bind or ("::" if family == socket.AF_INET6 else "0.0.0.0"), 0))
    s.settimeout(timeout)
    for i, t in enumerate(targets):
        host, _, port = t.rpartition(":")
        addr = (host.strip("[]"), int(port))
        token = f"q{i}".encode()
        reply, source = b"", None
        for _ in range(3):  # the first datagram may wait for the association to open
            s.sendto(token, addr)
            try:
                while True:
                    reply, source = s.recvfrom(65535)
                    if reply.endswith(token):
                        break
            except TimeoutError:
                continue
            break
        seen = reply.decode().split("\n")[0] if reply else ""
        out.append(
            {
                "target": t,
                "seen": seen,
                "from": list(source[:2]) if source else None,
                "ok": bool(reply),
            }
        )
    print(json.dumps({"local": list(s.getsockname()[:2]), "answers": out}))


def voice(host: str, port: int, seconds: float, pps: int = 50, size: int = 160) -> None:
    """A voice-like flow: `pps` datagrams a second of `size` bytes to an echo, each way; prints
    the arrival time and round trip of every echo (JSON)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(0.2)
    arrivals: list[tuple[float, float]] = []
    end = time.monotonic() + seconds
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = s.recv(2048)
            except (TimeoutError, ConnectionRefusedError):
                continue
            now = time.monotonic()
            sent = float(data[8:32].decode())
            arrivals.append((now, now - sent))

    t = threading.Thread(target=receive)
    t.start()
    n = 0
    start = time.monotonic()
    while time.monotonic() < end:
        pad = size - 32
        s.send(n.to_bytes(8, "big") + f"{time.monotonic():24.6f}".encode() + b"v" * pad)
        n += 1
        time.sleep(max(0.0, start + n / pps - time.monotonic()))
    time.sleep(1.0)
    stop.set()
    t.join()
    print(json.dumps({"sent": n, "start": start, "arrivals": arrivals}))


def _pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _h3_serve(port: int, cert: str, key: str) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import ProtocolNegotiated

    class Server(QuicConnectionProtocol):
        h3: H3Connection | None = None

        def quic_event_received(self, event) -> None:
            if isinstance(event, ProtocolNegotiated):
                self.h3 = H3Connection(self._quic)
            if self.h3 is None:
                return
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    path = dict(ev.headers)[b":path"].decode()
                    _, _, size, seed = path.split("/")
                    body = _pattern(int(size), int(seed))
                    peer = self._quic._network_paths[0].addr
                    print(f"h3 {peer[0].removeprefix('::ffff:')} {path}", flush=True)
                    self.h3.send_headers(
                        ev.stream_id,
                        [(b":status", b"200"), (b"content-length", str(len(body)).encode())],
                    )
                    self.h3.send_data(ev.stream_id, body, end_stream=True)
                    self.transmit()

    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(cert, key)
    await serve("::", port, configuration=config, create_protocol=Server)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _h3_get(host: str, port: int, cafile: str, path: str) -> None:
    from aioquic.asyncio import QuicConnectionProtocol, connect
    from aioquic.h3.connection import H3_ALPN, H3Connection
    from aioquic.h3.events import DataReceived, HeadersReceived
    from aioquic.quic.configuration import QuicConfiguration

    class Client(QuicConnectionProtocol):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.h3 = H3Connection(self._quic)
            self.body = bytearray()
            self.status = b""
            self.done = asyncio.Event()

        def quic_event_received(self, event) -> None:
            for ev in self.h3.handle_event(event):
                if isinstance(ev, HeadersReceived):
                    self.status = dict(ev.headers).get(b":status", b"")
                elif isinstance(ev, DataReceived):
                    self.body += ev.data
                if getattr(ev, "stream_ended", False):
                    self.done.set()

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=H3_NAME)
    config.load_verify_locations(cafile)
    async with connect(host, port, configuration=config, create_protocol=Client) as c:
        assert isinstance(c, Client)
        sid = c._quic.get_next_available_stream_id()
        c.h3.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", H3_NAME.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        c.transmit()
        await asyncio.wait_for(c.done.wait(), 60)
        digest = hashlib.sha256(bytes(c.body)).hexdigest()
        print(json.dumps({"status": c.status.decode(), "bytes": len(c.body), "sha256": digest}))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="kind", required=True)
    sub.add_parser("peer")
    a = sub.add_parser("ask")
    a.add_argument("targets", nargs="+")
    a.add_argument("--bind")
    v = sub.add_parser("voice")
    v.add_argument("host")
    v.add_argument("port", type=int)
    v.add_argument("seconds", type=float)
    h = sub.add_parser("h3-serve")
    h.add_argument("cert")
    h.add_argument("key")
    g = sub.add_parser("h3-get")
    g.add_argument("host")
    g.add_argument("cafile")
    g.add_argument("path")
    o = p.parse_args()
    if o.kind == "peer":
        serve_peer()
    elif o.kind == "ask":
        ask(o.targets, o.bind)
    elif o.kind == "voice":
        voice(o.host, o.port, o.seconds)
    elif o.kind == "h3-serve":
        asyncio.run(_h3_serve(H3_PORT, o.cert, o.key))
    elif o.kind == "h3-get":
        asyncio.run(_h3_get(o.host, H3_PORT, o.cafile, o.path))


# -- the test bed ---------------------------------------------------------------------------------
def program(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_udp_gateway", *args]


class UdpGateway:
    """The rig with UDP capture on: rules loaded, policy routing, the peers on the inet host."""

    def __init__(self, tb: Testbed, r: Rig, tmp: Path) -> None:
        self.tb, self.r, self.tmp = tb, r, tmp
        assert tb.lan and tb.router and tb.vps and tb.inet
        self.lan, self.router, self.vps, self.inet = tb.lan, tb.router, tb.vps, tb.inet

    def rules(self, *extra: str) -> str:
        argv = mptun_argv(
            "nft", "--lan", "lan0", "--server", str(SERVER_V4), "--server", str(SERVER_V6),
            "--no-default-bypass", *[a for c in TEST_BYPASS for a in ("--bypass", c)],
            "--port", str(REDIR_PORT), "--udp-port", str(UDP_PORT), *extra,
        )  # fmt: skip
        text = self.router.exec(*argv, cwd=ROOT).stdout
        self.router.exec("nft", "-f", "-", input=text)
        return text

    def ask(self, *targets: str, bind: str | None = None) -> dict:
        extra = ["--bind", bind] if bind else []
        r = self.lan.exec(*program("ask", *targets, *extra), cwd=ROOT)
        return json.loads(r.stdout)

    def client_log(self) -> str:
        return self.r.logs["client"].read_text(errors="replace")


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[UdpGateway]:
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    tmp = tmp_path_factory.mktemp("udpgw")
    args = ["--redir", f"[::]:{REDIR_PORT}", "--tproxy-udp", f"[::]:{UDP_PORT}"]
    with Testbed() as tb:
        r = Rig(tb, tmp, client_args=[*args, "--log-connections"])
        try:
            r.start()
            g = UdpGateway(tb, r, tmp)
            g.lan.ip("addr", "add", f"{BYPASSED_HOST}/24", "dev", "eth0")
            for cmd in policy_routing_commands(GatewaySettings(port=REDIR_PORT, udp_port=UDP_PORT)):
                g.router.exec(*cmd)
            g.rules("--bypass-source", BYPASSED_HOST, "--bypass-udp-port", str(BYPASS_PORT))
            peer = g.inet.popen(
                program("peer"), stdout=r.log("peer"), stderr=subprocess.STDOUT, cwd=ROOT
            )
            wait_listening("[::]", ECHO_PORT, 15, peer, prefix=g.inet.prefix(), udp=True)
            yield g
        finally:
            r.close()
            print(r.dump_logs()[-6000:])


def test_udp_through_the_tunnel_ipv4_and_ipv6_with_one_mapping(gw: UdpGateway):
    """Replies come back from the address the LAN host sent to (its socket would drop others);
    the inet host sees the VPS, and one LAN socket keeps one public address and port for both
    of the host's ports (RFC 4787 endpoint-independent mapping)."""
    for inet, vps in (
        (str(INET_HOST_V4), str(VPS_INET_V4)),
        (f"[{INET_HOST_V6}]", str(VPS_INET_V6)),
    ):
        got = gw.ask(*(f"{inet}:{p}" for p in WHOAMI_PORTS))
        answers = got["answers"]
        assert all(a["ok"] for a in answers), got
        for a, port in zip(answers, WHOAMI_PORTS, strict=True):
            assert a["from"] == [inet.strip("[]"), port], "the reply must come from the target"
        seen = {a["seen"] for a in answers}
        assert len(seen) == 1, f"two ports of one host saw two mappings: {seen}"
        host, _port = seen.pop().split()
        assert host == vps, f"the inet host saw {host}, not the VPS"
    log = gw.client_log()
    assert f"{LAN_HOST_V4}" in log


def test_bypassed_host_and_port_leave_directly(gw: UdpGateway):
    got = gw.ask(f"{INET_HOST_V4}:{WHOAMI_PORTS[0]}", bind=BYPASSED_HOST)
    (a,) = got["answers"]
    assert a["ok"] and a["seen"].split()[0] == BYPASSED_HOST, got
    # the bypassed port, from the usual host: the echo comes back, around the tunnel
    got = gw.ask(f"{INET_HOST_V4}:{WHOAMI_PORTS[0]}", f"{INET_HOST_V4}:{BYPASS_PORT}")
    tunneled, bypassed = got["answers"]
    assert tunneled["seen"].split()[0] == str(VPS_INET_V4), got
    assert bypassed["ok"] and bypassed["from"] == [str(INET_HOST_V4), BYPASS_PORT], got


def _certificate(tmp: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for H3_NAME (its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, H3_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(H3_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "h3.pem", tmp / "h3.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_http3_fetch_through_the_gateway(gw: UdpGateway):
    pytest.importorskip("aioquic", reason="aioquic is not installed (pip install aioquic)")
    cert, key = _certificate(gw.tmp)
    log = gw.r.log("h3")
    srv = gw.inet.popen(program("h3-serve", str(cert), str(key)), stdout=log, cwd=ROOT)
    try:
        wait_listening("[::]", H3_PORT, 15, srv, prefix=gw.inet.prefix(), udp=True)
        size, seed = 1_000_000, 5
        argv = program("h3-get", str(INET_HOST_V4), str(cert), f"/bytes/{size}/{seed}")
        r = gw.lan.exec(*argv, cwd=ROOT)
        got = json.loads(r.stdout)
        assert got["status"] == "200", got
        assert got["bytes"] == size
        assert got["sha256"] == hashlib.sha256(_pattern(size, seed)).hexdigest()
        seen = wait_until(
            lambda: [ln for ln in gw.r.logs["h3"].read_text().splitlines() if ln.startswith("h3 ")],
            10,
            "the HTTP/3 server's log",
        )
        assert seen[0].split()[1] == str(VPS_INET_V4), seen
    finally:
        srv.terminate()
        srv.wait(10)


IPERF_PORT = 5201
OFFERED_MBIT = 150
IPERF_SECONDS = 16


def _voice_pair(gw: UdpGateway, seconds: float) -> tuple[subprocess.Popen, subprocess.Popen]:
    """The voice flow through the tunnel (ECHO_PORT) and around it (BYPASS_PORT), at once."""
    flows = []
    for port in (ECHO_PORT, BYPASS_PORT):
        argv = program("voice", str(INET_HOST_V4), str(port), str(seconds))
        flows.append(gw.lan.popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT))
    return flows[0], flows[1]


def _rtts(proc: subprocess.Popen, after: float = 0.0) -> list[float]:
    out, _ = proc.communicate(timeout=60)
    got = json.loads(out)
    return sorted(rtt for t, rtt in got["arrivals"] if t >= got["start"] + after)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _added_latency(label: str, tunnel: list[float], direct: list[float]) -> None:
    """Prints the round trip of the voice flow through the tunnel against the plain route."""
    assert tunnel and direct, (len(tunnel), len(direct))
    print(
        f"voice round trip {label}: tunnel p50 {_pct(tunnel, 0.5):.1f} ms p99 "
        f"{_pct(tunnel, 0.99):.1f} ms; routed p50 {_pct(direct, 0.5):.1f} ms p99 "
        f"{_pct(direct, 0.99):.1f} ms; added p50 {_pct(tunnel, 0.5) - _pct(direct, 0.5):.1f} ms "
        f"p99 {_pct(tunnel, 0.99) - _pct(direct, 0.99):.1f} ms"
    )


@pytest.mark.slow
@pytest.mark.timing
def test_iperf3_udp_at_150_mbit_over_three_uplinks(gw: UdpGateway):
    """iperf3 -u from the LAN host at 150 Mbit/s, more than any one uplink (100/60/40) carries:
    at least 0.85 of it arrives, over the steady windows together and in the median window, at
    a rate no single uplink reaches.
    Also prints the voice flow's added latency, idle and under this load (a figure)."""
    if subprocess.run(["which", "iperf3"], capture_output=True).returncode != 0:
        pytest.skip("iperf3 is not installed (make test installs it)")
    srv = gw.inet.popen(
        ["iperf3", "-s", "-J", "-p", str(IPERF_PORT)],
        stdout=gw.r.log("iperf3"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening("[::]", IPERF_PORT, 15, srv, prefix=gw.inet.prefix())
        tunnel, direct = _voice_pair(gw, 5)
        _added_latency("idle", _rtts(tunnel, 1.0), _rtts(direct, 1.0))
        client = gw.lan.popen(
            [
                "iperf3", "-c", str(INET_HOST_V4), "-p", str(IPERF_PORT), "-u",
                "-b", f"{OFFERED_MBIT}M", "-l", "1400", "-t", str(IPERF_SECONDS), "-J",
                # the receiver's socket buffer (iperf3 sends it to the server) at 2 MB, not the
                # default 208 KB (~7 ms at this rate): on a loaded machine the iperf3 server
                # itself was dropping there (RcvbufErrors in the inet host's /proc/net/snmp)
                "-w", "2M",
                "--get-server-output",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        tunnel, direct = _voice_pair(gw, IPERF_SECONDS - 2)
        # the first 3 s: iperf3's own start and the association's subflows joining
        _added_latency("under iperf3 -u load", _rtts(tunnel, 3.0), _rtts(direct, 3.0))
        out, err = client.communicate(timeout=IPERF_SECONDS + 60)
        assert client.returncode == 0, (out[-2000:], err[-2000:])
    finally:
        srv.terminate()
        srv.wait(10)
    report = json.loads(out)
    server = report["server_output_json"]
    remote = server["start"]["connected"][0]["remote_host"].removeprefix("::ffff:")
    assert remote == str(VPS_INET_V4), "the internet host must see the VPS"
    windows = [
        iv["sum"]
        for iv in server["intervals"]
        if iv["sum"]["start"] >= 2 and iv["sum"]["end"] <= IPERF_SECONDS - 1
    ]
    assert len(windows) >= IPERF_SECONDS - 5, server["intervals"]
    rates = [w["bits_per_second"] / 1e6 for w in windows]
    total = sum(w["bytes"] for w in windows) * 8 / sum(w["seconds"] for w in windows) / 1e6
    # Of what the sender offered (its datagrams carry sequence numbers: `packets` is what the
    # window should have held, `lost_packets` what never came), the share delivered. Measured
    # against the offer, not the nominal 150 Mbit/s: an iperf3 sender starved by a loaded
    # machine offers less, then catches up in a burst, which is no fault of the tunnel's.
    shares = [1 - w["lost_packets"] / w["packets"] for w in windows if w["packets"]]
    delivered = 1 - sum(w["lost_packets"] for w in windows) / sum(w["packets"] for w in windows)
    print(
        f"iperf3 -u {OFFERED_MBIT} Mbit/s: {total:.1f} Mbit/s delivered over "
        f"{len(windows)} s (windows {min(rates):.1f}-{max(rates):.1f}, median "
        f"{statistics.median(rates):.1f}), {delivered:.3f} of the datagrams offered (median "
        f"window {statistics.median(shares):.3f}); client counters: {_udp_counters(gw)}"
    )
    assert delivered >= 0.85
    assert statistics.median(shares) >= 0.85
    # more than the fastest uplink can carry: the association used several
    fastest = max(u.rate_mbit or 0 for u in gw.tb.uplinks)
    assert total > fastest


def _udp_counters(gw: UdpGateway) -> dict:
    counters = gw.r.status()["clients"][0].get("counters", {})
    return {k: v for k, v in counters.items() if "udp" in k}


def restore_first_uplink(gw: UdpGateway) -> None:
    """Uplink 1 up again as the test bed made it: a link going down takes its routes and its
    IPv6 addresses (net.ipv6.conf.*.keep_addr_on_down is 0) with it; then the uplink's
    endpoint and table (`mptun uplinks`)."""
    up = gw.tb.uplinks[0]
    gw.tb.set_link(up, "up")
    for ns, dev, addr in ((gw.router, up.router_if, up.router_v6), (gw.vps, up.vps_if, up.vps_v6)):
        ns.ip("-6", "addr", "replace", f"{addr}/64", "dev", dev, "nodad")
    gw.router.ip("route", "replace", "default", "via", str(up.vps_v4), "dev", up.router_if)
    gw.router.ip("-6", "route", "replace", "default", "via", str(up.vps_v6), "dev", up.router_if)
    gw.vps.ip("route", "replace", "192.0.2.0/24", "via", str(up.router_v4))
    gw.vps.ip("-6", "route", "replace", "fd00:1::/64", "via", str(up.router_v6))
    gw.r.configure_uplinks()


@pytest.mark.slow
@pytest.mark.timing
def test_voice_flow_keeps_running_when_its_first_subflows_uplink_goes_down(gw: UdpGateway):
    """50 datagrams/s of 160 bytes each way; its association's first subflow leaves by the
    router's default route (wan1), which goes down (both ends) mid-call.

    The bound: MPTCP re-sends what the dead subflow held on another one when its own
    retransmission timer fires, one subflow RTO (at least TCP_RTO_MIN, 200 ms:
    include/net/tcp.h; __mptcp_retrans in net/mptcp/protocol.c skips subflows that still hold
    unacknowledged data), and stops scheduling on a subflow marked stale after
    net.mptcp.stale_loss_cnt (4) such periods without progress (net/mptcp/pm_netlink.c). Two
    timer periods and a relay on a loaded machine stay well under 1 s."""
    up1 = gw.tb.uplinks[0]
    route = gw.router.exec("ip", "route", "get", str(SERVER_V4)).stdout
    assert f"dev {up1.router_if}" in route, f"new tunnels should start on {up1.router_if}: {route}"
    seconds = 14.0
    flow = gw.lan.popen(
        program("voice", str(INET_HOST_V4), str(ECHO_PORT), str(seconds)),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        # down once the call runs on every subflow (the association is listed in the status)
        wait_until(lambda: gw.r.status()["clients"][0].get("udp"), 10, "the voice association")
        time.sleep(4)  # the call's steady state before the failure (what is measured is after)
        gw.tb.set_link(up1, "down")
        t_down = time.monotonic()
        out, _ = flow.communicate(timeout=seconds + 30)
    finally:
        restore_first_uplink(gw)
    got = json.loads(out)
    times = [t for t, _ in got["arrivals"]]
    assert times, got
    gaps = [(b - a, a) for a, b in itertools.pairwise(times)]
    longest, at = max(gaps)
    after = [t for t in times if t > t_down]
    rtts = sorted(rtt for _, rtt in got["arrivals"])
    print(
        f"voice over failover: {len(times)}/{got['sent']} echoes, longest gap {longest:.3f} s "
        f"({at - t_down:+.2f} s from the link going down), round trip p50 "
        f"{_pct(rtts, 0.5):.1f} ms p99 {_pct(rtts, 0.99):.1f} ms"
    )
    assert times[-1] - t_down > seconds - 6, "the call must go on after the uplink went down"
    assert len(after) >= 0.8 * 50 * (times[-1] - t_down), "most of the call after the failure"
    assert longest <= 1.0


if __name__ == "__main__":
    main()
