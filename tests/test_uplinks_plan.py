"""The uplink planner without a kernel: snapshots in, actions out; applying them converges."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace

import pytest

from mptun.client.status import diagnose, uplink_problems
from mptun.client.uplinks import (
    FLAG_BACKUP,
    FLAG_SIGNAL,
    FLAG_SUBFLOW,
    MAIN_TABLE,
    MPTUN_PROTO,
    Action,
    Addr,
    Endpoint,
    Limits,
    Link,
    Memory,
    Route,
    Rule,
    Settings,
    State,
    clear_plan,
    describe,
    parse_gateways,
    plan,
)

ip = ipaddress.ip_address
V4, V6 = socket.AF_INET, socket.AF_INET6


def router(**over) -> State:
    """Two uplinks as netifd leaves them: addresses and a default route each in main."""
    links = {
        "lo": Link(1, "lo", True, True),
        "wan1": Link(2, "wan1", True, True),
        "wan2": Link(3, "wan2", True, True),
        "ppp0": Link(4, "ppp0", True, True, pointopoint=True),
    }
    addrs = [
        Addr(2, ip("198.51.100.17")),
        Addr(2, ip("fd00:10:1::1")),
        Addr(3, ip("198.51.100.33")),
        Addr(4, ip("203.0.113.50")),
    ]
    routes = [
        Route(V4, MAIN_TABLE, ip("198.51.100.18"), 2, protocol=4),
        Route(V6, MAIN_TABLE, ip("fe80::1"), 2, protocol=9, metric=1024),
        Route(V4, MAIN_TABLE, ip("198.51.100.34"), 3, protocol=4, metric=20),
    ]
    st = State(links, addrs, [], routes, {254, 255}, [], Limits(2, 0))
    for k, v in over.items():
        setattr(st, k, v)
    return st


def simulate(st: State, actions: list[Action]) -> State:
    """What the kernel would hold after the actions (the parts the planner reads)."""
    rules, routes, eps, limits = list(st.rules), list(st.routes), list(st.endpoints), st.limits
    for a in actions:
        o = a.obj
        if isinstance(o, Limits):
            limits = o
            continue
        bucket = {Rule: rules, Route: routes, Endpoint: eps}[type(o)]
        if a.verb == "add":
            assert o not in bucket, f"added twice: {o}"
            bucket.append(o)
        else:
            assert o in bucket, f"deleting what is not there: {o}"
            bucket.remove(o)
    used = st.used_tables | {r.table for r in routes}
    return State(st.links, st.addrs, rules, routes, used, eps, limits)


def test_plan_configures_every_part_and_a_second_plan_is_empty():
    st = router()
    p = plan(st, ["wan1", "wan2"], Settings())
    kinds = [(a.verb, type(a.obj).__name__) for a in p.actions]
    assert kinds[0] == ("set", "Limits")
    assert kinds.count(("add", "Rule")) == 6  # two per address, three addresses
    assert kinds.count(("add", "Route")) == 3  # wan1 IPv4 + IPv6, wan2 IPv4
    assert kinds.count(("add", "Endpoint")) == 3
    # endpoints last: a new endpoint opens subflows at once, routes must be there
    assert [k[1] for k in kinds[-3:]] == ["Endpoint"] * 3
    assert p.tables == {"wan1": 1500, "wan2": 1501}
    eps = [a.obj for a in p.actions if isinstance(a.obj, Endpoint)]
    assert sorted(e.id for e in eps) == [253, 254, 255]
    assert all(e.flags == FLAG_SUBFLOW for e in eps)
    routes = {(r.table, str(r.gateway)) for a in p.actions if isinstance(r := a.obj, Route)}
    assert routes == {(1500, "198.51.100.18"), (1500, "fe80::1"), (1501, "198.51.100.34")}
    after = simulate(st, p.actions)
    assert plan(after, ["wan1", "wan2"], Settings()).actions == []
    assert plan(after, ["wan2", "wan1"], Settings()).actions == []  # order does not matter


def test_rules_send_the_lan_to_main_and_the_rest_to_the_uplink_table():
    p = plan(router(), ["wan2"], Settings(rule_priority=900, table_base=7000))
    rules = sorted((a.obj for a in p.actions if isinstance(a.obj, Rule)), key=str)
    assert [r.describe() for r in rules] == [
        "rule 900: from 198.51.100.33 lookup main suppress_prefixlength 0",
        "rule 901: from 198.51.100.33 lookup 7000",
    ]
    assert all(r.protocol == MPTUN_PROTO for r in rules)


def test_link_down_keeps_rules_drops_endpoint_and_waits_for_the_route():
    st = router()
    configured = simulate(st, plan(st, ["wan1"], Settings()).actions)
    down = replace(configured, links={**configured.links, "wan1": Link(2, "wan1", True, False)})
    # the kernel deleted wan1's routes with the carrier
    down.routes = [r for r in down.routes if r.oif != 2]
    mem = Memory()
    plan(configured, ["wan1"], Settings(), mem)  # a watcher saw the gateways before
    p = plan(down, ["wan1"], Settings(), mem)
    assert {(a.verb, type(a.obj).__name__) for a in p.actions} == {("del", "Endpoint")}
    assert any("wan1 is down" in n for n in p.notes)
    gone = simulate(down, p.actions)
    back = replace(gone, links={**gone.links, "wan1": Link(2, "wan1", True, True)})
    p = plan(back, ["wan1"], Settings(), mem)  # main's route is still gone: memory has the gateway
    added = {(a.verb, type(a.obj).__name__) for a in p.actions}
    assert added == {("add", "Route"), ("add", "Endpoint")}
    assert {str(a.obj.gateway) for a in p.actions if isinstance(a.obj, Route)} == {
        "198.51.100.18",
        "fe80::1",
    }
    # without the memory (a one-shot run) there is no gateway to use: it says how to give one
    p = plan(back, ["wan1"], Settings())
    assert any("--gateway wan1=" in n for n in p.notes)


def test_gateway_precedence_and_point_to_point():
    st = router()
    p = plan(st, ["wan2"], Settings(gateways=parse_gateways(["wan2=198.51.100.40"])))
    (route,) = [a.obj for a in p.actions if isinstance(a.obj, Route)]
    assert str(route.gateway) == "198.51.100.40"
    p = plan(st, ["ppp0"], Settings())
    (route,) = [a.obj for a in p.actions if isinstance(a.obj, Route)]
    assert route.gateway is None and route.oif == 4  # `default dev ppp0`


def test_tables_skip_used_ones_and_follow_existing_configuration():
    st = router(used_tables={254, 255, 1500})
    st.rules = [Rule(V4, 100, None, 1501, protocol=0)]  # someone's rule looks up 1501
    p = plan(st, ["wan1", "wan2"], Settings())
    assert p.tables == {"wan1": 1502, "wan2": 1503}
    after = simulate(st, p.actions)
    assert plan(after, ["wan2"], Settings()).tables == {"wan2": 1503}  # remembered by the kernel


def test_a_new_address_replaces_the_old_rules_and_endpoint():
    st = router()
    configured = simulate(st, plan(st, ["wan2"], Settings()).actions)
    renumbered = replace(
        configured,
        addrs=[a for a in configured.addrs if a.index != 3] + [Addr(3, ip("198.51.100.44"))],
    )
    p = plan(renumbered, ["wan2"], Settings())
    dels = {a.obj.describe() for a in p.actions if a.verb == "del" and isinstance(a.obj, Rule)}
    assert dels == {
        "rule 1500: from 198.51.100.33 lookup main suppress_prefixlength 0",
        "rule 1501: from 198.51.100.33 lookup 1500",
    }
    assert any(
        a.verb == "del" and isinstance(a.obj, Endpoint) and str(a.obj.ip) == "198.51.100.33"
        for a in p.actions
    )
    assert plan(simulate(renumbered, p.actions), ["wan2"], Settings()).actions == []


def test_someone_elses_endpoint_is_left_alone_with_a_note():
    st = router(endpoints=[Endpoint(3, ip("198.51.100.33"), FLAG_SIGNAL, 3)])
    p = plan(st, ["wan2"], Settings())
    assert not [a for a in p.actions if isinstance(a.obj, Endpoint)]
    assert any("not mptun's (id 3, signal): left alone; it opens no subflows" in n for n in p.notes)
    assert clear_plan(simulate(st, p.actions), None).actions  # ours go ...
    left = simulate(simulate(st, p.actions), clear_plan(simulate(st, p.actions), None).actions)
    assert left.endpoints == st.endpoints  # ... theirs stays


def test_backup_flag_and_changed_flags_are_replaced():
    st = router()
    configured = simulate(st, plan(st, ["wan2"], Settings()).actions)
    p = plan(configured, ["wan2"], Settings(backup=frozenset({"wan2"})))
    eps = [(a.verb, a.obj.flags) for a in p.actions if isinstance(a.obj, Endpoint)]
    assert eps == [("del", FLAG_SUBFLOW), ("add", FLAG_SUBFLOW | FLAG_BACKUP)]


def test_clear_one_uplink_or_all():
    st = router()
    configured = simulate(st, plan(st, ["wan1", "wan2"], Settings()).actions)
    one = simulate(configured, clear_plan(configured, ["wan1"]).actions)
    assert plan(one, ["wan2"], Settings()).actions == []  # wan2 untouched
    assert all(r.src != ip("198.51.100.17") for r in one.rules)
    everything = simulate(configured, clear_plan(configured, None).actions)
    assert (everything.rules, everything.routes, everything.endpoints) == (
        st.rules,
        st.routes,
        st.endpoints,
    )


def test_describe_and_problems_name_what_is_missing():
    st = router()
    configured = simulate(st, plan(st, ["wan1"], Settings()).actions)
    text = "\n".join(describe(configured))
    assert "wan1 (up): table 1500" in text and "198.51.100.17: endpoint id 255 subflow" in text
    problems = uplink_problems(configured)
    assert any(p.startswith("wan2 has a default route but no MPTCP endpoint") for p in problems)
    low = replace(configured, limits=Limits(0, 0))
    low.endpoints = [*low.endpoints, Endpoint(200, ip("198.51.100.33"), FLAG_SUBFLOW, 3)]
    assert any("subflow limit (0) is below" in p for p in uplink_problems(low))


def test_diagnose_explains_a_missing_subflow():
    st = router()
    configured = simulate(st, plan(st, ["wan1", "wan2"], Settings()).actions)
    conn = {
        "id": "c7",
        "kind": "mptcp",
        "subflows_max": 8,
        "subflows": [
            {"local_ip": "198.51.100.17", "remote": "203.0.113.100:8443", "local": "x"},
        ],
    }
    # the kernel routes wan2's address out through wan1: policy routing missing
    (msg,) = diagnose(conn, configured, lambda dst, src: 2)
    assert msg.startswith("c7: no subflow from wan2 (198.51.100.33): traffic from")
    assert "leaves through wan1" in msg
    (msg,) = diagnose({**conn, "subflows_max": 0}, configured, lambda d, s: 3)
    assert "subflow limit (0) is reached" in msg
    (msg,) = diagnose(conn, configured, lambda d, s: 3)
    assert "server did not accept the join" in msg
    (msg,) = diagnose({**conn, "kind": "fallback"}, configured, None)
    assert "fell back to plain TCP" in msg and "middlebox" in msg


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (["wan1"], "expected IFACE=ADDRESS"),
        (["wan1=300.1.1.1"], "not an IP address"),
        (["wan1=192.0.2.1", "wan1=192.0.2.2"], "two IPv4 gateways"),
    ],
)
def test_parse_gateways_rejects_bad_input(values, error):
    with pytest.raises(ValueError, match=error):
        parse_gateways(values)


def test_parse_gateways_accepts_both_families():
    got = parse_gateways(["wan1=192.0.2.1", "wan1=[fe80::1]", "wan2=198.51.100.1"])
    assert got == {"wan1": (ip("192.0.2.1"), ip("fe80::1")), "wan2": (ip("198.51.100.1"),)}


def test_clearing_a_vanished_interface_removes_what_it_left():
    st = router()
    configured = simulate(st, plan(st, ["wan2"], Settings()).actions)
    gone = replace(
        configured,
        links={k: v for k, v in configured.links.items() if k != "wan2"},
        addrs=[a for a in configured.addrs if a.index != 3],
    )
    gone.routes = [r for r in gone.routes if r.oif != 3]  # the kernel took them with the device
    p = clear_plan(gone, ["wan2"])
    assert p.notes == ["wan2: no such interface"]
    left = simulate(gone, p.actions)
    assert not [r for r in left.rules if r.protocol == MPTUN_PROTO]
    assert not [e for e in left.endpoints if e.ours]
