"""vps/install.sh's router settings for IPv6 and its kernel drop-ins, without a full install.

The installer's own functions run (the script sourced without its last line, `main "$@"`) in a
network namespace with IPv4 and IPv6 default routes, so the addresses it finds are the
namespace's. tests/test_vps_install.py runs the whole installer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_netns
from tests.helpers import ROOT

INSTALL = ROOT / "vps" / "install.sh"
SYSCTL = ROOT / "vps" / "90-mptun.conf"
V4, V6 = "203.0.113.7", "2001:db8:7::7"


@pytest.fixture
def vps() -> Iterator[Netns]:
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    ns = Netns("vps6")
    try:
        ns.ip("link", "add", "name", "eth0", "type", "veth", "peer", "name", "gw0")
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.eth0.accept_dad", 0)
        ns.ip("addr", "add", f"{V4}/24", "dev", "eth0")
        ns.ip("-6", "addr", "add", f"{V6}/64", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("link", "set", "gw0", "up")
        ns.ip("route", "add", "default", "via", "203.0.113.1", "dev", "eth0")
        ns.ip("-6", "route", "add", "default", "via", "2001:db8:7::1", "dev", "eth0")
        yield ns
    finally:
        ns.delete()


def _installer(ns: Netns, code: str, listen: str, public_host: str = "") -> str:
    body = INSTALL.read_text().rstrip()
    assert body.endswith('main "$@"')
    script = (
        body[: -len('main "$@"')] + f"\nLISTEN='{listen}'\nPUBLIC_HOST='{public_host}'\n{code}\n"
    )
    r = ns.exec("bash", "-c", script, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.root
@pytest.mark.netns
def test_prints_ipv6_settings(vps: Netns) -> None:
    out = _installer(vps, "print_ipv6_settings 8443", "[::]:8443")
    assert f"option server '[{V6}]:8443'" in out
    assert f"list server '{V4}'" in out and f"list server '{V6}'" in out

    # a server listening on IPv4 only has no IPv6 to offer
    out = _installer(vps, "print_ipv6_settings 8443", "0.0.0.0:8443")
    assert "IPv6: none" in out and V6 not in out

    # no IPv6 default route: none either
    vps.ip("-6", "route", "del", "default")
    out = _installer(vps, "print_ipv6_settings 8443", "[::]:8443")
    assert "IPv6: none" in out


def test_sysctl_file_keys_have_reasons() -> None:
    """Every setting of the drop-in comes under a comment saying why, and is a sysctl here."""
    lines = SYSCTL.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line or line.startswith("#"):
            continue
        assert re.fullmatch(r"[a-z0-9_.]+ = [0-9 ]+", line), line
        # a comment right above it, or above the block of settings it belongs to
        j = i - 1
        while j >= 0 and lines[j] and not lines[j].startswith("#"):
            j -= 1
        assert j >= 0 and lines[j].startswith("#"), f"no reason above {line!r}"
        key = line.split(" = ")[0]
        assert Path("/proc/sys", *key.split(".")).exists(), f"{key}: not a sysctl here"


def test_installer_writes_the_checked_in_files() -> None:
    """install.sh installs vps/90-mptun.conf (not a copy of its own), and the tls module file."""
    text = INSTALL.read_text()
    assert '/90-mptun.conf" "$SYSCTL"' in text
    assert "MODULES=/etc/modules-load.d/mptun.conf" in text
    assert "install_modules" in text.split("main() {")[1]
    assert subprocess.run(["bash", "-n", str(INSTALL)]).returncode == 0


def _readme_nft() -> str:
    text = (ROOT / "vps" / "README.md").read_text()
    m = re.search(r"```nft\n(.*?)```", text, re.S)
    assert m, "vps/README.md has no ```nft block"
    return m.group(1)


LISTEN_BOTH = """\
import socket, sys, time
socks = []
for port in (8443, 9000):
    s = socket.create_server(("0.0.0.0", port))
    socks.append(s)
print("ready", flush=True)
time.sleep(120)
"""

CONNECT = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
    print("open")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.root
@pytest.mark.netns
def test_readme_nftables_snippet_opens_only_the_port(tmp_path: Path) -> None:
    """The firewall snippet of vps/README.md loads, and lets the mptun port in, not others."""
    ok, why = have_netns()
    if not ok:
        pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make test installs nftables)")
    rules = tmp_path / "vps.nft"
    rules.write_text(_readme_nft())
    server, peer = Netns("vpsfw"), Netns("peer")
    try:
        server.ip("link", "add", "name", "eth0", "type", "veth", "peer", "name", "p0")
        server.ip("link", "set", "p0", "netns", peer.name)
        server.ip("addr", "add", "198.51.100.1/24", "dev", "eth0")
        peer.ip("addr", "add", "198.51.100.2/24", "dev", "p0")
        server.ip("link", "set", "eth0", "up")
        peer.ip("link", "set", "p0", "up")
        server.exec("nft", "-c", "-f", str(rules))
        server.exec("nft", "-f", str(rules))
        listener = server.popen(
            [sys.executable, "-c", LISTEN_BOTH], stdout=subprocess.PIPE, text=True
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"

        def connect(port: int) -> str:
            r = peer.exec(sys.executable, "-c", CONNECT, "198.51.100.1", str(port))
            return r.stdout.strip()

        assert connect(8443) == "open"
        assert connect(9000) != "open"  # dropped: the connect times out
    finally:
        server.delete()
        peer.delete()
