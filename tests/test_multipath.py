"""Multipath on a real kernel over real shaped links: aggregation, failover, fallback, IPv6.

Topology: mptun.lab.testbed (LAN host -- router ==3 tbf-shaped uplinks== VPS -- inet host).
Rates are set by tbf far below what the machine moves, so ratios against the configured rates
are fair assertions; every rate is measured over a window of seconds (the fetcher's running byte
count and the uplinks' /sys counters), never at an instant. Margins are wide.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.lab.rig import Fetch, Rig, mptun_argv
from mptun.lab.testbed import Testbed
from mptun.lab.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.usefixtures("needs_mptcp_testbed")]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator:
    """Factory: a built test bed with the rig started; both torn down, logs shown on failure."""
    made: list[tuple[Testbed, Rig]] = []

    def make(testbed: dict | None = None, prepare=None, **kw) -> tuple[Testbed, Rig]:
        tb = Testbed(**(testbed or {}))
        tb.__enter__()
        r = Rig(tb, tmp_path, **kw)
        made.append((tb, r))
        if prepare is not None:
            prepare(tb)
        r.start()
        return tb, r

    yield make
    for tb, r in made:
        tb.destroy()
        r.close()
        print(r.dump_logs())


def run_fetch(f: Fetch) -> tuple[list[dict], dict]:
    """All progress rows (mono, cumulative bytes) and the final row of a fetch."""
    rows, done = [], {}
    for row in f.rows():
        if row["event"] in ("start", "progress"):
            rows.append({"mono": row["mono"], "bytes": row.get("bytes", 0)})
        elif row["event"] == "done":
            done = row
            rows.append({"mono": row["mono"], "bytes": row["bytes"]})
    f.proc.wait(10)
    return rows, done


def fetch_with_status(r: Rig, seconds: float, until, what: str, **kw) -> tuple[dict, list, dict]:
    """One fetch of `seconds` through the tunnel with `mptun status` polled while it runs until
    `until(status)` holds (never a fixed sleep: a loaded machine joins subflows later): that
    status, then the fetch's rows and final row (`run_fetch`)."""
    f = r.fetch(seconds, **kw)
    st = status_when(r, until, seconds, what)
    rows, done = run_fetch(f)
    return st, rows, done


def status_when(r: Rig, until, timeout: float, what: str) -> dict:
    """`mptun status` once `until(status)` holds, polled for up to `timeout` s."""

    def look() -> dict | None:
        st = r.status()
        return st if until(st) else None

    return wait_until(look, timeout, what, interval=0.2)


def connections(status: dict) -> list[dict]:
    """The tunnel connections `mptun status` lists (none before the first one is open)."""
    return [c for client in status["clients"] for c in client["connections"]]


def subflows(n: int):
    """A status condition: one tunnel, with at least `n` subflows."""

    def holds(status: dict) -> bool:
        conns = connections(status)
        return len(conns) == 1 and len(conns[0]["subflows"]) >= n

    return holds


def mbit(rows: list[dict], t0: float, t1: float) -> float:
    """Mean rate in Mbit/s between the first row at or after t0 and the last at or before t1."""
    inside = [r for r in rows if t0 <= r["mono"] <= t1]
    assert len(inside) >= 2, (t0, t1, rows[:3], rows[-3:])
    a, b = inside[0], inside[-1]
    return (b["bytes"] - a["bytes"]) * 8 / (b["mono"] - a["mono"]) / 1e6


def counter_rows(proc) -> list[dict]:
    proc.terminate()
    out, _ = proc.communicate(10)
    return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


def iface_mbit(rows: list[dict], iface: str, t0: float, t1: float) -> float:
    """Download rate of a router uplink (its rx counter) over [t0, t1], in Mbit/s."""
    inside = [r for r in rows if t0 <= r["mono"] <= t1 and r["rx"].get(iface) is not None]
    assert len(inside) >= 2, (iface, t0, t1)
    a, b = inside[0], inside[-1]
    return (b["rx"][iface] - a["rx"][iface]) * 8 / (b["mono"] - a["mono"]) / 1e6


def tunnel(status: dict) -> dict:
    (client,) = status["clients"]
    (conn,) = client["connections"]
    return conn


