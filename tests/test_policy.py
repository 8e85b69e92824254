"""The server's target policy: defaults refuse internal ranges, wrapped forms are unwrapped."""

from __future__ import annotations

import ipaddress

import pytest

from mptun.server.policy import TargetPolicy, parse_cidrs


def ip(s):
    return ipaddress.ip_address(s)


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "fe80::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
        "fd00::1",
        "100.64.0.1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a00:1",
        "::127.0.0.1",
        "192.0.2.1",
    ],
)
def test_default_refuses(addr):
    assert TargetPolicy(is_own=lambda _: False).check(ip(addr)) is not None


@pytest.mark.parametrize(
    "addr", ["1.1.1.1", "2606:4700::1111", "::ffff:1.1.1.1", "64:ff9b::101:101"]
)
def test_default_allows_public(addr):
    assert TargetPolicy(is_own=lambda _: False).check(ip(addr)) is None


def test_own_address_refused():
    assert "own" in TargetPolicy(is_own=lambda a: a == ip("1.1.1.1")).check(ip("1.1.1.1"))


def test_allow_target_opens_a_range_and_allow_private_opens_all():
    p = TargetPolicy(allow=parse_cidrs(["192.0.2.0/24", "fd00::/8"]))
    assert p.check(ip("192.0.2.9")) is None
    assert p.check(ip("::ffff:192.0.2.9")) is None
    assert p.check(ip("fd00::5")) is None
    assert p.check(ip("198.51.100.1")) is not None
    assert TargetPolicy(allow_private=True).check(ip("127.0.0.1")) is None


def test_own_address_really_detected():
    assert TargetPolicy().check(ip("203.0.113.250")) is not None  # private (doc range)
    # 127.0.0.1 is ours, but loopback is named first
    assert "loopback" in TargetPolicy().check(ip("127.0.0.1"))
