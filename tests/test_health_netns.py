"""Uplink health on the multipath test bed: a blackholed default uplink (link still up) and a
lossy uplink, with `mptun client --uplink` and `mptun uplinks --watch` reading its health file.

The blackhole is nftables on the VPS side dropping everything the uplink carries both ways; the
loss is `numgen random mod 100 < 30` on what arrives through the uplink. Times are taken from the
processes' own log lines (wall clock, milliseconds) against the moment the rule went in, so
`mptun status`'s start-up time does not count; bounds are the mechanism's with wide margins.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from mptun.lab.rig import SOCKS_PORT, TRAFFIC_PORT, Rig, mptun_argv
from mptun.lab.testbed import INET_HOST_V4, LAN_ROUTER_V4, Testbed
from mptun.lab.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.usefixtures("needs_mptcp_testbed")]

UPLINKS = ("wan1", "wan2", "wan3")
INTERVAL = 0.5  # the client's default --uplink-check-interval

# Opens `count` SOCKS connections one after another from the LAN host, each asking the traffic
# peer for data; prints one JSON list: seconds from connect to the first byte (None: failed).
FIRST_BYTES = r"""
import json, socket, sys, time
from mptun.common.address import Address
from mptun.lab.traffic import socks_connect
socks, target, count = sys.argv[1], Address.parse(sys.argv[2]), int(sys.argv[3])
host, port = socks.rsplit(":", 1)
out = []
for _ in range(count):
    t = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(5)
            socks_connect(s, target)
            s.sendall(b"SEND 0.05\n")
            out.append(round(time.monotonic() - t, 3) if s.recv(1) else None)
    except OSError:
        out.append(None)
print(json.dumps(out))
"""


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Testbed, Rig]]:
    """The test bed, `mptun uplinks --watch` and a client probing every uplink, sharing a health
    file of this test's own (MPTUN_HEALTH_FILE reaches both commands)."""
    monkeypatch.setenv("MPTUN_HEALTH_FILE", str(tmp_path / "health.json"))
    tb = Testbed(rates_mbit=(None, None, None), ipv6=False)
    tb.__enter__()
    r = Rig(tb, tmp_path, uplinks=UPLINKS, watch=True, client_args=_uplink_args())
    try:
        r.start()
        wait_until(lambda: _states(r) == dict.fromkeys(UPLINKS, "up"), 20, "all uplinks up")
        yield tb, r
    finally:
        tb.destroy()
        r.close()
        print(r.dump_logs())


def _uplink_args() -> list[str]:
    return [arg for name in UPLINKS for arg in ("--uplink", name)]


def _states(r: Rig) -> dict[str, str]:
    (client,) = r.status()["clients"]
    return {u["name"]: u["state"] for u in client.get("uplink_health") or []}


def _far_side(tb: Testbed, uplink: str, verdict: str, both_ways: bool) -> None:
    """nftables in the VPS namespace: `verdict` for what the uplink carries (in, and out)."""
    assert tb.vps is not None
    vps_if = tb.uplink(uplink).vps_if
    chains = [("input", "iifname")] + ([("output", "oifname")] if both_ways else [])
    rules = "".join(
        f"  chain {hook} {{\n    type filter hook {hook} priority 0;\n"
        f"    {match} {vps_if} {verdict}\n  }}\n"
        for hook, match in chains
    )
    tb.vps.exec("nft", "-f", "-", input=f"table inet mptun_health {{\n{rules}}}\n")


def _clear_far_side(tb: Testbed) -> None:
    assert tb.vps is not None
    tb.vps.exec("nft", "delete", "table", "inet", "mptun_health")


def _logged_at(r: Rig, log: str, pattern: str) -> float | None:
    """Wall-clock time of the first line of `log` matching `pattern` (its timestamp)."""
    text = r.logs[log].read_text()
    for line in text.splitlines():
        if re.search(pattern, line):
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def _first_bytes(tb: Testbed, count: int) -> list[float | None]:
    assert tb.lan is not None
    r = tb.lan.exec(
        sys.executable,
        "-c",
        FIRST_BYTES,
        f"{LAN_ROUTER_V4}:{SOCKS_PORT}",
        f"{INET_HOST_V4}:{TRAFFIC_PORT}",
        str(count),
        timeout=60,
    )
    return json.loads(r.stdout)


