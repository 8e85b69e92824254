"""The OpenWrt service scripts run as procd and netifd run them, against the real kernel.

`/etc/init.d/mptun` and the iface hotplug hook run with /bin/sh in a network namespace, over a
directory tree standing for the router's root (`MPTUN_ROOT`): the package's files, the UCI config,
and two stand-ins from tests/openwrt_shim, because OpenWrt's own are not installable here:
`lib/functions.sh` (config_load/config_get over the UCI file, the real one's contract) and
`lib/functions/network.sh` (what netifd would answer, from files the test writes), plus the
procd helpers rc.common provides (each call recorded). `ip`, `nft` and the kernel are real; the
`mptun` program is this tree's, wrapped to count every Python process started.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.netns import Netns, have_mptcp, have_netns
from tests.helpers import ROOT

pytestmark = [pytest.mark.root, pytest.mark.netns]

FILES = ROOT / "openwrt" / "net" / "mptun" / "files"
SHIM = ROOT / "tests" / "openwrt_shim"
UPLINK_ADDR = "198.51.100.2"
UPLINK_GW = "198.51.100.1"
OTHER_ADDR = "198.51.100.18"

CONFIG = """\
config client 'main'
\toption enabled '1'
\toption server '203.0.113.100:8443'
\toption key_file '{root}/etc/mptun/key'
\toption socks '127.0.0.1:1080'
{client_extra}
config uplinks 'uplinks'
\toption table_base '150'
\toption rule_priority '900'

config nft 'nft'
\toption enabled '{nft}'
\toption mode '{mode}'
\toption port '1081'
\tlist server '203.0.113.100'
\tlist lan 'br-lan'

config uplink 'wan'
\toption interface 'wan'

