"""Uplink health under load on the multipath test bed: a blackholed default uplink while a long
download runs (it goes on over the others; SOCKS and redirected connections keep working), and
MPTCP stripped on one uplink only (new tunnels still aggregate over the other two).

Rates are tbf's, far below what the machine moves, and measured over windows of seconds (the
fetcher's running byte count), never at an instant; the fetcher checks every byte against the
peer's pattern at its offset and the peer's total must equal the fetcher's. Times of state
changes come from the client's own log lines against the moment a rule went in.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.rig import SOCKS_PORT, TRAFFIC_PORT, Rig, mptun_argv
from mptun.lab.testbed import INET_HOST_V4, LAN_ROUTER_V4, Testbed
from mptun.lab.wait import wait_until
from tests.test_health_netns import (
    INTERVAL,
    UPLINKS,
    _clear_far_side,
    _far_side,
    _logged_at,
    _states,
    _uplink_args,
)
from tests.test_multipath import (
    connections,
    counter_rows,
    iface_mbit,
    mbit,
    run_fetch,
    status_when,
    subflows,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.usefixtures("needs_mptcp_testbed"),
]

REDIR_PORT = 1234

# `count` connections one after another from the LAN host, through SOCKS (argv[1] "socks") or
# straight to the target (argv[1] "direct": the router's nft redirect takes it to --redir),
# each asking the traffic peer for data; one JSON list: seconds from connect to the first byte
# (None: failed).
FIRST_BYTES = r"""
import json, socket, sys, time
from mptun.common.address import Address
from mptun.lab.traffic import socks_connect
mode, socks, target, count = sys.argv[1], sys.argv[2], Address.parse(sys.argv[3]), int(sys.argv[4])
host, port = socks.rsplit(":", 1)
out = []
for _ in range(count):
    t = time.monotonic()
    try:
        peer = (host, int(port)) if mode == "socks" else target.sockaddr()[:2]
        with socket.create_connection(peer, timeout=5) as s:
            s.settimeout(5)
            if mode == "socks":
                socks_connect(s, target)
            s.sendall(b"SEND 0.05\n")
            out.append(round(time.monotonic() - t, 3) if s.recv(1) else None)
    except OSError:
        out.append(None)
print(json.dumps(out))
"""


def first_bytes(tb: Testbed, mode: str, count: int) -> list[float | None]:
    """Seconds to the first byte of `count` new connections (`socks` or redirected `direct`)."""
    assert tb.lan is not None
    r = tb.lan.exec(
        sys.executable,
        "-c",
        FIRST_BYTES,
        mode,
        f"{LAN_ROUTER_V4}:{SOCKS_PORT}",
        f"{INET_HOST_V4}:{TRAFFIC_PORT}",
        str(count),
        timeout=60,
    )
    return json.loads(r.stdout)


def redirect_to_redir(tb: Testbed) -> None:
    """The router's nftables send the LAN's TCP to the traffic port into `--redir`, as
    `mptun nft` does for every port (a nat `redirect` in prerouting)."""
    assert tb.router is not None
    tb.router.exec(
        "nft",
        "-f",
        "-",
        input="table ip mptun_proofs {\n  chain pre {\n"
        "    type nat hook prerouting priority dstnat;\n"
        f'    iifname "lan0" tcp dport {TRAFFIC_PORT} counter redirect to :{REDIR_PORT}\n'
        "  }\n}\n",
    )


def redirected_packets(tb: Testbed) -> int:
    """How many packets the redirect rule took (its counter): one per connection."""
    assert tb.router is not None
    out = tb.router.exec("nft", "-j", "list", "table", "ip", "mptun_proofs").stdout
    return sum(
        expr["counter"]["packets"]
        for item in json.loads(out)["nftables"]
        for expr in item.get("rule", {}).get("expr", [])
        if "counter" in expr
    )


@pytest.fixture
def bed_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Factory: a shaped test bed, `mptun uplinks --watch` and a client probing every uplink
    (sharing a health file of this test's own); torn down, logs shown, at the end."""
    monkeypatch.setenv("MPTUN_HEALTH_FILE", str(tmp_path / "health.json"))
    made: list[tuple[Testbed, Rig]] = []

    def make(prepare=None, client_args=(), **testbed) -> tuple[Testbed, Rig]:
        tb = Testbed(ipv6=False, **testbed)
        tb.__enter__()
        r = Rig(
            tb, tmp_path, uplinks=UPLINKS, watch=True, client_args=[*_uplink_args(), *client_args]
        )
        made.append((tb, r))
        if prepare is not None:
            prepare(tb)
        r.start()
        wait_until(lambda: _states(r) == dict.fromkeys(UPLINKS, "up"), 20, "all uplinks up")
        return tb, r

    yield make
    for tb, r in made:
        tb.destroy()
        r.close()
        print(r.dump_logs())


def ifaces_in_use(status: dict) -> set[str]:
    """The uplinks any tunnel connection has a subflow on."""
    return {sf["iface"] for c in connections(status) for sf in c["subflows"]}


