"""The OpenWrt iface hotplug hook, run as netifd runs it, against the real `ip mptcp`.

netifd runs /etc/hotplug.d/iface/* with ACTION, INTERFACE and DEVICE set; here the hook runs with
/bin/sh in a network namespace holding two "uplinks" (a veth pair each), with a UCI file naming
one OpenWrt interface (`wan` -> device up0) as an uplink. The kernel's MPTCP endpoint table is the
evidence: ifup of the uplink adds a subflow endpoint for its address on its device, an interface
that is not an uplink is left alone, ifdown removes the endpoint again.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_mptcp, have_netns
from tests.helpers import ROOT

pytestmark = [pytest.mark.root, pytest.mark.netns]

HOOK = ROOT / "openwrt" / "net" / "mptun" / "files" / "mptun.hotplug"
UPLINK_ADDR = "198.51.100.2"
OTHER_ADDR = "198.51.100.18"


def _mptun_program(tmp: Path) -> Path:
    """An executable `mptun` for the hook's MPTUN variable: this interpreter with this tree."""
    prog = tmp / "mptun-program"
    prog.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mptun "$@"\n')
    prog.chmod(0o755)
    return prog


def _uplinks_available() -> tuple[bool, str]:
    r = subprocess.run(
        [sys.executable, "-m", "mptun", "uplinks", "--help"], capture_output=True, text=True
    )
    if r.returncode != 0:
        return False, "`mptun uplinks` (issue 3) is not on this branch yet"
    if "--uci" not in r.stdout:
        return False, "`mptun uplinks` has no --uci option yet"
    return True, ""


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Netns]:
    for ok, why in (have_netns(), have_mptcp(), _uplinks_available()):
        if not ok:
            pytest.skip(why)
    ns = Netns("hotplug")
    try:
        for dev, peer, addr, gw in (
            ("up0", "up0p", UPLINK_ADDR, "198.51.100.1"),
            ("up1", "up1p", OTHER_ADDR, "198.51.100.17"),
        ):
            ns.ip("link", "add", "name", dev, "type", "veth", "peer", "name", peer)
            ns.ip("addr", "add", f"{addr}/28", "dev", dev)
            ns.ip("addr", "add", f"{gw}/28", "dev", peer)
            ns.ip("link", "set", dev, "up")
            ns.ip("link", "set", peer, "up")
        ns.ip("route", "add", "default", "via", "198.51.100.1", "dev", "up0")
        yield ns
    finally:
        ns.delete()


def _config(tmp_path: Path, client_enabled: str = "1") -> Path:
    conf = tmp_path / "mptun.uci"
    conf.write_text(
        "config client 'main'\n"
        f"\toption enabled '{client_enabled}'\n"
        "\toption server 'vps.example.net:8443'\n"
        "\toption key_file '/etc/mptun/key'\n\n"
        "config uplinks 'uplinks'\n"
        "\toption table_base '150'\n\n"
        "config uplink 'wan'\n"
        "\toption interface 'wan'\n"
    )
    return conf


def _hotplug(ns: Netns, tmp: Path, conf: Path, action: str, iface: str, dev: str):
    env = [
        f"ACTION={action}",
        f"INTERFACE={iface}",
        f"DEVICE={dev}",
        f"MPTUN={_mptun_program(tmp)}",
        f"MPTUN_UCI={conf}",
        f"PYTHONPATH={ROOT}",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    return ns.exec("env", "-i", *env, "/bin/sh", str(HOOK), check=False)


def _endpoints(ns: Netns) -> str:
    return ns.exec("ip", "mptcp", "endpoint", "show").stdout


def test_ifup_adds_and_ifdown_removes_the_endpoint(router: Netns, tmp_path: Path) -> None:
    conf = _config(tmp_path)
    assert _endpoints(router).strip() == ""

    r = _hotplug(router, tmp_path, conf, "ifup", "wan", "up0")
    assert r.returncode == 0, r.stderr
    eps = _endpoints(router)
    line = next((ln for ln in eps.splitlines() if ln.startswith(UPLINK_ADDR + " ")), "")
    assert "subflow" in line and "dev up0" in line, eps
    assert OTHER_ADDR not in eps
    # the uplink's routing table came from the UCI `config uplinks` section (table_base 150)
    assert "lookup 150" in router.exec("ip", "rule", "show").stdout

    # idempotent: a second ifup (netifd also sends ifupdate) changes nothing
    r = _hotplug(router, tmp_path, conf, "ifupdate", "wan", "up0")
    assert r.returncode == 0, r.stderr
    assert _endpoints(router) == eps

    # an interface that is not an uplink is ignored
    r = _hotplug(router, tmp_path, conf, "ifup", "lan", "up1")
    assert r.returncode == 0, r.stderr
    assert OTHER_ADDR not in _endpoints(router)

    r = _hotplug(router, tmp_path, conf, "ifdown", "wan", "up0")
    assert r.returncode == 0, r.stderr
    assert UPLINK_ADDR not in _endpoints(router)
    assert "lookup 150" not in router.exec("ip", "rule", "show").stdout


def test_disabled_client_leaves_uplinks_alone(router: Netns, tmp_path: Path) -> None:
    conf = _config(tmp_path, client_enabled="0")
    r = _hotplug(router, tmp_path, conf, "ifup", "wan", "up0")
    assert r.returncode == 0, r.stderr
    assert _endpoints(router).strip() == ""


def test_unreadable_config_is_reported(router: Netns, tmp_path: Path) -> None:
    conf = tmp_path / "broken.uci"
    conf.write_text("config client 'main'\n\toption server 'x:1\n")
    r = _hotplug(router, tmp_path, conf, "ifup", "wan", "up0")
    assert r.returncode == 1
    assert f"{conf}:2: unterminated '" in r.stderr
    assert _endpoints(router).strip() == ""


def test_other_actions_do_nothing(router: Netns, tmp_path: Path) -> None:
    conf = _config(tmp_path)
    r = _hotplug(router, tmp_path, conf, "ifup-failed", "wan", "up0")  # not ours
    assert r.returncode == 0
    r = _hotplug(router, tmp_path, conf, "iflink", "wan", "up0")
    assert r.returncode == 0
    assert _endpoints(router).strip() == ""