config uplink 'wwan'
\toption interface 'wwan'
\toption enabled '0'
"""


class Router:
    """A namespace and a root tree holding the package's files, as the package installs them."""

    def __init__(self, ns: Netns, root: Path) -> None:
        self.ns = ns
        self.root = root
        self.calls = root / "mptun-calls"  # one line per Python process the scripts started
        self.procd = root / "procd-calls"
        (root / "lib" / "functions").mkdir(parents=True)
        shutil.copy(SHIM / "lib" / "functions.sh", root / "lib" / "functions.sh")
        shutil.copy(SHIM / "lib" / "functions" / "network.sh", root / "lib" / "functions")
        (root / "usr" / "share" / "mptun").mkdir(parents=True)
        shutil.copy(FILES / "mptun.sh", root / "usr" / "share" / "mptun" / "mptun.sh")
        (root / "usr" / "bin").mkdir(parents=True)
        prog = root / "usr" / "bin" / "mptun"
        prog.write_text(
            f'#!/bin/sh\necho "$*" >>"{self.calls}"\n'
            f'PYTHONPATH="{ROOT}" exec "{sys.executable}" -m mptun "$@"\n'
        )
        prog.chmod(0o755)
        for d in ("etc/config", "etc/mptun", "var/run", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc" / "mptun" / "key").write_text("a" * 44 + "\n")

    def configure(self, nft: str = "0", mode: str = "redirect", client_extra: str = "") -> Path:
        conf = self.root / "etc" / "config" / "mptun"
        extra = f"{client_extra}\n" if client_extra else ""
        conf.write_text(CONFIG.format(root=self.root, nft=nft, mode=mode, client_extra=extra))
        return conf

    def netifd(self, iface: str, up: bool, **fields: str) -> None:
        d = self.root / "netifd" / iface
        d.mkdir(parents=True, exist_ok=True)
        for name, value in fields.items():
            (d / name).write_text(value)
        (d / "up").unlink(missing_ok=True)
        if up:
            (d / "up").write_text("1")

    def _env(self, **extra: str) -> list[str]:
        env = {
            "MPTUN_ROOT": str(self.root),
            "PROCD_LOG": str(self.procd),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            **extra,
        }
        return [f"{k}={v}" for k, v in env.items()]

    def service(self, action: str):
        """Source the init script as rc.common does and run one of its functions."""
        script = f'. "{SHIM}/procd.sh"; . "{FILES}/mptun.init"; {action}'
        return self.ns.exec("env", "-i", *self._env(), "/bin/sh", "-c", script, check=False)

    def hotplug(self, action: str, iface: str, dev: str):
        env = self._env(ACTION=action, INTERFACE=iface, DEVICE=dev)
        return self.ns.exec("env", "-i", *env, "/bin/sh", str(FILES / "mptun.hotplug"), check=False)

    def python_runs(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def procd_calls(self) -> list[list[str]]:
        text = self.procd.read_text() if self.procd.exists() else ""
        return [line.split("\t") for line in text.splitlines()]

    def ip(self, *args: str) -> str:
        return self.ns.exec("ip", *args).stdout


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    for ok, why in (have_netns(), have_mptcp()):
        if not ok:
            pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (make test installs nftables)")
    ns = Netns("owrt")
    try:
        for dev, peer, addr, gw in (
            ("up0", "up0p", UPLINK_ADDR, UPLINK_GW),
            ("up1", "up1p", OTHER_ADDR, "198.51.100.17"),
        ):
            ns.ip("link", "add", "name", dev, "type", "veth", "peer", "name", peer)
            ns.ip("addr", "add", f"{addr}/28", "dev", dev)
            ns.ip("addr", "add", f"{gw}/28", "dev", peer)
            ns.ip("link", "set", dev, "up")
            ns.ip("link", "set", peer, "up")
        ns.ip("route", "add", "default", "via", UPLINK_GW, "dev", "up0")
        r = Router(ns, tmp_path / "root")
        r.netifd("wan", True, device="up0", ipaddrs=UPLINK_ADDR, gateway=UPLINK_GW)
        r.netifd("wwan", True, device="up1", ipaddrs=OTHER_ADDR, gateway="198.51.100.17")
        yield r
    finally:
        ns.delete()


def _instance(r: Router) -> dict[str, list[str]]:
    """The procd instance the start described: param name -> values."""
    params: dict[str, list[str]] = {}
    for call in r.procd_calls():
        if call[0] == "set_param":
            params[call[1]] = call[2:]
    return params


def test_start_runs_one_python_process_and_wires_uplinks(router: Router) -> None:
    conf = router.configure()
    r = router.service("start_service")
    assert r.returncode == 0, r.stderr
    # no Python ran during start_service; procd will start exactly the one client process
    assert router.python_runs() == []
    inst = _instance(router)
    prog = str(router.root / "usr" / "bin" / "mptun")
    # the client reads its own section; the init adds what UCI holds elsewhere (uplink health:
    # the enabled uplinks' devices and the shell as the hook; tests/test_openwrt_health.py)
    assert inst["command"][:7] == [
        prog, "--log-syslog", "--log-level", "info", "client", "--uci", str(conf)
    ]  # fmt: skip
    assert inst["reload_signal"] == ["HUP"]
    assert inst["file"] == [str(conf), str(router.root / "etc" / "mptun" / "key")]
    opened = [c for c in router.procd_calls() if c[0] == "open_instance"]
    assert opened == [["open_instance", "client"]]

    # the enabled uplink got its endpoint, table and rules; the disabled one (wwan) nothing
    eps = router.ip("mptcp", "endpoint", "show")
    line = next(ln for ln in eps.splitlines() if ln.startswith(UPLINK_ADDR + " "))
    assert "subflow" in line and "dev up0" in line and " id 255 " in line, eps
    assert OTHER_ADDR not in eps
    rules = router.ip("rule", "show")
    assert f"900:\tfrom {UPLINK_ADDR} lookup main suppress_prefixlength 0" in rules, rules
    assert f"901:\tfrom {UPLINK_ADDR} lookup 150" in rules, rules
    assert f"default via {UPLINK_GW} dev up0" in router.ip("route", "show", "table", "150")

    # the client reads the same file: its --uci parse accepts what the shell read
    check = router.ns.exec(prog, "uci", str(conf), check=False)
    assert check.returncode == 0, check.stderr

    # idempotent: a second start (procd reload) changes nothing in the kernel
    before = (eps, rules)
    assert router.service("start_service").returncode == 0
    assert (router.ip("mptcp", "endpoint", "show"), router.ip("rule", "show")) == before

    r = router.service("stop_service")
    assert r.returncode == 0, r.stderr
    assert router.ip("mptcp", "endpoint", "show").strip() == ""
    assert "lookup 150" not in router.ip("rule", "show")
    assert "suppress_prefixlength" not in router.ip("rule", "show")
    assert router.ip("route", "show", "table", "150").strip() == ""
    assert router.python_runs() == ["uci " + str(conf)]  # only the check above


def test_hotplug_starts_no_python(router: Router) -> None:
    router.configure()
    # before the service runs, the hook does nothing
    assert router.hotplug("ifup", "wan", "up0").returncode == 0
    assert router.ip("mptcp", "endpoint", "show").strip() == ""

    router.netifd("wan", False)
    assert router.service("start_service").returncode == 0
    assert router.ip("mptcp", "endpoint", "show").strip() == ""  # wan is down: left alone

    router.netifd("wan", True)
    r = router.hotplug("ifup", "wan", "up0")
    assert r.returncode == 0, r.stderr
    assert UPLINK_ADDR in router.ip("mptcp", "endpoint", "show")
    assert "lookup 150" in router.ip("rule", "show")

    # an interface that is not an enabled uplink is left alone
    assert router.hotplug("ifup", "wwan", "up1").returncode == 0
    assert OTHER_ADDR not in router.ip("mptcp", "endpoint", "show")

    # ifupdate with a new lease: the old address's rules and endpoint go, the new one's come
    new_addr = "198.51.100.3"
    router.ns.ip("addr", "add", f"{new_addr}/28", "dev", "up0")
    router.netifd("wan", True, ipaddrs=new_addr)
    r = router.hotplug("ifupdate", "wan", "up0")
    assert r.returncode == 0, r.stderr
    rules, eps = router.ip("rule", "show"), router.ip("mptcp", "endpoint", "show")
    assert f"from {new_addr} lookup 150" in rules and f"from {UPLINK_ADDR} " not in rules
    assert eps.startswith(f"{new_addr} id ") and UPLINK_ADDR not in eps, eps

    # ifdown: netifd has already removed the address from its view
    router.netifd("wan", False, ipaddrs="", gateway="")
    r = router.hotplug("ifdown", "wan", "up0")
    assert r.returncode == 0, r.stderr
    assert router.ip("mptcp", "endpoint", "show").strip() == ""
    assert "lookup 150" not in router.ip("rule", "show")

    assert router.hotplug("iflink", "wan", "up0").returncode == 0
    assert router.python_runs() == []


def test_tproxy_routing_follows_the_service(router: Router) -> None:
    router.configure(nft="1", mode="tproxy")
    r = router.service("start_service")
    assert r.returncode == 0, r.stderr
    for fam in ("-4", "-6"):
        assert "fwmark 0x10000 lookup 100" in router.ip(fam, "rule", "show")
        assert "local default dev lo" in router.ip(fam, "route", "show", "table", "100")
    assert "tproxy to :1081" in router.ns.exec("nft", "list", "table", "inet", "mptun").stdout
    # the rules were rendered once (a Python process) and cached with the config's checksum
    assert [c.split()[0] for c in router.python_runs()] == ["nft"]
    assert router.service("start_service").returncode == 0
    assert [c.split()[0] for c in router.python_runs()] == ["nft"]

    assert router.service("stop_service").returncode == 0
    for fam in ("-4", "-6"):
        assert "fwmark" not in router.ip(fam, "rule", "show")
        assert router.ip(fam, "route", "show", "table", "100").strip() == ""
    r = router.ns.exec("nft", "list", "table", "inet", "mptun", check=False)
    assert r.returncode != 0


def test_dnsmasq_forwarder_only_while_running(router: Router) -> None:
    key2 = router.root / "etc" / "mptun" / "key2"
    router.configure(
        client_extra="\toption dns '127.0.0.1:5353'\n"
        f"\tlist server 'vps.example.net:8443,key-file={key2}'"
    )
    # a server with its own key: start refuses while that file is missing, then watches it
    r = router.service("start_service")
    assert r.returncode == 1 and _instance(router) == {}
    key2.write_text("b" * 44 + "\n")
    # netifd's file of the uplinks' DNS servers, which dnsmasq reads without the drop-in
    auto = router.root / "tmp" / "resolv.conf.d" / "resolv.conf.auto"
    auto.parent.mkdir(parents=True)
    auto.write_text("# Interface wan\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    dropin = router.root / "tmp" / "dnsmasq.d" / "mptun.conf"
    assert router.service("start_service").returncode == 0
    assert _instance(router)["file"][-1] == str(key2)
    lines = dropin.read_text().splitlines()
    assert "no-resolv" in lines and "server=127.0.0.1#5353" in lines
    # the server's own name is resolved outside the tunnel; its address literal needs nothing
    assert "server=/vps.example.net/192.0.2.53" in lines
    assert "server=/vps.example.net/2001:db8::53" in lines
    assert not any("203.0.113.100" in line for line in lines)
    assert router.service("stop_service").returncode == 0
    assert not dropin.exists()


def test_missing_key_refuses_to_start(router: Router) -> None:
    router.configure()
    (router.root / "etc" / "mptun" / "key").unlink()
    r = router.service("start_service")
    assert r.returncode == 1
    assert _instance(router) == {}
    assert router.ip("mptcp", "endpoint", "show").strip() == ""


def _uplink_state(r: Router) -> tuple[str, ...]:
    return (
        r.ip("rule", "show"),
        r.ip("route", "show", "table", "150"),
        r.ip("mptcp", "endpoint", "show"),
        r.ip("mptcp", "limits", "show"),
    )


def test_shell_uplinks_equal_mptun_uplinks(router: Router) -> None:
    """The shell does what `mptun uplinks` (client/uplinks.py, the reference) does for an uplink,
    marked the same way: `mptun uplinks --clear` finds and removes what the shell added."""
    conf = router.configure()
    prog = str(router.root / "usr" / "bin" / "mptun")
    assert router.service("start_service").returncode == 0
    by_shell = _uplink_state(router)
    assert router.service("stop_service").returncode == 0

    r = router.ns.exec(prog, "uplinks", "--uci", str(conf), "up0", check=False)
    assert r.returncode == 0, r.stderr
    assert _uplink_state(router) == by_shell

    router.ns.exec(prog, "uplinks", "--uci", str(conf), "--clear")
    assert router.service("start_service").returncode == 0
    r = router.ns.exec(prog, "uplinks", "--uci", str(conf), "--clear", check=False)
    assert r.returncode == 0, r.stderr
    assert router.ip("mptcp", "endpoint", "show").strip() == ""
    assert "proto 247" not in router.ip("rule", "show")
    assert router.ip("route", "show", "table", "150").strip() == ""