@pytest.mark.slow
@pytest.mark.timing
def test_one_connection_gets_the_sum_of_three_uplinks_and_one_uplink_alone_its_own(rig):
    """100+60+40 Mbit: >= 90% of 200 for one TCP connection; with the uplinks cleared, the
    same connection stays at or below the one uplink it then uses (so this can fail)."""
    tb, r = rig()
    rates = {u.router_if: u.rate_mbit for u in tb.uplinks}
    total = sum(rates.values())
    sampler = r.counters(0.5)
    st, rows, done = fetch_with_status(r, 10, subflows(3), "a subflow on each uplink")
    conn = tunnel(st)
    ctr = counter_rows(sampler)
    assert done["ok"], done
    assert r.sent_totals() == [done["bytes"]]
    assert conn["kind"] == "mptcp"
    assert sorted(sf["iface"] for sf in conn["subflows"]) == ["wan1", "wan2", "wan3"], conn
    start = rows[0]["mono"]
    window = (start + 2, start + 10)  # after slow start, before the peer stops sending
    rate = mbit(rows, *window)
    print(f"aggregate {rate:.1f} Mbit/s of {total} ({rate / total:.1%})")
    assert rate >= 0.9 * total
    for name, link_rate in rates.items():
        carried = iface_mbit(ctr, name, *window)
        print(f"{name}: {carried:.1f} of {link_rate} Mbit/s")
        assert carried >= 0.75 * link_rate, name  # every uplink does its share
        assert carried <= 1.05 * link_rate, name  # and tbf holds its rate

    # the same, through one uplink: without endpoints the connection has its first subflow only
    assert tb.router is not None
    cleared = tb.router.exec(*mptun_argv("uplinks", "--clear"))
    assert "del endpoint" in cleared.stdout
    # no endpoints: no subflow can join, so once the tunnel has its first, it has all it gets
    st, rows, done = fetch_with_status(r, 10, subflows(1), "the tunnel")
    conn = tunnel(st)
    assert done["ok"], done
    assert len(conn["subflows"]) == 1
    (only,) = conn["subflows"]
    single = rates[only["iface"]]
    start = rows[0]["mono"]
    rate = mbit(rows, start + 2, start + 10)
    print(f"one uplink ({only['iface']}): {rate:.1f} Mbit/s of {single}")
    assert rate <= 1.02 * single
    assert rate >= 0.5 * single  # it works at all
    # and the status says why the speeds no longer add up
    assert any("no MPTCP endpoint" in p for p in st["problems"]), st["problems"]
    assert any("no MPTCP subflow endpoints" in p for p in st["problems"]), st["problems"]


@pytest.mark.slow
@pytest.mark.timing
def test_failover_keeps_one_connection_going_and_watch_brings_the_uplink_back(rig):
    """A 30 s transfer; at 8 s the uplink of the first subflow goes down, at 16 s it comes back.

    The transfer never stalls, moves >= 70% of the other uplinks' capacity while it is down,
    `mptun uplinks --watch` restores the uplink and it carries traffic again before the end;
    the peer's byte count and the checked pattern say nothing was lost or duplicated.
    """
    tb, r = rig(watch=True)
    rates = {u.router_if: u.rate_mbit for u in tb.uplinks}
    sampler = r.counters(0.25)
    f = r.fetch(30, interval=0.25)
    t0 = time.monotonic()
    time.sleep(8)
    conn = tunnel(r.status())
    first = min(conn["subflows"], key=lambda sf: sf["id"])
    name = first["iface"]
    up = tb.uplink(name)
    tb.set_link(up, "down")
    t_down = time.monotonic()
    time.sleep(8)
    tb.set_link(up, "up")
    t_up = time.monotonic()
    back = wait_until(
        lambda: [sf for sf in tunnel(r.status())["subflows"] if sf["iface"] == name],
        10,
        f"a subflow on {name} again",
    )
    t_back = time.monotonic()
    rows, done = run_fetch(f)
    ctr = counter_rows(sampler)
    assert done["ok"], done
    assert r.sent_totals() == [done["bytes"]]  # nothing lost, nothing duplicated
    end = t0 + 30
    # never stops: no second of the transfer without bytes
    stream = [x for x in rows if x["mono"] <= end]
    gaps = [b["mono"] - a["mono"] for a, b in itertools.pairwise(stream)]
    print(f"longest pause between received bytes: {max(gaps):.2f} s")
    assert max(gaps) < 1.0
    others = sum(v for k, v in rates.items() if k != name)
    moved = mbit(rows, t_down, t_up)
    print(f"{name} down {t_up - t_down:.1f} s: {moved:.1f} Mbit/s over the others' {others}")
    assert moved >= 0.7 * others
    print(f"subflow on {name} again {t_back - t_up:.1f} s after link up: {back}")
    carried = iface_mbit(ctr, name, t_back + 1, end - 1)
    print(f"{name} after it came back: {carried:.1f} of {rates[name]} Mbit/s")
    assert carried >= 0.3 * rates[name]
    assert "add endpoint" in r.logs["watch"].read_text()


