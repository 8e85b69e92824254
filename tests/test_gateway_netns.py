r"""Router gateway mode in the namespace test bed, with real nftables, curl, dig and dnsmasq.

    lan host ---- router (mptun client --redir/--tproxy/--dns, `mptun nft` ruleset) ==== vps
    192.0.2.2                                                  (mptun server 203.0.113.100)
    fd00:1::2                                                          |
                                                      inet host 203.0.113.2 / fd00:3::2
                                                      (HTTP, dnsmasq, UDP echo on 443)

The VPS also routes the LAN plainly (no NAT), so the inet host tells the two paths apart by the
source address: the VPS's (203.0.113.1 / fd00:3::1) through the tunnel, the LAN host's around it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from mptun.lab.testbed import (
    INET_HOST_V4,
    INET_HOST_V6,
    LAN_HOST_V4,
    LAN_HOST_V6,
    LAN_ROUTER_V4,
    LAN_ROUTER_V6,
    SERVER_V4,
    SERVER_V6,
    VPS_INET_V4,
    VPS_INET_V6,
    Testbed,
)
from tests.helpers import ROOT, wait_listening
from tests.peers import sha256_of_stream

pytestmark = [pytest.mark.root, pytest.mark.netns]

SERVER_PORT = 8443
REDIR_PORT = 1234
TPROXY_PORT = 1235
DNS_PORT = 5353
HTTP_PORT = 8000
VPS_HTTP_PORT = 8001
QUIC_PORT = 443
NAME = "www.example.test"
# The test bed's addresses are documentation and ULA ranges: the default bypass (which holds
# fc00::/7) would keep IPv6 out of the tunnel, so the tests name their own.
TEST_BYPASS = ["127.0.0.0/8", "::1/128", "fe80::/10", "ff00::/8", "224.0.0.0/4"]


def _need_tools(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (make test installs it)")


@dataclass
class Gateway:
    tb: Testbed
    tmp: Path
    key_file: Path
    logs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def lan(self) -> Netns:
        assert self.tb.lan
        return self.tb.lan

    @property
    def router(self) -> Netns:
        assert self.tb.router
        return self.tb.router

    @property
    def vps(self) -> Netns:
        assert self.tb.vps
        return self.tb.vps

    @property
    def inet(self) -> Netns:
        assert self.tb.inet
        return self.tb.inet

    def start(self, name: str, ns: Netns, cmd: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            p = ns.popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs[name] = p
        return p

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def mptun(self, name: str, ns: Netns, *args: str) -> subprocess.Popen:
        return self.start(name, ns, [sys.executable, "-m", "mptun", "--log-level", "debug", *args])

    def client(self, *args: str, server: str = f"{SERVER_V4}:{SERVER_PORT}") -> subprocess.Popen:
        return self.mptun(
            "client",
            self.router,
            "client",
            "--server",
            server,
            "--key-file",
            str(self.key_file),
            *args,
        )

    def load_rules(self, *args: str) -> str:
        text = self.router.exec(
            sys.executable,
            "-m",
            "mptun",
            "nft",
            "--lan",
            "lan0",
            "--server",
            str(SERVER_V4),
            "--server",
            str(SERVER_V6),
            "--no-default-bypass",
            *[a for c in TEST_BYPASS for a in ("--bypass", c)],
            *args,
            cwd=ROOT,
        ).stdout
        path = self.tmp / "rules.nft"
        path.write_text(text)
        self.router.exec("nft", "-f", str(path))
        return text

    def remove_rules(self) -> None:
        self.router.exec("nft", "delete", "table", "inet", "mptun", check=False)

    def sources(self, name: str, kind: str) -> list[str]:
        return [
            line.split()[1]
            for line in self.log(name).splitlines()
            if line.startswith(kind + " ") and len(line.split()) == 2
        ]

    def fetch(self, host: str, size: int = 2_000_000, seed: int = 7) -> tuple[bytes, str]:
        """curl from the LAN host, no proxy settings: (body, the source the server saw)."""
        before = len(self.sources("http", "http"))
        url = f"http://{host}:{HTTP_PORT}/bytes/{size}/{seed}"
        r = self.lan.exec(
            "curl", "-sS", "--noproxy", "*", "--max-time", "30", url, text=False, check=False
        )
        assert r.returncode == 0, r.stderr
        seen = wait_for(lambda: self.sources("http", "http")[before:], "the HTTP peer's log")
        return r.stdout, seen[0]


def wait_for(probe, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = probe()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    _need_tools("nft", "curl")
    tmp = tmp_path_factory.mktemp("gateway")
    key = tmp / "key"
    from mptun.common.crypto import generate_key

    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    with Testbed(rates_mbit=(None,)) as tb:
        g = Gateway(tb, tmp, key)
        srv = g.mptun(
            "server",
            g.vps,
            "server",
            "--listen",
            f"[::]:{SERVER_PORT}",
            "--key-file",
            str(key),
            "--allow-target",
            "203.0.113.0/24",
            "--allow-target",
            "fd00::/8",
        )
        http = g.start(
            "http", g.inet, [sys.executable, "-m", "tests.peers", "http", "--port", str(HTTP_PORT)]
        )
        vhttp = g.start(
            "vps-http",
            g.vps,
            [sys.executable, "-m", "tests.peers", "http", "--port", str(VPS_HTTP_PORT)],
        )
        echo = g.start(
            "udp",
            g.inet,
            [sys.executable, "-m", "tests.peers", "udp-echo", "--port", str(QUIC_PORT)],
        )
        wait_listening("[::]", SERVER_PORT, 10.0, srv, prefix=g.vps.prefix())
        wait_listening("[::]", HTTP_PORT, 10.0, http, prefix=g.inet.prefix())
        wait_listening("[::]", VPS_HTTP_PORT, 10.0, vhttp, prefix=g.vps.prefix())
        wait_listening("[::]", QUIC_PORT, 10.0, echo, prefix=g.inet.prefix(), udp=True)
        yield g


@contextlib.contextmanager
def running_client(gw: Gateway, *args: str, port: int, **kw) -> Iterator[Gateway]:
    """A client on the router for one test; rules and policy routing removed afterwards."""
    p = gw.client(*args, **kw)
    try:
        wait_listening("[::]", port, 10.0, p, prefix=gw.router.prefix())
        yield gw
    finally:
        gw.remove_rules()
        gw.stop("client")


@pytest.fixture
def client(gw: Gateway) -> Iterator[Gateway]:
    """A client with --redir and --dns on the router (the test loads the ruleset it needs)."""
    args = ["--redir", f"[::]:{REDIR_PORT}", "--dns", f"[::]:{DNS_PORT}", "--dns-open"]
    args += ["--dns-upstream", f"{INET_HOST_V4}:53"]
    with running_client(gw, *args, port=REDIR_PORT) as g:
        yield g


def udp_probe(ns: Netns, host: str, port: int) -> str:
    """Send one datagram from `ns` and say what came back: echo, refused or nothing."""
    code = (
        "import socket,sys\n"
        "h, p = sys.argv[1], int(sys.argv[2])\n"
        "s = socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.settimeout(3)\n"
        "s.connect((h, p))\n"
        "s.send(b'quic?')\n"
        "try:\n"
        "    print('echo' if s.recv(100) == b'quic?' else 'other')\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
        "except TimeoutError:\n"
        "    print('nothing')\n"
    )
    return ns.exec(sys.executable, "-c", code, host, str(port)).stdout.strip()


def tcp_outcome(ns: Netns, host: str, port: int) -> str:
    """Connect from `ns`, send a request, report how the connection ended."""
    code = (
        "import socket,sys,time\n"
        "h, p = sys.argv[1], int(sys.argv[2])\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    s = socket.create_connection((h, p), timeout=20)\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "    r = 'data' if s.recv(100) else 'eof'\n"
        "except (ConnectionResetError, BrokenPipeError):\n"
        "    r = 'reset'\n"
        "except TimeoutError:\n"
        "    r = 'timeout'\n"
        "print(r, round(time.monotonic() - t, 3))\n"
    )
    return ns.exec(sys.executable, "-c", code, host, str(port)).stdout.strip()


def test_redirect_ipv4_and_ipv6_through_the_tunnel(client: Gateway):
    g = client
    g.load_rules("--port", str(REDIR_PORT))
    want = sha256_of_stream(2_000_000, 7)
    body, seen = g.fetch(str(INET_HOST_V4))
    assert hashlib.sha256(body).hexdigest() == want
    assert seen == str(VPS_INET_V4), "the inet host should see the VPS, not the LAN host"
    body, seen = g.fetch(f"[{INET_HOST_V6}]")
    assert hashlib.sha256(body).hexdigest() == want
    assert seen == str(VPS_INET_V6)
    log = g.log("client")
    assert f"redir {LAN_HOST_V4}:" in log and f"-> {INET_HOST_V4}:{HTTP_PORT}" in log
    assert f"redir [{LAN_HOST_V6}]:" in log and f"-> [{INET_HOST_V6}]:{HTTP_PORT}" in log


def test_ruleset_loads_reloads_bypasses_and_is_removed(client: Gateway):
    g = client
    g.load_rules("--port", str(REDIR_PORT))
    assert "table inet mptun" in g.router.exec("nft", "list", "tables").stdout
    _, seen = g.fetch(str(INET_HOST_V4))
    assert seen == str(VPS_INET_V4)
    # Loading again replaces the table in one transaction: now the inet host is bypassed.
    g.load_rules(
        "--port",
        str(REDIR_PORT),
        "--bypass",
        f"{INET_HOST_V4}/32",
        "--bypass",
        f"{INET_HOST_V6}/128",
    )
    assert g.router.exec("nft", "list", "tables").stdout.count("mptun") == 1
    body, seen = g.fetch(str(INET_HOST_V4))
    assert seen == str(LAN_HOST_V4), "a bypassed destination is reached directly"
    assert hashlib.sha256(body).hexdigest() == sha256_of_stream(2_000_000, 7)
    _, seen = g.fetch(f"[{INET_HOST_V6}]")
    assert seen == str(LAN_HOST_V6)
    g.router.exec("nft", "delete", "table", "inet", "mptun")
    assert "mptun" not in g.router.exec("nft", "list", "ruleset").stdout
    g.load_rules("--port", str(REDIR_PORT))
    g.remove_rules()
    _, seen = g.fetch(str(INET_HOST_V4))
    assert seen == str(LAN_HOST_V4), "with the table removed, nothing is redirected"


def test_no_loop_to_the_vps_or_the_listener(client: Gateway):
    g = client
    g.load_rules("--port", str(REDIR_PORT))
    before = len(g.sources("vps-http", "http"))
    for host in (str(SERVER_V4), f"[{SERVER_V6}]"):
        url = f"http://{host}:{VPS_HTTP_PORT}/bytes/1000/1"
        r = g.lan.exec("curl", "-sS", "--max-time", "10", "-o", "/dev/null", url, check=False)
        assert r.returncode == 0, r.stderr
    seen = wait_for(lambda: g.sources("vps-http", "http")[before:], "the VPS peer's log")
    wait_for(lambda: len(g.sources("vps-http", "http")[before:]) == 2, "two connections")
    seen = g.sources("vps-http", "http")[before:]
    assert seen == [str(LAN_HOST_V4), str(LAN_HOST_V6)], "connections to the VPS go direct"
    assert f":{VPS_HTTP_PORT}" not in g.log("client")
    # Straight to the listener (not redirected: the router's own address is skipped): refused,
    # never tunnelled back to ourselves.
    for host in (str(LAN_ROUTER_V4), str(LAN_ROUTER_V6)):
        assert tcp_outcome(g.lan, host, REDIR_PORT).split()[0] in ("reset", "eof")
    log = g.log("client")
    assert "is this listener itself" in log
    assert "connected in" not in log


def test_dns_lookup_from_the_lan_goes_through_the_tunnel(client: Gateway):
    _need_tools("dig", "dnsmasq")
    g = client
    dnsmasq = g.start(
        "dnsmasq",
        g.inet,
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={INET_HOST_V4}",
            "--port=53",
            f"--host-record={NAME},{INET_HOST_V4},{INET_HOST_V6}",
            "--local-ttl=60",
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
        ],
    )
    try:
        wait_listening("[::]", 53, 10.0, dnsmasq, prefix=g.inet.prefix(), udp=True)
        g.load_rules("--port", str(REDIR_PORT), "--dns-port", str(DNS_PORT))

        def dig(server: str, qtype: str, *extra: str) -> str:
            r = g.lan.exec(
                "dig", f"@{server}", NAME, qtype, "+short", "+time=5", "+tries=1", *extra
            )
            return r.stdout.strip()

        def asked() -> list[str]:
            return [ln for ln in g.log("dnsmasq").splitlines() if "query[" in ln]

        # Any resolver address the LAN host names is caught by the port-53 redirect...
        assert dig("198.51.100.99", "A") == str(INET_HOST_V4)
        # ... the router's own included (what DHCP hands out), over IPv4 and IPv6.
        assert dig(str(LAN_ROUTER_V6), "AAAA") == str(INET_HOST_V6)
        queries = asked()
        assert len(queries) == 2, queries
        assert all(f"from {VPS_INET_V4}" in q for q in queries), queries
        # Asked again (UDP and TCP): answered from the router's cache, the resolver sees nothing.
        assert dig(str(LAN_ROUTER_V4), "A") == str(INET_HOST_V4)
        assert dig(str(LAN_ROUTER_V4), "A", "+tcp") == str(INET_HOST_V4)
        assert len(asked()) == 2
        full = g.lan.exec("dig", f"@{LAN_ROUTER_V4}", NAME, "A", "+time=5", "+tries=1").stdout
        assert "status: NOERROR" in full and "ANSWER: 1" in full
    finally:
        g.stop("dnsmasq")


def test_block_quic_rejects_udp_443_from_the_lan(client: Gateway):
    g = client
    g.load_rules("--port", str(REDIR_PORT))
    assert udp_probe(g.lan, str(INET_HOST_V4), QUIC_PORT) == "echo"
    assert udp_probe(g.lan, str(INET_HOST_V6), QUIC_PORT) == "echo"
    g.load_rules("--port", str(REDIR_PORT), "--block-quic")
    assert udp_probe(g.lan, str(INET_HOST_V4), QUIC_PORT) == "refused"
    assert udp_probe(g.lan, str(INET_HOST_V6), QUIC_PORT) == "refused"
    # Other UDP still passes (not tunneled: routed as it is).
    assert udp_probe(g.lan, str(INET_HOST_V4), 53) in ("refused", "nothing", "other")


@pytest.mark.timing
def test_server_unreachable_resets_at_once_and_logs_once(gw: Gateway):
    # Nothing listens on port 9 of the VPS: every tunnel attempt is refused.
    with running_client(
        gw, "--redir", f"[::]:{REDIR_PORT}", port=REDIR_PORT, server=f"{SERVER_V4}:9"
    ) as g:
        g.load_rules("--port", str(REDIR_PORT))
        outcomes = [tcp_outcome(g.lan, str(INET_HOST_V4), HTTP_PORT) for _ in range(10)]
        assert all(o.split()[0] == "reset" for o in outcomes), outcomes
        assert max(float(o.split()[1]) for o in outcomes) < 3.0, outcomes
        log = g.log("client").splitlines()
        # one line for the burst of failed tunnels, one for the server's change of state
        lines = [ln for ln in log if "unreachable" in ln and " is down: " not in ln]
        assert len(lines) == 1, lines
        assert len([ln for ln in log if " is down: " in ln]) == 1, log


def test_tproxy_ipv4_and_ipv6(gw: Gateway):
    from mptun.client.nftables import GatewaySettings, policy_routing_commands

    routing = policy_routing_commands(GatewaySettings(port=TPROXY_PORT, mode="tproxy"))
    with running_client(gw, "--tproxy", f"[::]:{TPROXY_PORT}", port=TPROXY_PORT) as g:
        try:
            for cmd in routing:
                g.router.exec(*cmd)
            g.load_rules("--port", str(TPROXY_PORT), "--mode", "tproxy")
            want = sha256_of_stream(2_000_000, 7)
            body, seen = g.fetch(str(INET_HOST_V4))
            assert hashlib.sha256(body).hexdigest() == want
            assert seen == str(VPS_INET_V4)
            body, seen = g.fetch(f"[{INET_HOST_V6}]")
            assert hashlib.sha256(body).hexdigest() == want
            assert seen == str(VPS_INET_V6)
            log = g.log("client")
            assert f"tproxy {LAN_HOST_V4}:" in log and f"tproxy [{LAN_HOST_V6}]:" in log
        finally:
            for cmd in routing:
                g.router.exec(*[("del" if a == "add" else a) for a in cmd], check=False)


def test_forward_fixed_targets(gw: Gateway):
    fwd = [
        "--forward",
        f"{LAN_ROUTER_V4}:8080={INET_HOST_V4}:{HTTP_PORT}",
        "--forward",
        f"[{LAN_ROUTER_V6}]:8080=[{INET_HOST_V6}]:{HTTP_PORT}",
    ]
    with running_client(gw, *fwd, port=8080) as g:
        for host, via in ((str(LAN_ROUTER_V4), VPS_INET_V4), (f"[{LAN_ROUTER_V6}]", VPS_INET_V6)):
            before = len(g.sources("http", "http"))
            url = f"http://{host}:8080/bytes/100000/3"
            r = g.lan.exec("curl", "-sS", "--max-time", "20", url, text=False)
            assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(100_000, 3)
            seen = wait_for(lambda b=before: g.sources("http", "http")[b:], "the HTTP log")
            assert seen[0] == str(via)


@pytest.mark.timing
def test_blackholed_server_fails_fast_after_the_first_timeout(gw: Gateway):
    """The VPS drops the tunnel's SYNs: the first connection waits --connect-timeout, the next
    ones are reset at once until a retry gets through; when the VPS answers again, it does."""
    drop = ["nft", "add", "rule", "inet", "blackhole", "input", "tcp", "dport", str(SERVER_PORT)]
    gw.vps.exec("nft", "add", "table", "inet", "blackhole")
    gw.vps.exec(
        "nft", "add", "chain", "inet", "blackhole", "input",
        "{ type filter hook input priority 0; policy accept; }",
    )  # fmt: skip
    gw.vps.exec(*drop, "drop")
    try:
        args = ["--redir", f"[::]:{REDIR_PORT}", "--connect-timeout", "2"]
        with running_client(gw, *args, port=REDIR_PORT) as g:
            g.load_rules("--port", str(REDIR_PORT))
            first = tcp_outcome(g.lan, str(INET_HOST_V4), HTTP_PORT).split()
            assert first[0] == "reset" and 1.5 < float(first[1]) < 5, first
            burst = concurrent_outcomes(g.lan, str(INET_HOST_V4), HTTP_PORT, 10)
            # at once: none waits the --connect-timeout of 2 s the first one waited
            assert all(o[0] == "reset" and o[1] < 2.0 for o in burst), burst
            log = g.log("client").splitlines()
            # one line for the burst of failed tunnels, one for the server's change of state
            lines = [ln for ln in log if "unreachable" in ln and " is down: " not in ln]
            assert len(lines) == 1, lines
            assert len([ln for ln in log if " is down: " in ln]) == 1, log
            gw.vps.exec("nft", "delete", "table", "inet", "blackhole")

            def through() -> bool:
                return tcp_outcome(g.lan, str(INET_HOST_V4), HTTP_PORT).startswith("data")

            wait_for(through, "a tunnel once the VPS answers again", timeout=15)
    finally:
        gw.vps.exec("nft", "delete", "table", "inet", "blackhole", check=False)


def concurrent_outcomes(ns: Netns, host: str, port: int, n: int) -> list[tuple[str, float]]:
    """`n` connections at once from `ns`: how each ended and after how many seconds."""
    code = (
        "import socket, sys, threading, time\n"
        "h, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
        "out = []\n"
        "def one():\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        s = socket.create_connection((h, p), timeout=20)\n"
        "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
        "        r = 'data' if s.recv(100) else 'eof'\n"
        "    except (ConnectionResetError, BrokenPipeError):\n"
        "        r = 'reset'\n"
        "    except TimeoutError:\n"
        "        r = 'timeout'\n"
        "    out.append(f'{r} {time.monotonic() - t:.3f}')\n"
        "ts = [threading.Thread(target=one) for _ in range(n)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "print('\\n'.join(out))\n"
    )
    out = ns.exec(sys.executable, "-c", code, host, str(port), str(n)).stdout.split("\n")
    return [(line.split()[0], float(line.split()[1])) for line in out if line.strip()]