@pytest.mark.timing
def test_blackholed_default_uplink_is_avoided_and_comes_back(bed) -> None:
    tb, r = bed
    assert _first_bytes(tb, 1)[0] is not None  # the tunnel works before
    blackholed = time.time()
    _far_side(tb, "wan1", "drop", both_ways=True)  # wan1 carries the default route
    # Dead within dead_after (1.5 s) + one probe timeout (0.75 s) + a round (0.5 s): 2.75 s at
    # most by the mechanism; new tunnels are steered from then on. From 3 s on, each new SOCKS
    # connection gets its first byte in under a second (a tunnel through wan1 would wait out
    # the 10 s connect timeout).
    wait_until(lambda: _logged_at(r, "client", r"uplink wan1: up -> dead"), 10, "wan1 dead")
    dead_at = _logged_at(r, "client", r"uplink wan1: up -> dead")
    assert dead_at is not None and dead_at - blackholed <= 3.0
    time.sleep(max(0.0, blackholed + 3.0 - time.time()))
    times = _first_bytes(tb, 5)
    print(f"figures: dead {dead_at - blackholed:.2f} s after the drop; first bytes {times}")
    assert all(t is not None and t < 1.0 for t in times), times
    # No new subflows over it: `mptun uplinks --watch` withdrew its endpoint.
    wait_until(
        lambda: _logged_at(r, "watch", r"del endpoint 198\.51\.100\.17"), 5, "endpoint withdrawn"
    )
    st = r.status()
    (health,) = [u for u in st["clients"][0]["uplink_health"] if u["name"] == "wan1"]
    assert health["state"] == "dead" and "no answer" in health["reason"]
    assert (
        "Blackhole" in st["counters"] or not Path("/proc/sys/net/mptcp/blackhole_timeout").exists()
    )
    # Recovery: back within two probe intervals of the rule going (one round to send, one
    # round trip to answer); the endpoint follows within the watcher's poll (0.25 s).
    back = time.time()
    _clear_far_side(tb)
    pattern = r"uplink wan1: dead -> (up|degraded)"
    wait_until(lambda: _logged_at(r, "client", pattern), 10, "wan1 back")
    recovered = _logged_at(r, "client", pattern) - back  # type: ignore[operator]
    print(f"figures: back {recovered:.2f} s after the drop went")
    assert recovered <= 2 * INTERVAL + 1.0
    add = r"add endpoint 198\.51\.100\.17"
    wait_until(lambda: _logged_at(r, "watch", add) and _count(r, "watch", add) >= 2, 10, "re-add")
    readded = _last_logged_at(r, "watch", add) - back
    print(f"figures: endpoint re-added {readded:.2f} s after the drop went")
    assert readded <= 2 * INTERVAL + 2.0
    assert _first_bytes(tb, 1)[0] is not None


def _count(r: Rig, log: str, pattern: str) -> int:
    return sum(1 for line in r.logs[log].read_text().splitlines() if re.search(pattern, line))


