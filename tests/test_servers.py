"""The choice between several servers (client/servers.py), as a pure object on a fake clock."""

from __future__ import annotations

import pytest

from mptun.client.servers import Change, Policy, Server, ServerSet, State
from mptun.common.address import Address


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(n: int = 3, policy: Policy = Policy.FAILOVER, **kw) -> tuple[ServerSet, list[Change]]:
    changes: list[Change] = []
    servers = [Server(Address.parse(f"192.0.2.{i + 1}:8443"), bytes(32)) for i in range(n)]
    clock = kw.pop("clock", Clock())
    return ServerSet(servers, policy, clock=clock, on_change=changes.append, **kw), changes


def test_failover_prefers_the_first_that_is_not_down():
    s, changes = make()
    assert s.order() == [0, 1, 2]  # unknown: tried in the order given
    s.check_ok(1, 0.010)
    s.check_ok(2, 0.001)
    assert s.order() == [0, 1, 2]  # failover ignores round trips
    s.tunnel_failed(0, "refused")
    assert s.order() == [1, 2]
    assert [(c.index, c.old, c.new) for c in changes] == [
        (1, State.UNKNOWN, State.UP),
        (2, State.UNKNOWN, State.UP),
        (0, State.UNKNOWN, State.DOWN),
    ]
    s.check_ok(0, 0.050)  # the first answers again: new tunnels return to it
    assert s.order()[0] == 0
    assert changes[-1] == Change(0, s.servers[0].address, State.DOWN, State.UP, "")


def test_a_lost_check_is_not_down_two_in_a_row_are():
    s, changes = make(down_after=2)
    s.check_ok(0, 0.01)
    assert s.check_failed(0, "timed out") is None
    assert s.health[0].state is State.UP and s.order()[0] == 0
    s.check_ok(0, 0.01)  # an answer in between starts the count again
    assert s.check_failed(0, "timed out") is None
    change = s.check_failed(0, "timed out")
    assert change is not None and change.new is State.DOWN and change.reason == "timed out"
    assert s.order() == [1, 2]
    assert s.check_failed(0, "refused") is None  # already down: no second change
    assert s.health[0].reason == "refused"
    assert len([c for c in changes if c.index == 0]) == 2  # up, then down: one each


def test_all_down_and_back():
    s, _ = make(2)
    assert not s.all_down  # unknown is not down
    s.tunnel_failed(0, "x")
    assert not s.all_down
    s.tunnel_failed(1, "y")
    assert s.all_down and s.order() == []
    s.tunnel_ok(1)
    assert not s.all_down and s.order() == [1]


def test_lowest_rtt_picks_the_fastest_and_does_not_flap():
    s, _ = make(3, Policy.LOWEST_RTT)
    s.check_ok(0, 0.100)
    s.check_ok(1, 0.020)
    assert s.order()[:2] == [1, 0]  # 2 is unknown: after the measured ones
    assert s.order()[2] == 2
    # Server 0 becomes a little faster than 1 (smoothed): not by the margin, so 1 stays.
    for _ in range(40):
        s.check_ok(0, 0.018)
        s.check_ok(1, 0.020)
    assert s.health[0].rtt is not None and s.health[0].rtt < s.health[1].rtt  # type: ignore[operator]
    assert s.order()[0] == 1
    # Clearly faster (by more than 25% and 5 ms): it moves.
    for _ in range(40):
        s.check_ok(0, 0.002)
    assert s.order()[0] == 0
    # The fastest goes down: the next fastest; it comes back with a fresh round trip.
    s.tunnel_failed(0, "refused")
    assert s.order()[0] == 1
    s.check_ok(0, 0.001)
    assert s.health[0].rtt == pytest.approx(0.001)
    assert s.order()[0] == 0


def test_snapshot_for_status():
    clock = Clock()
    s, _ = make(2, clock=clock)
    s.check_ok(0, 0.0123)
    clock.now += 5
    s.tunnel_failed(1, "connection refused")
    clock.now += 2
    snap = s.snapshot()
    assert snap[0] == {
        "server": "192.0.2.1:8443",
        "state": "up",
        "for_seconds": 7.0,
        "rtt_ms": 12.3,
        "reason": "",
        "checks": 1,
        "checks_failed": 0,
        "preferred": True,
    }
    assert snap[1]["state"] == "down" and snap[1]["for_seconds"] == 2.0
    assert snap[1]["reason"] == "connection refused" and not snap[1]["preferred"]


def test_needs_a_server():
    with pytest.raises(ValueError):
        ServerSet([])


def test_status_shows_each_server_and_checks_its_types():
    """What `mptun status` prints from a client's servers, and an answer of the wrong shape
    refused (the control socket's answer is not trusted)."""
    from mptun.client import control
    from mptun.client.status import Report, render

    s, _ = make(2)
    s.check_ok(0, 0.004)
    s.tunnel_failed(1, "unreachable: ECONNREFUSED")
    doc = {
        "pid": 1,
        "server": "192.0.2.1:8443",
        "servers": s.snapshot(),
        "server_policy": "failover",
        "when_down": "reject",
        "listeners": [],
        "connections": [],
    }
    assert control.check_document(doc) is doc
    text = "\n".join(render(Report(clients=[doc])))
    assert "servers (--server-policy failover, --when-down reject):" in text
    assert "192.0.2.1:8443  up for 0 s, check round trip 4.0 ms (new tunnels go here)" in text
    assert "192.0.2.2:8443  down for 0 s: unreachable: ECONNREFUSED" in text
    bad = {**doc, "servers": [{"server": "x", "state": 3}]}
    with pytest.raises(control.NotRead):
        control.check_document(bad)
