"""`mptun uplinks` against a real kernel: idempotent, `--clear` restores the namespace exactly,
other people's rules/routes/endpoints survive, `--watch` follows a link going down and up."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from mptun.lab.netns import Netns
from mptun.lab.rig import mptun_argv
from mptun.lab.testbed import Testbed

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.usefixtures("needs_mptcp_testbed")]

UPLINKS = ("wan1", "wan2", "wan3")


@pytest.fixture
def bed():
    with Testbed(rates_mbit=(None, None, None)) as tb:  # unshaped: only the config matters
        yield tb


def snapshot(ns: Netns) -> dict:
    """Everything `mptun uplinks` may touch, as the kernel reports it (iproute2's JSON)."""
    out = {}
    for key, args in {
        "rules4": ["-4", "-j", "rule", "show"],
        "rules6": ["-6", "-j", "rule", "show"],
        "routes4": ["-4", "-j", "route", "show", "table", "all"],
        "routes6": ["-6", "-j", "route", "show", "table", "all"],
        "endpoints": ["-j", "mptcp", "endpoint", "show"],
    }.items():
        text = ns.exec("ip", *args).stdout.strip() or "[]"
        data = json.loads(text)
        if isinstance(data, list):  # order is not part of the state
            data = sorted(data, key=lambda d: json.dumps(d, sort_keys=True))
        out[key] = data
    out["limits"] = ns.exec("ip", "mptcp", "limits", "show").stdout.split()  # no JSON in 6.1
    return out


def uplinks(ns: Netns, *args: str) -> subprocess.CompletedProcess:
    return ns.exec(*mptun_argv("uplinks", *args), check=False)


def test_uplinks_is_idempotent_and_clear_leaves_the_namespace_as_found(bed: Testbed):
    ns = bed.router
    assert ns is not None
    # other people's configuration, some of it where mptun would go first
    ns.ip("rule", "add", "from", "192.0.2.0/24", "lookup", "100", "pref", "1500")
    ns.ip("route", "add", "192.0.2.0/24", "dev", "lan0", "table", "1500")
    ns.exec("ip", "mptcp", "endpoint", "add", "192.0.2.1", "dev", "lan0", "signal")
    # a deprecated address (preferred lifetime over) gets no endpoint: it takes no new flows
    ns.ip("-6", "addr", "add", "fd00:10:2::99/64", "dev", "wan2", "nodad", "preferred_lft", "0")
    before = snapshot(ns)

    r = uplinks(ns, *UPLINKS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("add endpoint") == 6  # IPv4 + IPv6 on three uplinks
    assert "fd00:10:2::99" not in r.stdout
    configured = snapshot(ns)
    assert configured != before
    tables = {d.get("table") for d in configured["routes4"] if d.get("protocol") == "247"}
    assert tables == {"1501", "1502", "1503"}  # 1500 holds someone else's route: skipped
    ids = sorted(e["id"] for e in configured["endpoints"] if e["address"] != "192.0.2.1")
    assert ids == list(range(250, 256))

    again = uplinks(ns, *UPLINKS)
    assert again.returncode == 0 and again.stdout.strip() == "nothing to change", again.stdout
    assert snapshot(ns) == configured
    assert uplinks(ns, "--dry-run", *UPLINKS).stdout.strip() == "nothing to change"

    show = uplinks(ns, "--show").stdout
    for name in UPLINKS:
        assert f"{name} (up): table" in show
    assert "endpoints that are not mptun's" in show and "192.0.2.1" in show

    # an endpoint added later without an id gets a low one: never mistaken for mptun's
    ns.exec("ip", "mptcp", "endpoint", "add", "192.0.2.1", "port", "4242", "dev", "lan0", "signal")
    late = [e for e in snapshot(ns)["endpoints"] if e.get("port") == 4242]
    assert late and late[0]["id"] < 192, late

    # clearing one uplink removes exactly its part
    part = uplinks(ns, "--clear", "wan2")
    assert part.returncode == 0
    left = snapshot(ns)
    ours = [d for k in ("routes4", "routes6") for d in left[k] if d.get("protocol") == "247"]
    assert {d["dev"] for d in ours} == {"wan1", "wan3"}
    text = json.dumps([left["rules4"], left["rules6"], left["endpoints"]])
    assert "198.51.100.33" not in text and "fd00:10:2::1" not in text
    assert "198.51.100.17" in text and "198.51.100.49" in text and "fd00:10:3::1" in text

    cleared = uplinks(ns, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    ns.exec("ip", "mptcp", "endpoint", "delete", "id", str(late[0]["id"]))
    assert snapshot(ns) == before
    assert uplinks(ns, "--clear").stdout.strip() == "nothing of mptun's to remove"


def test_uplinks_errors_are_one_line(bed: Testbed):
    ns = bed.router
    assert ns is not None
    for args, words in [
        (("wan9",), "no such interface"),
        (("--gateway", "wan1=nope", "wan1"), "not an IP address"),
        (("--gateway", "wan2=192.0.2.9", "wan1"), "not an uplink"),
        ((), "give the uplink interfaces"),
        (("--show", "--clear"), "exclude each other"),
    ]:
        r = uplinks(ns, *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mptun: error:"), r.stderr
        assert words in lines[0], lines[0]
    # not root: one line saying so (and --show still works)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = ns.exec(*nobody, *mptun_argv("uplinks", "wan1"), check=False)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("mptun: error: ") and "(needs root or CAP_NET_ADMIN)" in line, line
    assert ns.exec(*nobody, *mptun_argv("uplinks", "--show"), check=False).returncode == 0


def test_watch_restores_route_and_endpoint_when_the_link_comes_back(bed: Testbed):
    ns = bed.router
    assert ns is not None
    up = bed.uplink("wan2")
    w = ns.popen(
        mptun_argv("uplinks", "--watch", *UPLINKS), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    def state() -> tuple[bool, bool]:
        routes = ns.exec("ip", "-4", "route", "show", "table", "all", "proto", "247").stdout
        eps = ns.exec("ip", "mptcp", "endpoint", "show").stdout
        return "dev wan2" in routes, "198.51.100.33" in eps

    def until(want: tuple[bool, bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while state() != want:
            assert w.poll() is None, "the watcher died"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {state()}"
            time.sleep(0.05)

    until((True, True), "the first pass")
    bed.set_link(up, "down")  # the kernel deletes the route; the watcher the endpoint
    until((False, False), "wan2's route and endpoint to go")
    bed.set_link(up, "up")  # nothing in the kernel restores the route: the watcher does
    until((True, True), "wan2's route and endpoint to come back")
    w.terminate()
    out, _ = w.communicate(timeout=10)
    assert w.returncode == 0, out
    assert b"del endpoint 198.51.100.33" in out and b"add route default via 198.51.100.34" in out
    assert state() == (True, True)  # stopping the watcher leaves the configuration in place
