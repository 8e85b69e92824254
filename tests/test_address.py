"""Address parsing (HOST:PORT, [v6]:port) and the SOCKS5 address codec."""

from __future__ import annotations

import ipaddress

import pytest

from mptun.common import address
from mptun.common.address import Address
from mptun.common.errors import ProtocolError, UsageError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:1080", ipaddress.ip_address("127.0.0.1"), 1080),
        ("[2001:db8::1]:443", ipaddress.ip_address("2001:db8::1"), 443),
        ("[::]:8443", ipaddress.ip_address("::"), 8443),
        ("vps.example.net:8443", "vps.example.net", 8443),
    ],
)
def test_parse(text, host, port):
    a = Address.parse(text)
    assert (a.host, a.port) == (host, port)
    assert str(a) == text


@pytest.mark.parametrize(
    "text", ["2001:db8::1:443", "[2001:db8::1]", "host:0", "host:99999", "host:x", "[nope]:1", ""]
)
def test_parse_errors(text):
    with pytest.raises(UsageError):
        Address.parse(text)


@pytest.mark.parametrize(
    "a",
    [
        Address(ipaddress.ip_address("198.51.100.3"), 1),
        Address(ipaddress.ip_address("fd00::3"), 65535),
        Address(".".join(["a" * 63] * 3 + ["a" * 61]), 80),  # the longest name: 253 characters
    ],
    ids=str,
)
def test_codec_round_trip_and_prefixes(a):
    enc = a.encode()
    assert address.decode(enc + b"tail") == (a, len(enc))
    for n in range(len(enc)):
        assert address.decode(enc[:n]) is None


def test_codec_rejects_bad_types_and_names():
    with pytest.raises(ProtocolError):
        address.decode(b"\x02\x00\x00")
    with pytest.raises(ProtocolError):
        address.decode(b"\x03\x00\x00\x50")
    with pytest.raises(ProtocolError):
        address.decode(b"\x03\x03a b\x00\x50")