@pytest.mark.timing
def test_blackholed_default_uplink_under_a_long_download(bed_factory) -> None:
    """wan1 (the default route's) blackholed both ways on the far side, link up, while one
    download runs: it goes on at >= 70% of wan2+wan3, intact; from 3 s after the drop new SOCKS
    and redirected connections get their first byte in under 1 s; once the drop goes, wan1 is
    up again within two probe intervals (+ margin) and carries tunnel traffic again."""
    tb, r = bed_factory(
        prepare=redirect_to_redir,
        client_args=["--redir", f"[::]:{REDIR_PORT}"],
        rates_mbit=(50, 30, 20),
    )
    rates = {u.router_if: u.rate_mbit for u in tb.uplinks}
    others = rates["wan2"] + rates["wan3"]
    assert all(t is not None for t in first_bytes(tb, "direct", 1))  # the redirect works
    seconds = 28.0
    sampler = r.counters(0.25)
    f, t_start = r.fetch(seconds, interval=0.25), time.monotonic()
    status_when(r, subflows(3), 10, "a subflow on each uplink")
    time.sleep(2)
    blackholed, t_drop = time.time(), time.monotonic()
    _far_side(tb, "wan1", "drop", both_ways=True)
    # dead_after (1.5 s) + a probe timeout (0.75 s) + a round (0.5 s) <= 3 s by the mechanism
    time.sleep(max(0.0, t_drop + 3.0 - time.monotonic()))
    t_new = time.monotonic() - t_drop
    socks = first_bytes(tb, "socks", 3)
    redirected = first_bytes(tb, "direct", 3)
    dead_at = _logged_at(r, "client", r"uplink wan1: up -> dead")
    time.sleep(max(0.0, t_drop + 12.0 - time.monotonic()))
    cleared, t_clear = time.time(), time.monotonic()
    _clear_far_side(tb)
    pattern = r"uplink wan1: dead -> (up|degraded)"
    wait_until(lambda: _logged_at(r, "client", pattern), 10, "wan1 back")
    recovered = _logged_at(r, "client", pattern) - cleared  # type: ignore[operator]
    # Back in use: the download (the one tunnel open now) has a subflow on wan1 again, which
    # `mptun uplinks --watch` re-adding the endpoint gives it (the kernel's path manager opens
    # subflows from a new endpoint for existing connections too).
    deadline = time.monotonic() + 10
    used_again = None
    while time.monotonic() < deadline:
        if "wan1" in ifaces_in_use(r.status()):
            used_again = time.monotonic() - t_clear
            break
        time.sleep(0.1)
    rows, done = run_fetch(f)
    ctr = counter_rows(sampler)
    assert dead_at is not None
    print(
        f"figures: dead {dead_at - blackholed:.2f} s after the drop; new connections from "
        f"{t_new:.2f} s: SOCKS {socks}, redirected {redirected}"
    )
    window = (t_drop + 4.0, t_clear)  # after the failover, before the drop went
    moved = mbit(rows, *window)
    print(f"figures: download {moved:.1f} Mbit/s over wan2+wan3's {others} ({moved / others:.0%})")
    print(
        f"figures: wan1 up again {recovered:.2f} s after the drop went; in use again {used_again}"
    )
    assert done["ok"], done
    # the download: the peer sent what arrived, nothing lost or duplicated
    wait_until(lambda: done["bytes"] in r.sent_totals(1, 0), 10, "the peer's total")
    assert dead_at - blackholed <= 3.0
    assert t_new <= 3.0 + 0.5  # the new connections started at the 3 s mark
    assert all(t is not None and t < 1.0 for t in socks), socks
    assert all(t is not None and t < 1.0 for t in redirected), redirected
    # each went through the redirect, not around it (a nat chain sees a connection's first
    # packet only: one per connection)
    assert redirected_packets(tb) >= 1 + len(redirected)
    assert moved >= 0.7 * others
    assert recovered <= 2 * INTERVAL + 1.0
    assert used_again is not None and used_again <= 2 * INTERVAL + 3.0
    carried = iface_mbit(ctr, "wan1", t_clear + used_again + 1.0, t_start + seconds - 1.0)
    print(f"figures: wan1 then carried {carried:.1f} of {rates['wan1']} Mbit/s")
    assert carried >= 0.3 * rates["wan1"]  # (the failover test's bound for a returned uplink)


def strip_mptcp_on(tb: Testbed, port: str) -> None:
    """The middlebox removes the MPTCP option from SYNs entering from one uplink only."""
    assert tb.mbox is not None
    tb.mbox.exec(
        "nft",
        "-f",
        "-",
        input="table bridge mptun_strip_one {\n  chain strip {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f'    iifname "{port}" tcp flags syn reset tcp option mptcp\n  }}\n}}\n',
    )


@pytest.mark.timing
def test_mptcp_stripped_on_one_uplink_the_other_two_still_aggregate(bed_factory) -> None:
    """100+60+40 Mbit with MPTCP stripped on wan1 (the default route's): once wan1 is named
    mptcp-broken, a new tunnel gets >= 90% of wan2+wan3 (the aggregation test's bound and
    window), and `mptun status` names wan1."""
    tb, r = bed_factory(middlebox=True, rates_mbit=(100, 60, 40))
    strip_mptcp_on(tb, "r1")
    others = sum(u.rate_mbit for u in tb.uplinks if u.router_if != "wan1")  # type: ignore[misc]
    assert all(t is not None for t in first_bytes(tb, "socks", 3))  # fell back, but work
    wait_until(lambda: _states(r).get("wan1") == "mptcp-broken", 10, "wan1 mptcp-broken")
    f = r.fetch(10)
    st = status_when(r, subflows(2), 10, "two subflows")
    rows, done = run_fetch(f)
    (conn,) = connections(st)
    start = rows[0]["mono"]
    rate = mbit(rows, start + 2, start + 10)
    print(f"figures: {rate:.1f} Mbit/s of wan2+wan3's {others} ({rate / others:.0%}); {conn}")
    assert done["ok"], done
    assert conn["kind"] == "mptcp", conn
    assert "wan1" not in {sf["iface"] for sf in conn["subflows"]}, conn  # the other two carry it
    assert rate >= 0.9 * others
    assert tb.router is not None
    text = tb.router.exec(*mptun_argv("status")).stdout
    line = [ln for ln in text.splitlines() if "wan1" in ln and "mptcp-broken" in ln]
    print(f"figures: status says {line}")
    assert line, text
