"""Network-namespace tier: the test bed itself, and the tunnel's TCP fallback without MPTCP."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_mptcp, have_netns
from mptun.lab.testbed import INET_HOST_V4, INET_HOST_V6, SERVER_V4, SERVER_V6, Testbed
from tests.helpers import need, wait_listening

pytestmark = [pytest.mark.root, pytest.mark.netns]


@pytest.fixture(autouse=True)
def _requirements():
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    ok, why = have_mptcp()
    if not ok:
        pytest.skip(why)


def test_testbed_connectivity_and_cleanup(tmp_path: Path):
    need("curl")
    with Testbed() as tb:
        names = {n.name for n in tb.namespaces}
        assert len(names) == 4
        srv = tb.inet.popen(
            [sys.executable, "-m", "http.server", "-b", "::", "8000", "-d", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        vsrv = tb.vps.popen(
            [sys.executable, "-m", "http.server", "-b", "::", "8001", "-d", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening("[::]", 8000, proc=srv, prefix=tb.inet.prefix())
        wait_listening("[::]", 8001, proc=vsrv, prefix=tb.vps.prefix())
        for ns, url in [
            (tb.lan, f"http://{INET_HOST_V4}:8000/"),
            (tb.lan, f"http://[{INET_HOST_V6}]:8000/"),
            (tb.router, f"http://{SERVER_V4}:8001/"),
            (tb.router, f"http://[{SERVER_V6}]:8001/"),
        ]:
            r = ns.exec(
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                url,
                check=False,
            )
            assert r.stdout == "200", (ns.name, url, r.stderr)
        assert tb.vps.exec("sysctl", "-n", "net.ipv4.tcp_congestion_control").stdout.strip() == (
            "reno"
        )
        assert "tbf" in tb.router.exec("tc", "qdisc", "show", "dev", "wan1").stdout
    left = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    )
    assert not names & left
    assert srv.poll() is not None and vsrv.poll() is not None


def test_tcp_fallback_when_mptcp_disabled(tmp_path: Path, key_file: Path):
    """net.mptcp.enabled=0 in a namespace: both ends warn once and the tunnel runs over TCP."""
    need("curl")
    payload = tmp_path / "f.bin"
    data = hashlib.shake_256(b"fallback").digest(3_000_000)
    payload.write_bytes(data)
    with contextlib.ExitStack() as stack, Netns("fallback") as ns:
        ns.sysctl("net.mptcp.enabled", 0)
        web = ns.popen(
            [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "8000", "-d", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        slog, clog = tmp_path / "s.log", tmp_path / "c.log"
        slog_f, clog_f = stack.enter_context(open(slog, "w")), stack.enter_context(open(clog, "w"))
        srv = ns.popen(
            [
                sys.executable,
                "-m",
                "mptun",
                "--log-level",
                "debug",
                "server",
                "--listen",
                "127.0.0.1:8443",
                "--key-file",
                str(key_file),
                "--allow-target",
                "127.0.0.0/8",
            ],
            stdout=slog_f,
            stderr=subprocess.STDOUT,
        )
        cli = ns.popen(
            [
                sys.executable,
                "-m",
                "mptun",
                "--log-level",
                "debug",
                "client",
                "--server",
                "127.0.0.1:8443",
                "--key-file",
                str(key_file),
                "--socks",
                "127.0.0.1:1080",
            ],
            stdout=clog_f,
            stderr=subprocess.STDOUT,
        )
        for port, p in ((8000, web), (8443, srv), (1080, cli)):
            wait_listening("[::]", port, proc=p, prefix=ns.prefix())
        r = ns.exec(
            "curl",
            "-s",
            "--max-time",
            "30",
            "--socks5",
            "127.0.0.1:1080",
            "http://127.0.0.1:8000/f.bin",
            "-o",
            "-",
            text=False,
        )
        assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(data).digest()
    s, c = slog.read_text(), clog.read_text()
    assert "MPTCP unavailable" in s and "listening on 127.0.0.1:8443 (TCP" in s
    assert "MPTCP unavailable" in c and c.count("MPTCP unavailable") == 1
    assert " tcp -> " in c and " tcp -> " in s


def test_own_address_check_ignores_nonlocal_bind():
    """With ip_nonlocal_bind=1 any address binds; the own-address check must still be right."""
    code = (
        "import ipaddress as i; from mptun.common.sockets import is_local_address as f; "
        "print(f(i.ip_address('198.51.100.7')), f(i.ip_address('198.51.100.1')), "
        "f(i.ip_address('fd00:5::1')), f(i.ip_address('fd00:5::9')))"
    )
    with Netns("ownaddr") as ns:
        ns.sysctl("net.ipv4.ip_nonlocal_bind", 1)
        ns.sysctl("net.ipv6.ip_nonlocal_bind", 1)
        ns.ip("link", "add", "name", "v0", "type", "veth", "peer", "name", "v1")
        ns.ip("link", "set", "v0", "up")
        ns.ip("addr", "add", "198.51.100.1/24", "dev", "v0")
        ns.ip("-6", "addr", "add", "fd00:5::1/64", "dev", "v0", "nodad")
        out = ns.exec(sys.executable, "-c", code).stdout.split()
    assert out == ["False", "True", "True", "False"]
