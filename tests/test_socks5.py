"""SOCKS5 parser (RFC 1928/1929): greetings, auth, requests, pipelining, errors."""

from __future__ import annotations

import ipaddress

import pytest

from mptun.client import socks5
from mptun.common.address import Address

GREETING = b"\x05\x01\x00"
REQ_V4 = b"\x05\x01\x00\x01\xcb\x00\x71\x07\x01\xbb"
REQ_DOMAIN = b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
REQ_V6 = b"\x05\x01\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\x1f\x90"


def run(hs: socks5.Socks5Handshake, data: bytes, byte_at_a_time: bool = False):
    events = []
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    for c in chunks:
        hs.receive_data(c)
        while True:
            ev = hs.next_event()
            if ev is socks5.NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, socks5.Connect):
                return events
    return events


@pytest.mark.parametrize("bat", [False, True])
@pytest.mark.parametrize(
    ("req", "target"),
    [
        (REQ_V4, Address(ipaddress.ip_address("203.0.113.7"), 443)),
        (REQ_DOMAIN, Address("example.com", 80)),
        (REQ_V6, Address(ipaddress.ip_address("2001:db8::1"), 8080)),
    ],
)
def test_connect(req, target, bat):
    hs = socks5.Socks5Handshake()
    ev = run(hs, GREETING + req, bat)
    assert ev == [socks5.Send(b"\x05\x00"), socks5.Connect(target)]


def test_pipelined_data_stays_as_trailing():
    hs = socks5.Socks5Handshake()
    run(hs, GREETING + REQ_V4 + b"GET /")
    assert hs.trailing_data == b"GET /"


def test_userpass():
    hs = socks5.Socks5Handshake(("alice", "s3cret"))
    ev = run(hs, b"\x05\x02\x00\x02" + b"\x01\x05alice\x06s3cret" + REQ_V4)
    assert ev[:2] == [socks5.Send(b"\x05\x02"), socks5.Send(b"\x01\x00")]


def test_wrong_password_refused():
    hs = socks5.Socks5Handshake(("alice", "s3cret"))
    with pytest.raises(socks5.SocksError) as e:
        run(hs, b"\x05\x01\x02" + b"\x01\x05alice\x05wrong")
    assert e.value.response == b"\x01\x01"


def test_no_acceptable_method():
    hs = socks5.Socks5Handshake(("alice", "pw"))
    with pytest.raises(socks5.SocksError) as e:
        run(hs, GREETING)
    assert e.value.response == b"\x05\xff"


@pytest.mark.parametrize(("cmd", "name"), [(2, "BIND"), (3, "UDP ASSOCIATE")])
def test_unsupported_commands(cmd, name):
    hs = socks5.Socks5Handshake()
    req = bytearray(REQ_V4)
    req[1] = cmd
    with pytest.raises(socks5.SocksError) as e:
        run(hs, GREETING + bytes(req))
    assert name in str(e.value)
    assert e.value.response[:2] == b"\x05\x07"


def test_bad_address_type():
    hs = socks5.Socks5Handshake()
    with pytest.raises(socks5.SocksError) as e:
        run(hs, GREETING + b"\x05\x01\x00\x09\x00\x00")
    assert e.value.response[:2] == b"\x05\x08"


@pytest.mark.parametrize("junk", [b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n", b"\x05\x00"])
def test_malformed_greeting_closes(junk):
    hs = socks5.Socks5Handshake()
    with pytest.raises(socks5.SocksError):
        run(hs, junk)


def test_reply_encoding():
    assert (
        socks5.reply(socks5.Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    )


def test_every_prefix_needs_data():
    data = GREETING + REQ_DOMAIN
    for n in range(len(data)):
        hs = socks5.Socks5Handshake()
        hs.receive_data(data[:n])
        ev = hs.next_event()
        while isinstance(ev, socks5.Send):
            ev = hs.next_event()
        assert ev is socks5.NEED_DATA
