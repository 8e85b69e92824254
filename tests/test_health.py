"""Uplink health as a pure machine on a fake clock: dead within bounds, recovery, no flapping on
a lossy uplink, hysteresis, mptcp-broken; the health file; steering of the first subflow."""

from __future__ import annotations

import ipaddress
import itertools
import json
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mptun.client.control import NotRead, check_document
from mptun.client.health import (
    HEALTH_FILE_MAX_AGE,
    Change,
    HealthMonitor,
    HealthSettings,
    UplinkHealth,
    UplinkState,
    read_withdrawn,
    write_health_file,
)
from mptun.client.status import Report, counter_notes, render
from mptun.client.uplinks import Addr, Endpoint, Limits, Link, Settings, State, plan
from mptun.common.address import Address
from mptun.common.crypto import CIPHERS

S = HealthSettings()


def simulate(
    h: UplinkHealth,
    start: float,
    end: float,
    answers: Callable[[float], bool],
    rtt: float = 0.02,
) -> list[Change]:
    """Rounds of `checks` probes every `interval` from `start` to `end`: an answered probe
    comes back after `rtt`, a lost one after the probe timeout (as the prober records them)."""
    events: list[tuple[float, bool]] = []
    t = start
    while t < end:
        for _ in range(S.checks):
            ok = answers(t)
            events.append((t + (rtt if ok else S.timeout), ok))
        t += S.interval
    changes = []
    for at, ok in sorted(events):
        c = h.record(at, ok, rtt if ok else None, "" if ok else "timed out")
        if c is not None:
            changes.append(c)
    return changes


def test_blackhole_is_dead_within_bound_and_recovers_within_two_intervals() -> None:
    h = UplinkHealth("wan1", S, 0.0)
    simulate(h, 0.0, 5.0, lambda t: True)
    assert h.state == UplinkState.UP
    changes = simulate(h, 5.0, 10.0, lambda t: False)
    assert [c.new for c in changes] == [UplinkState.DEAD]
    # Dead once dead_after has passed without an answer (the last came back before 5.0 s), at
    # the latest one probe timeout and one round after dead_after from the blackhole.
    assert 5.0 < changes[0].at <= 5.0 + S.dead_after + S.timeout + S.interval
    assert "no answer" in changes[0].reason and "timed out" in changes[0].reason
    changes = simulate(h, 10.0, 12.0, lambda t: True)
    assert changes and changes[0].old == UplinkState.DEAD
    assert changes[0].new in (UplinkState.UP, UplinkState.DEGRADED)
    assert changes[0].at <= 10.0 + 2 * S.interval


def test_a_degraded_uplink_needs_a_longer_silence_to_be_dead() -> None:
    """A lossy uplink's run of lost probes as long as dead_after is not a dead uplink; a
    silence of LOSSY_DEAD_FACTOR times that is (a blackhole on a lossy uplink)."""
    from mptun.client.health import LOSSY_DEAD_FACTOR

    rng = random.Random(3)
    h = UplinkHealth("wan2", S, 0.0)
    simulate(h, 0.0, 30.0, lambda t: rng.random() >= 0.5)
    assert h.state == UplinkState.DEGRADED
    changes = simulate(h, 30.0, 30.0 + 2 * S.dead_after, lambda t: False)
    assert UplinkState.DEAD not in [c.new for c in changes]
    changes = simulate(h, 30.0 + 2 * S.dead_after, 40.0, lambda t: False)
    assert [c.new for c in changes] == [UplinkState.DEAD]
    bound = LOSSY_DEAD_FACTOR * S.dead_after + S.timeout + S.interval
    assert changes[0].at <= 30.0 + bound


def test_thirty_percent_probe_loss_is_degraded_and_does_not_flap() -> None:
    rng = random.Random(7)
    h = UplinkHealth("wan2", S, 0.0)
    changes = simulate(h, 0.0, 120.0, lambda t: rng.random() >= 0.3)
    states = [c.new for c in changes]
    assert UplinkState.DEAD not in states, changes
    assert h.state == UplinkState.DEGRADED
    assert len(changes) <= 2, changes  # unknown -> up/degraded, at most one more


