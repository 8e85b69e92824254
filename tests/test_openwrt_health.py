"""Uplink health on OpenWrt: the package's shell is the client's `--uplink-hook`.

`mptun.sh uplink-state DEVICE STATE` withdraws a dead (or mptcp-broken) uplink's MPTCP endpoints,
keeps its table and rules, and leaves a marker in /var/run/mptun so the hotplug hook's ifup does
not add them back; `up` or `degraded` brings them back. The init script passes the client the
uplinks' devices, the hook, syslog logging and the log level, and turns the kernel's blackhole
detection off. Run as in tests/test_openwrt_service.py (the package's files over a root tree, the
shims of tests/openwrt_shim, the real `ip` and kernel in a namespace); the last test drives the
real shell from a real client's health checks on the multipath test bed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.rig import Rig
from mptun.lab.testbed import Testbed
from mptun.lab.wait import wait_until
from tests import test_openwrt_service
from tests.test_openwrt_service import FILES, SHIM, UPLINK_ADDR, UPLINK_GW, Router, _instance

router = test_openwrt_service.router  # the fixture: a namespace and the package's root tree

pytestmark = [pytest.mark.root, pytest.mark.netns]

BLACKHOLE = Path("/proc/sys/net/mptcp/blackhole_timeout")


def uplink_state(r: Router, dev: str, state: str) -> subprocess.CompletedProcess:
    """Run the hook as the client runs it: the installed mptun.sh, as a program."""
    prog = r.root / "usr" / "share" / "mptun" / "mptun.sh"
    return r.ns.exec("env", "-i", *r._env(), str(prog), "uplink-state", dev, state, check=False)


def endpoints(r: Router) -> str:
    return r.ip("mptcp", "endpoint", "show")


def marker(r: Router, iface: str) -> Path:
    return r.root / "var" / "run" / "mptun" / f"withdrawn.{iface}"


def test_hook_withdraws_and_readds_and_hotplug_respects_it(router: Router) -> None:
    router.configure()
    assert router.service("start_service").returncode == 0
    assert UPLINK_ADDR in endpoints(router)
    rules = router.ip("rule", "show")

    r = uplink_state(router, "up0", "dead")
    assert r.returncode == 0, r.stderr
    assert UPLINK_ADDR not in endpoints(router)
    assert marker(router, "wan").exists()
    # the table and the rules stay: the uplink's subflows may come back at once
    assert router.ip("rule", "show") == rules
    assert f"default via {UPLINK_GW} dev up0" in router.ip("route", "show", "table", "150")

    # netifd's ifup (a DHCP renewal, a link flap) does not add the withdrawn endpoint back,
    # nor does a reload of the service
    r = router.hotplug("ifup", "wan", "up0")
    assert r.returncode == 0, r.stderr
    assert UPLINK_ADDR not in endpoints(router)
    assert router.service("start_service").returncode == 0
    assert UPLINK_ADDR not in endpoints(router)
    assert router.ip("rule", "show") == rules

    # dead again (a second client after a respawn): nothing changes
    assert uplink_state(router, "up0", "mptcp-broken").returncode == 0
    assert UPLINK_ADDR not in endpoints(router)

    # back: degraded counts as alive (loss or delay, not silence)
    r = uplink_state(router, "up0", "degraded")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in endpoints(router).splitlines() if ln.startswith(UPLINK_ADDR + " "))
    assert "subflow" in line and "dev up0" in line
    assert not marker(router, "wan").exists()
    assert router.ip("rule", "show") == rules
    assert uplink_state(router, "up0", "up").returncode == 0
    assert endpoints(router).count(UPLINK_ADDR) == 1

    # stop forgets the markers with everything else
    assert uplink_state(router, "up0", "mptcp-broken").returncode == 0
    assert marker(router, "wan").exists()
    assert router.service("stop_service").returncode == 0
    assert not list(marker(router, "wan").parent.glob("withdrawn.*"))
    assert router.python_runs() == []


def test_hook_refuses_what_it_does_not_know(router: Router) -> None:
    router.configure()
    assert router.service("start_service").returncode == 0
    before = endpoints(router)
    # a state it does not know: exit 2 and one line, no change
    r = uplink_state(router, "up0", "sleepy")
    assert r.returncode == 2 and not r.stdout
    # a device that is no enabled uplink's (up1 is the disabled wwan): left alone
    assert uplink_state(router, "up1", "dead").returncode == 0
    assert uplink_state(router, "eth9", "dead").returncode == 0
    assert endpoints(router) == before
    assert not list(marker(router, "wan").parent.glob("withdrawn.*"))
    # run with the wrong number of words: usage, exit 2
    prog = router.root / "usr" / "share" / "mptun" / "mptun.sh"
    r = router.ns.exec("env", "-i", *router._env(), str(prog), "uplink-state", "up0", check=False)
    assert r.returncode == 2 and "usage" in r.stderr
    # while the service is stopped the hook does nothing
    assert router.service("stop_service").returncode == 0
    assert uplink_state(router, "up0", "up").returncode == 0
    assert endpoints(router).strip() == ""


def test_init_passes_uplinks_hook_syslog_and_log_level(router: Router) -> None:
    conf = router.configure()
    if BLACKHOLE.exists():  # the namespace's own copy (per namespace: net/mptcp/ctrl.c)
        router.ns.exec("sysctl", "-qw", "net.mptcp.blackhole_timeout=3600")
    assert router.service("start_service").returncode == 0
    prog = str(router.root / "usr" / "bin" / "mptun")
    hook = f"{router.root}/usr/share/mptun/mptun.sh uplink-state"
    assert _instance(router)["command"] == [
        prog, "--log-syslog", "--log-level", "info", "client", "--uci", str(conf),
        "--uplink", "up0", "--uplink-hook", hook,
    ]  # fmt: skip
    if BLACKHOLE.exists():
        got = router.ns.exec("sysctl", "-n", "net.mptcp.blackhole_timeout").stdout.strip()
        assert got == "0"
    # the command line the init built parses as the client's (without running it)
    r = router.ns.exec(prog, "uci", str(conf), check=False)
    assert r.returncode == 0, r.stderr

    # the hook the init names is the installed, executable mptun.sh, and the client takes it:
    # the command line stops at a bad value given after it (--log-syslog left out: this
    # machine may have no /dev/log)
    argv = [a for a in _instance(router)["command"] if a != "--log-syslog"]
    check = router.ns.exec(*argv, "--uplink-check-interval", "bad", check=False)
    assert check.returncode == 2
    assert "uplink-check-interval" in check.stderr and "uplink-hook" not in check.stderr

    # wwan enabled too (with a device), and log_level debug
    text = conf.read_text().replace("\toption enabled '0'\n", "")
    conf.write_text(text.replace("\toption socks", "\toption log_level 'debug'\n\toption socks"))
    assert router.service("start_service").returncode == 0
    cmd = _instance(router)["command"]
    assert cmd[1:4] == ["--log-syslog", "--log-level", "debug"]
    assert cmd[7:] == ["--uplink", "up0", "--uplink", "up1", "--uplink-hook", hook]
    assert router.ns.exec(prog, "uci", str(conf), check=False).returncode == 0


def test_uplinks_and_hook_of_the_client_section_are_kept(router: Router) -> None:
    """`list uplink` (devices, as the LuCI settings page writes them) and `option uplink_hook`
    in config client are the client's to read: the init adds neither."""
    conf = router.configure(client_extra="\tlist uplink 'up1'")
    assert router.service("start_service").returncode == 0
    cmd = _instance(router)["command"]
    assert "--uplink" not in cmd
    assert cmd[-2:] == ["--uplink-hook", f"{router.root}/usr/share/mptun/mptun.sh uplink-state"]
    conf.write_text(
        conf.read_text().replace("\tlist uplink", "\toption uplink_hook '/bin/true'\n\tlist uplink")
    )
    assert router.service("start_service").returncode == 0
    cmd = _instance(router)["command"]
    assert "--uplink" not in cmd and "--uplink-hook" not in cmd
    assert router.ns.exec(str(router.root / "usr/bin/mptun"), "uci", str(conf)).returncode == 0


