r"""`--when-down`: what redirected TCP, SOCKS and DNS get while every server is down.

    lan host ---- router: mptun client --redir/--socks/--dns, nft `redirect`, no server answering
    192.0.2.2     192.0.2.1; the destination 203.0.113.2 (HTTP :8000, DNS over TCP :53) on its lo

The router's nftables redirect the LAN's TCP to port 8000 to the client's --redir listener, as
`mptun nft` does; the client's one server is stopped (nothing listens on its port). By default
(reject) every connection is refused at once; with `--when-down direct` the router connects to
the destination itself (the HTTP peer sees the router's address, not the LAN host's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from tests.helpers import ROOT, wait_listening, wait_until

pytestmark = [pytest.mark.root, pytest.mark.netns]

DEST = "203.0.113.2"
HTTP_PORT, DNS_UPSTREAM_PORT = 8000, 53
REDIR_PORT, SOCKS_PORT, DNS_PORT = 1234, 1080, 5353
SERVER = "127.0.0.1:18443"  # nothing listens there: the server is stopped

# Connect from the LAN host, send a request, say how it ended and how long it took.
TCP_OUTCOME = """
import socket, sys, time
t = time.monotonic()
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    s.sendall(b"GET /bytes/5000/9 HTTP/1.0\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    r = "data" if len(data) > 5000 else "eof"
except (ConnectionResetError, BrokenPipeError):
    r = "reset"
except TimeoutError:
    r = "timeout"
print(r, round(time.monotonic() - t, 3))
"""

# One DNS query for www.example.test A over UDP: the RCODE and the seconds it took.
DNS_QUERY = """
import socket, struct, sys, time
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"\\x03www\\x07example\\x04test\\x00" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(20)
t = time.monotonic()
s.sendto(q, ("127.0.0.1", int(sys.argv[1])))
a = s.recv(4096)
print(a[3] & 0x0F, struct.unpack_from("!H", a, 6)[0], round(time.monotonic() - t, 3))
"""


@dataclass
class Router:
    lan: Netns
    rtr: Netns
    tmp: Path
    key: Path
    logs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, ns: Netns, *cmd: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as f:
            p = ns.popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def http_sources(self) -> list[str]:
        return [ln.split()[1] for ln in self.log("http").splitlines() if ln.startswith("http ")]


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("when-down")
    from mptun.common.crypto import generate_key

    key = tmp / "key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    with Netns("rtr") as rtr, Netns("lan", rtr.suffix) as lan:
        rtr.ip("link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", lan.name)
        rtr.ip("addr", "add", "192.0.2.1/24", "dev", "lan0")
        rtr.ip("link", "set", "lan0", "up")
        lan.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
        lan.ip("link", "set", "eth0", "up")
        lan.ip("route", "add", "default", "via", "192.0.2.1")
        rtr.ip("addr", "add", f"{DEST}/32", "dev", "lo")
        rules = (
            "table ip whendown {\n chain pre {\n  type nat hook prerouting priority dstnat;\n"
            f'  iifname "lan0" tcp dport {HTTP_PORT} redirect to :{REDIR_PORT}\n }}\n}}\n'
        )
        rtr.exec("nft", "-f", "-", input=rules)
        r = Router(lan, rtr, tmp, key)
        peers = [sys.executable, "-m", "tests.peers"]
        http = r.start("http", rtr, *peers, "http", "--port", str(HTTP_PORT))
        dns = r.start("dns", rtr, *peers, "dns", "--bind", DEST, "--port", str(DNS_UPSTREAM_PORT))
        wait_listening("[::]", HTTP_PORT, 10.0, http, prefix=rtr.prefix())
        wait_listening(DEST, DNS_UPSTREAM_PORT, 10.0, dns, prefix=rtr.prefix())
        yield r


def client(r: Router, *args: str) -> subprocess.Popen:
    """The client on the router, its one server down (known down once its checks failed)."""
    p = r.start(
        "client", r.rtr, sys.executable, "-m", "mptun", "--log-level", "debug", "client",
        "--server", SERVER, "--key-file", str(r.key), "--redir", f"0.0.0.0:{REDIR_PORT}",
        "--socks", f"127.0.0.1:{SOCKS_PORT}", "--dns", f"127.0.0.1:{DNS_PORT}",
        "--dns-upstream", f"{DEST}:{DNS_UPSTREAM_PORT}", "--dns-cache", "0", *args,
    )  # fmt: skip
    wait_listening("127.0.0.1", SOCKS_PORT, 10.0, p, prefix=r.rtr.prefix())

    def down() -> bool:
        out = r.rtr.exec(sys.executable, "-m", "mptun", "status", "--json", cwd=ROOT).stdout
        return [s["state"] for s in json.loads(out)["clients"][0]["servers"]] == ["down"]

    wait_until(down, 15, "the server known down")
    return p


def stop_client(r: Router) -> None:
    p = r.procs.pop("client")
    p.terminate()
    p.wait(15)


def redirected(r: Router) -> tuple[str, float]:
    out = r.lan.exec(sys.executable, "-c", TCP_OUTCOME, DEST, str(HTTP_PORT)).stdout.split()
    return out[0], float(out[1])


def socks(r: Router) -> tuple[int, float]:
    """curl through the SOCKS listener: (curl's exit status, seconds)."""
    t = time.monotonic()
    url = f"http://{DEST}:{HTTP_PORT}/bytes/5000/9"
    cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", "20"]
    done = r.rtr.exec(*cmd, "--socks5", f"127.0.0.1:{SOCKS_PORT}", url, check=False)
    return done.returncode, time.monotonic() - t


def dns(r: Router) -> tuple[int, int, float]:
    out = r.rtr.exec(sys.executable, "-c", DNS_QUERY, str(DNS_PORT)).stdout.split()
    return int(out[0]), int(out[1]), float(out[2])


BLACKHOLE = (
    "table inet blackhole {\n chain in {\n  type filter hook input priority 0;\n"
    f"  tcp dport {SERVER.rsplit(':', 1)[1]} drop\n }}\n}}\n"
)


@pytest.mark.timing
@pytest.mark.parametrize("server", ["stopped", "blackholed"])
def test_every_server_down_rejects_at_once(router: Router, server: str):
    """Stopped: its port refuses; blackholed: its packets are dropped, so a connect to it would
    wait out --connect-timeout; once the checks know it down, neither delays anything."""
    r = router
    if server == "blackholed":
        r.rtr.exec("nft", "-f", "-", input=BLACKHOLE)
    try:
        client(r)
    except BaseException:
        r.rtr.exec("nft", "delete", "table", "inet", "blackhole", check=False)
        raise
    try:
        for _ in range(3):
            how, took = redirected(r)
            assert how == "reset" and took < 1.0, (how, took, r.log("client")[-2000:])
            code, took = socks(r)
            assert code == 97 and took < 1.0, (code, took)  # 97: the SOCKS server refused
            rcode, answers, took = dns(r)
            assert (rcode, answers) == (2, 0) and took < 1.0  # SERVFAIL
        assert not r.http_sources(), "nothing may leak to the direct path"
        log = r.log("client")
        assert "every server is down (--when-down reject); resetting" in log
        assert log.count(f"server {SERVER} is down") == 1
    finally:
        stop_client(r)
        r.rtr.exec("nft", "delete", "table", "inet", "blackhole", check=False)


@pytest.mark.timing
def test_every_server_down_goes_direct_when_told(router: Router):
    r = router
    client(r, "--when-down", "direct")
    try:
        before = len(r.http_sources())
        how, took = redirected(r)
        assert how == "data" and took < 5, (how, took, r.log("client")[-2000:])
        # the router made the connection, to the original destination: not the LAN host's
        assert r.http_sources()[before:] == [DEST]
        code, took = socks(r)
        assert code == 0 and took < 5
        rcode, answers, took = dns(r)
        assert (rcode, answers) == (0, 1) and took < 5
        assert "every server is down: direct (--when-down direct)" in r.log("client")
    finally:
        stop_client(r)