def test_loss_around_the_threshold_changes_state_at_most_once_per_hold() -> None:
    """Loss alternating between a bit above and a bit below the threshold every 4 s."""
    rng = random.Random(3)
    h = UplinkHealth("wan3", S, 0.0)

    def answers(t: float) -> bool:
        loss = 0.25 if int(t // 4) % 2 else 0.12
        return rng.random() >= loss

    changes = simulate(h, 0.0, 120.0, answers)
    settled = [c for c in changes if c.old != UplinkState.UNKNOWN]
    for a, b in itertools.pairwise(settled):
        if a.new == UplinkState.DEGRADED:
            assert b.at - a.at >= S.hold, changes  # degraded stays at least `hold`
    assert len(settled) <= 120 / S.hold + 1


def test_slow_uplink_is_degraded_by_round_trip() -> None:
    h = UplinkHealth("lte", S, 0.0)
    simulate(h, 0.0, 12.0, lambda t: True, rtt=0.7)
    assert h.state == UplinkState.DEGRADED and "round trip 700 ms" in h.reason
    simulate(h, 12.0, 20.0, lambda t: True, rtt=0.05)
    assert h.state == UplinkState.DEGRADED  # good for less than `hold` (and the window)
    simulate(h, 20.0, 60.0, lambda t: True, rtt=0.05)
    assert h.state == UplinkState.UP


def test_mptcp_broken_by_fallbacks_cleared_by_mptcp_and_retried() -> None:
    h = UplinkHealth("wan2", S, 0.0)
    simulate(h, 0.0, 3.0, lambda t: True)
    assert h.tunnel(3.1, mptcp=False) is None  # one fallback is no evidence yet
    c = h.tunnel(3.2, mptcp=False)
    assert c is not None and c.new == UplinkState.MPTCP_BROKEN and "fell back" in c.reason
    assert not h.usable
    c = h.tunnel(4.0, mptcp=True)
    assert c is not None and c.new == UplinkState.UP
    h.tunnel(5.0, mptcp=False)
    h.tunnel(5.1, mptcp=False)
    assert h.state == UplinkState.MPTCP_BROKEN
    assert h.tick(5.1 + S.mptcp_retry - 1) is None
    c = h.tick(5.2 + S.mptcp_retry)
    assert c is not None and c.new == UplinkState.UP  # tried again


def test_health_file_round_trip_and_staleness(tmp_path: Path) -> None:
    h1, h2 = UplinkHealth("wan1", S, 0.0), UplinkHealth("wan2", S, 0.0)
    simulate(h1, 0.0, 5.0, lambda t: False)
    simulate(h2, 0.0, 5.0, lambda t: True)
    path = tmp_path / "sub" / "health.json"
    write_health_file(str(path), [h1, h2], 0.0, ["wan1"])
    assert read_withdrawn(str(path)) == {"wan1"}
    assert json.loads(path.read_text())["uplinks"]["wan1"]["state"] == "dead"
    assert read_withdrawn(str(path), time.time() + HEALTH_FILE_MAX_AGE + 1) == frozenset()
    assert read_withdrawn(str(tmp_path / "missing")) == frozenset()
    path.write_text("{not json")
    assert read_withdrawn(str(path)) == frozenset()
    path.write_text(json.dumps({"updated": time.time(), "withdrawn": "wan1"}))
    assert read_withdrawn(str(path)) == frozenset()


def _monitor() -> HealthMonitor:
    m = HealthMonitor(
        ["wan1", "wan2", "wan3"],
        lambda: Address(ipaddress.ip_address("203.0.113.100"), 8443),
        bytes(32),
        CIPHERS["aes-256-gcm"],
        health_file=None,
        addresses=lambda names: {},
    )
    for i, name in enumerate(m.uplinks, 1):
        m.uplinks[name].addresses = [
            ipaddress.ip_address(f"198.51.100.{16 * i + 1}"),
            ipaddress.ip_address(f"fd00:10:{i}::1"),
        ]
    return m


def test_steering_leaves_the_default_alone_until_its_uplink_is_unfit() -> None:
    m = _monitor()
    wan1 = ipaddress.ip_address("198.51.100.17")
    for u in m.uplinks.values():
        simulate(u.health, 0.0, 3.0, lambda t: True)
    assert m.source_for(socket.AF_INET, wan1) is None
    simulate(m.uplinks["wan1"].health, 3.0, 8.0, lambda t: False)
    assert m.uplinks["wan1"].health.state == UplinkState.DEAD
    assert m.source_for(socket.AF_INET, wan1) == ipaddress.ip_address("198.51.100.33")
    assert m.source_for(socket.AF_INET6, wan1) == ipaddress.ip_address("fd00:10:2::1")
    assert m.withdrawn() == {"wan1"}
    for name in ("wan2", "wan3"):
        simulate(m.uplinks[name].health, 3.0, 8.0, lambda t: False)
    assert m.withdrawn() == frozenset()  # all dead: the server, not the uplinks


def _state(up: bool = True) -> State:
    links = {f"wan{i}": Link(i + 1, f"wan{i}", True, up) for i in (1, 2)}
    addrs = [Addr(i + 1, ipaddress.ip_address(f"198.51.100.{16 * i + 1}")) for i in (1, 2)]
    return State(links, addrs, [], [], set(), [], Limits(8, 8))


def test_plan_withdraws_a_dead_uplinks_endpoint_and_keeps_its_route_rules() -> None:
    s = Settings(withdrawn=frozenset({"wan1"}))
    p = plan(_state(), ["wan1", "wan2"], s)
    eps = [a.obj for a in p.actions if isinstance(a.obj, Endpoint)]
    assert [str(e.ip) for e in eps] == ["198.51.100.33"]  # wan2's only
    assert any("198.51.100.17" in a.describe() for a in p.actions)  # wan1's rules stay
    assert any("wan1" in n and "dead" in n for n in p.notes)
    # An endpoint wan1 already has is deleted while it is dead.
    state = _state()
    state.endpoints.append(Endpoint(255, ipaddress.ip_address("198.51.100.17"), 2, 2))
    p = plan(state, ["wan1", "wan2"], s)
    assert any(a.verb == "del" and isinstance(a.obj, Endpoint) for a in p.actions)


def test_a_blackhole_right_after_start_goes_straight_to_dead() -> None:
    """The first losses of a dying uplink are not reported as "degraded" on the way."""
    h = UplinkHealth("wan1", S, 0.0)
    changes = simulate(h, 0.0, 1.0, lambda t: True) + simulate(h, 1.0, 6.0, lambda t: False)
    assert [c.new for c in changes] == [UplinkState.UP, UplinkState.DEAD], changes


def test_status_shows_uplink_health_and_blackhole_counters() -> None:
    doc = {
        "pid": 1,
        "server": "203.0.113.100:8443",
        "listeners": [],
        "connections": [],
        "uplink_health": [
            {"name": "wan1", "state": "dead", "reason": "no answer for 1.7 s", "since": 1e9},
            {"name": "wan2", "state": "up", "reason": "0% of probes lost", "since": 1e9},
        ],
    }
    assert check_document(doc) is doc
    counters = {"Blackhole": 2, "MPCapableSYNTXDisabled": 5}
    lines = render(Report(clients=[doc], notes=counter_notes(counters)))
    text = "\n".join(lines)
    assert "uplink health (--uplink):" in text
    assert any("wan1" in ln and "dead" in ln and "no answer for 1.7 s" in ln for ln in lines)
    assert "MPTcpExtBlackhole" in text and "MPCapableSYNTXDisabled" in text
    with pytest.raises(NotRead):
        check_document({**doc, "uplink_health": [{"name": "wan1", "state": 5}]})