def _last_logged_at(r: Rig, log: str, pattern: str) -> float:
    lines = [ln for ln in r.logs[log].read_text().splitlines() if re.search(pattern, ln)]
    return datetime.strptime(lines[-1][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow
@pytest.mark.timing
def test_lossy_uplink_is_degraded_without_flapping(bed) -> None:
    tb, r = bed
    _far_side(tb, "wan2", "numgen random mod 100 < 30 drop", both_ways=True)
    wait_until(lambda: _states(r).get("wan2") == "degraded", 15, "wan2 degraded")
    start = time.monotonic()
    seen = set()
    while time.monotonic() - start < 60:  # the minute
        seen.add(_states(r)["wan2"])
        time.sleep(0.5)
    assert seen == {"degraded"}, seen
    changes = [ln for ln in r.logs["client"].read_text().splitlines() if "uplink wan2:" in ln]
    assert len(changes) <= 2, changes  # unknown -> up -> degraded, never dead, no way back
    assert all("dead" not in ln for ln in changes), changes
    assert _states(r)["wan1"] == "up" and _states(r)["wan3"] == "up"


def test_uplinks_honours_the_health_file_and_turns_blackhole_detection_off(
    tmp_path: Path,
) -> None:
    """`mptun uplinks` (as the hotplug script runs it) gives a dead uplink no endpoint, and
    sets net.mptcp.blackhole_timeout to 0 where the kernel has it."""
    health = tmp_path / "health.json"
    health.write_text(
        json.dumps(
            {
                "updated": time.time(),
                "withdrawn": ["wan2"],
                "uplinks": {"wan2": {"state": "dead"}, "wan1": {"state": "up"}},
            }
        )
    )
    sysctl = Path("/proc/sys/net/mptcp/blackhole_timeout")
    with Testbed(rates_mbit=(None, None), ipv6=False) as tb:
        assert tb.router is not None
        if sysctl.exists():
            tb.router.sysctl("net.mptcp.blackhole_timeout", 3600)
        r = tb.router.exec(
            *mptun_argv("uplinks", "wan1", "wan2", "--health-file", str(health)), check=False
        )
        assert r.returncode == 0, r.stderr
        assert "add endpoint 198.51.100.17" in r.stdout
        assert "endpoint 198.51.100.33" not in r.stdout  # wan2 is dead: no endpoint
        assert "wan2 is dead by the uplink health checks" in r.stderr
        assert "add rule 1501: from 198.51.100.33" in r.stdout  # its rules stay
        if sysctl.exists():
            value = tb.router.exec("cat", str(sysctl)).stdout.strip()
            assert value == "0" and "blackhole_timeout 0" in r.stdout
        # The file goes stale (its client stopped): wan2 gets its endpoint back.
        health.write_text(json.dumps({"updated": time.time() - 60, "withdrawn": ["wan2"]}))
        r = tb.router.exec(
            *mptun_argv("uplinks", "wan1", "wan2", "--health-file", str(health)), check=False
        )
        assert "add endpoint 198.51.100.33" in r.stdout, r.stdout + r.stderr


@pytest.mark.timing
def test_mptcp_stripped_on_the_default_uplink_is_named_and_avoided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A middlebox on wan1 only (the default route's uplink) strips MPTCP from SYNs: after two
    tunnels fell back through it, `mptun status` names wan1 mptcp-broken with the evidence and
    new tunnels' first subflow leaves through another uplink, keeping MPTCP."""
    monkeypatch.setenv("MPTUN_HEALTH_FILE", str(tmp_path / "health.json"))
    tb = Testbed(rates_mbit=(None, None, None), ipv6=False, middlebox=True)
    tb.__enter__()
    r = Rig(tb, tmp_path, uplinks=UPLINKS, watch=True, client_args=_uplink_args())
    try:
        assert tb.mbox is not None
        tb.mbox.exec(
            "nft",
            "-f",
            "-",
            input="table bridge mptun_strip1 {\n  chain strip {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            '    iifname "r1" tcp flags syn reset tcp option mptcp\n  }\n}\n',
        )
        r.start()
        wait_until(lambda: _states(r) == dict.fromkeys(UPLINKS, "up"), 20, "all uplinks up")
        assert all(t is not None for t in _first_bytes(tb, 3))  # fell back, but they work
        wait_until(lambda: _states(r).get("wan1") == "mptcp-broken", 10, "wan1 mptcp-broken")
        (client,) = r.status()["clients"]
        (wan1,) = [u for u in client["uplink_health"] if u["name"] == "wan1"]
        assert "fell back to TCP" in wan1["reason"]
        fallbacks = client["counters"].get("mptcp-fallback", 0)
        assert all(t is not None for t in _first_bytes(tb, 3))
        (client,) = r.status()["clients"]
        assert client["counters"].get("mptcp-fallback", 0) == fallbacks  # no more fell back
        text = tb.router.exec(*mptun_argv("status")).stdout  # type: ignore[union-attr]
        assert "wan1" in text and "mptcp-broken" in text
    finally:
        tb.destroy()
        r.close()
        print(r.dump_logs())