def test_no_uplink_with_a_device_means_no_hook(router: Router) -> None:
    router.configure()
    for iface in ("wan", "wwan"):
        (router.root / "netifd" / iface / "device").unlink()
    assert router.service("start_service").returncode == 0
    cmd = _instance(router)["command"]
    assert "--uplink" not in cmd and "--uplink-hook" not in cmd


def test_reload_restarts_only_when_the_command_line_changes(router: Router) -> None:
    conf = router.configure()
    assert router.service("start").returncode == 0
    # an unchanged command line: the reload is procd's SIGHUP (start again, no stop)
    assert router.service("reload_service").returncode == 0
    assert [c[0] for c in router.procd_calls() if c[0] in ("start", "stop")] == ["start", "start"]
    # a changed log level: the client is stopped and started with it
    conf.write_text(
        conf.read_text().replace("\toption socks", "\toption log_level 'warning'\n\toption socks")
    )
    assert router.service("reload_service").returncode == 0
    calls = [c[0] for c in router.procd_calls() if c[0] in ("start", "stop")]
    assert calls == ["start", "start", "stop", "start"]
    assert _instance(router)["command"][2:4] == ["--log-level", "warning"]
    assert UPLINK_ADDR in endpoints(router)  # the restart rewired the uplinks


# -- the real client, the real shell, a real health change --------------------------------------
TESTBED_UPLINKS = ("wan1", "wan2", "wan3")