@pytest.mark.slow
def test_middlebox_stripping_mptcp_falls_back_to_tcp_and_status_says_so(rig):
    """The same path works with MPTCP; with the option stripped from SYNs on a namespace in
    between (nftables), the next connection still works, over plain TCP, and status says so."""
    tb, r = rig(testbed={"middlebox": True})
    st, _, done = fetch_with_status(r, 3, subflows(3), "a subflow on each uplink")
    before = tunnel(st)
    assert done["ok"] and before["kind"] == "mptcp" and len(before["subflows"]) == 3, before

    tb.strip_mptcp()
    # Long enough that both status calls below see the transfer even on a loaded machine.
    f = r.fetch(8)
    st = status_when(r, subflows(1), 8, "the tunnel")
    text = tb.router.exec(*mptun_argv("status")).stdout
    conn = tunnel(st)
    _, done = run_fetch(f)
    assert done["ok"], done
    assert r.sent_totals(2)[-1] == done["bytes"]
    assert conn["kind"] == "fallback", conn
    assert len(conn["subflows"]) == 1
    assert any(conn["id"] in p and "fell back to plain TCP" in p for p in st["problems"])
    assert st["counters"]["MPCapableFallbackSYNACK"] >= 1
    assert "TCP (MPTCP fell back)" in text and "middlebox" in text


@pytest.mark.slow
@pytest.mark.timing
def test_ipv6_tunnel_over_ipv6_uplinks(rig):
    """Server address, uplinks and target all IPv6, and wan3 an IPv6-only uplink: the tunnel
    works, its subflows are IPv6 on every uplink, and it gets >= 75% of the uplinks' sum."""

    def v6_only_wan3(tb: Testbed) -> None:
        up = tb.uplink("wan3")
        tb.router.ip("addr", "del", f"{up.router_v4}/28", "dev", "wan3")

    tb, r = rig(server_v6=True, prepare=v6_only_wan3)
    assert "198.51.100.49" not in r.uplinks_output and "fd00:10:3::1" in r.uplinks_output
    each = subflows(3)
    st, rows, done = fetch_with_status(r, 6, each, "a subflow on each uplink", v6_target=True)
    conn = tunnel(st)
    assert done["ok"], done
    assert r.sent_totals() == [done["bytes"]]
    assert conn["kind"] == "mptcp"
    assert all(":" in sf["local_ip"] for sf in conn["subflows"]), conn
    assert sorted(sf["iface"] for sf in conn["subflows"]) == ["wan1", "wan2", "wan3"], conn
    start = rows[0]["mono"]
    rate = mbit(rows, start + 2, start + 6)
    total = sum(u.rate_mbit for u in tb.uplinks)
    print(f"IPv6: {rate:.1f} Mbit/s of {total}")
    assert rate >= 0.75 * total


def test_status_explains_a_join_the_server_refused(rig):
    """A VPS left at a subflow limit of 1: one uplink carries no subflow, and status says why."""
    tb, r = rig()
    tb.vps.exec("ip", "mptcp", "limits", "set", "subflows", "1", "add_addr_accepted", "0")

    # the limit lets one join through: two subflows and, for the third uplink, the reason
    def refused_join(status: dict) -> bool:
        return subflows(2)(status) and any(": no subflow" in p for p in status["problems"])

    st, _, done = fetch_with_status(r, 3, refused_join, "two subflows and a refused join")
    conn = tunnel(st)
    assert done["ok"], done
    assert len(conn["subflows"]) == 2, conn
    missing = ({"wan1", "wan2", "wan3"} - {sf["iface"] for sf in conn["subflows"]}).pop()
    (problem,) = [p for p in st["problems"] if p.startswith(f"{conn['id']}: no subflow")]
    assert f"no subflow from {missing}" in problem
    assert "server did not accept the join" in problem and "ip mptcp limits" in problem