@pytest.fixture
def owrt_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Testbed, Rig]]:
    """The test bed's router as an OpenWrt router: the package's shell (over a root tree with
    the shims) owns the uplinks, and the client runs it as its hook."""
    tb = Testbed(rates_mbit=(None, None, None), ipv6=False)
    tb.__enter__()
    try:
        root = tmp_path / "root"
        (root / "lib" / "functions").mkdir(parents=True)
        shutil.copy(SHIM / "lib" / "functions.sh", root / "lib" / "functions.sh")
        shutil.copy(SHIM / "lib" / "functions" / "network.sh", root / "lib" / "functions")
        (root / "usr" / "share" / "mptun").mkdir(parents=True)
        shutil.copy(FILES / "mptun.sh", root / "usr" / "share" / "mptun" / "mptun.sh")
        (root / "etc" / "config").mkdir(parents=True)
        (root / "var" / "run" / "mptun").mkdir(parents=True)
        (root / "var" / "run" / "mptun" / "started").touch()
        conf = "config client 'main'\n\toption server '192.0.2.1:1'\n\n"
        conf += "config uplinks 'uplinks'\n\toption table_base '150'\n"
        conf += "\toption rule_priority '900'\n"
        for name in TESTBED_UPLINKS:
            up = tb.uplink(name)
            conf += f"\nconfig uplink '{name}'\n\toption interface '{name}'\n"
            d = root / "netifd" / name
            d.mkdir(parents=True)
            for field, value in (
                ("device", up.router_if),
                ("ipaddrs", str(up.router_v4)),
                ("gateway", str(up.vps_v4)),
                ("up", "1"),
            ):
                (d / field).write_text(value)
        (root / "etc" / "config" / "mptun").write_text(conf)
        env = ["env", "-i", f"MPTUN_ROOT={root}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        script = f'. "{root}/lib/functions.sh"; . "{root}/lib/functions/network.sh"; '
        script += f'. "{root}/usr/share/mptun/mptun.sh"; config_load mptun; mptun_uplinks_all up'
        assert tb.router is not None
        tb.router.exec(*env, "/bin/sh", "-c", script)
        # the client's environment reaches its hook: MPTUN_ROOT points the shell at the tree
        monkeypatch.setenv("MPTUN_ROOT", str(root))
        monkeypatch.setenv("MPTUN_HEALTH_FILE", str(tmp_path / "health.json"))
        args = [a for name in TESTBED_UPLINKS for a in ("--uplink", name)]
        args += ["--uplink-hook", f"{root}/usr/share/mptun/mptun.sh uplink-state"]
        rig = Rig(tb, tmp_path, uplinks=None, client_args=args)
        rig.start()
        yield tb, rig
    finally:
        tb.destroy()
        log = tmp_path / "client.log"
        print(log.read_text() if log.exists() else "")


def _drop(tb: Testbed, uplink: str, on: bool) -> None:
    assert tb.vps is not None
    if not on:
        tb.vps.exec("nft", "delete", "table", "inet", "mptun_owrt_health")
        return
    vif = tb.uplink(uplink).vps_if
    tb.vps.exec(
        "nft",
        "-f",
        "-",
        input="table inet mptun_owrt_health {\n"
        f"  chain input {{ type filter hook input priority 0; iifname {vif} drop; }}\n"
        f"  chain output {{ type filter hook output priority 0; oifname {vif} drop; }}\n"
        "}\n",
    )


@pytest.mark.usefixtures("needs_mptcp_testbed")
def test_a_dead_uplink_loses_its_endpoint_through_the_shell_and_gets_it_back(owrt_bed) -> None:
    tb, rig = owrt_bed
    assert tb.router is not None
    wan2 = str(tb.uplink("wan2").router_v4)

    def eps() -> str:
        return tb.router.exec("ip", "mptcp", "endpoint", "show").stdout  # type: ignore[union-attr]

    def states() -> dict[str, str]:
        (client,) = rig.status()["clients"]
        return {u["name"]: u["state"] for u in client.get("uplink_health") or []}

    wait_until(lambda: states() == dict.fromkeys(TESTBED_UPLINKS, "up"), 20, "all uplinks up")
    assert wan2 in eps()
    dropped = time.monotonic()
    _drop(tb, "wan2", True)
    wait_until(lambda: wan2 not in eps(), 15, "wan2's endpoint withdrawn by the shell")
    withdrawn = time.monotonic() - dropped
    assert states()["wan2"] == "dead"
    assert f"from {wan2} lookup 151" in tb.router.exec("ip", "rule", "show").stdout
    cleared = time.monotonic()
    _drop(tb, "wan2", False)
    wait_until(lambda: wan2 in eps(), 15, "wan2's endpoint back")
    print(f"figures: endpoint withdrawn {withdrawn:.2f} s after the drop, back "
          f"{time.monotonic() - cleared:.2f} s after it went")  # fmt: skip
    assert states()["wan2"] in ("up", "degraded")
    log = (rig.dir / "client.log").read_text()
    assert "uplink hook" not in log, log  # no hook run failed
