"""The UDP association's wire: datagram frames (common/datagram.py) and request type 0x04
(common/handshake.py), byte at a time and under generated input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptun.common.address import Address
from mptun.common.crypto import cipher_by_name
from mptun.common.datagram import (
    MAX_PAYLOAD,
    Datagram,
    Decoder,
    Dropped,
    Oversize,
    encode,
    frame_size,
)
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import (
    CHECK_TARGET,
    TYPE_UDP,
    ClientHandshake,
    ConnectStatus,
    Response,
    ServerHandshake,
    UdpRequest,
    WireMode,
)
from mptun.common.replay import ReplayGuard

PSK = bytes(range(32))
CIPHER = cipher_by_name("aes-256-gcm")

addresses = st.one_of(
    st.builds(
        lambda n, p: Address(ipaddress.IPv4Address(n), p),
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
    ),
    st.builds(
        lambda n, p: Address(ipaddress.IPv6Address(n), p),
        st.integers(0, 2**128 - 1),
        st.integers(0, 65535),
    ),
    st.builds(
        Address,
        st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
        st.integers(0, 65535),
    ),
)
datagrams = st.lists(st.tuples(addresses, st.binary(max_size=2000)), max_size=8)


@given(datagrams, st.integers(1, 300))
@settings(max_examples=150, deadline=None)
def test_frames_round_trip_in_any_chunking(items, chunk: int) -> None:
    """Frames fed in pieces of any size give back every datagram, in order, no more."""
    wire = b"".join(encode(a, p) for a, p in items)
    assert len(wire) == sum(frame_size(a, len(p)) for a, p in items)
    d = Decoder()
    out = []
    for i in range(0, len(wire), chunk):
        out += d.feed(wire[i : i + chunk])
    assert out == [Datagram(a, p) for a, p in items]
    assert d.pending == 0
    d.end_of_stream()


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_garbage_gives_events_or_a_status_never_anything_else(data: bytes) -> None:
    """Any bytes: datagrams, dropped frames, or a ProtocolError with a status; and once dead
    the decoder stays dead."""
    d = Decoder()
    try:
        events = d.feed(data)
        d.end_of_stream()
    except ProtocolError as e:
        assert e.status in (Status.PROTOCOL, Status.ADDRESS, Status.TRUNCATED)
        with pytest.raises(ProtocolError):
            d.feed(b"")
        return
    for e in events:
        assert isinstance(e, Datagram | Dropped)
        if isinstance(e, Datagram):
            assert len(e.payload) <= MAX_PAYLOAD


def test_every_prefix_of_a_frame_needs_more() -> None:
    """A proper prefix is never an event nor an error; the end of the stream inside it is."""
    wire = encode(Address.parse("[2001:db8::1]:443"), b"payload")
    for n in range(len(wire)):
        d = Decoder()
        assert d.feed(wire[:n]) == []
        if n:
            with pytest.raises(ProtocolError) as e:
                d.end_of_stream()
            assert e.value.status is Status.TRUNCATED


def test_oversize_is_refused_both_ways() -> None:
    """65,507 bytes is the most a datagram carries: more is refused by the encoder and ends
    the stream at the decoder."""
    a = Address.parse("192.0.2.1:9")
    assert Decoder().feed(encode(a, bytes(MAX_PAYLOAD))) == [Datagram(a, bytes(MAX_PAYLOAD))]
    with pytest.raises(Oversize):
        encode(a, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError) as e:
        Decoder().feed((MAX_PAYLOAD + 1).to_bytes(2, "big") + a.encode())
    assert e.value.status is Status.PROTOCOL


def test_unknown_address_type_ends_the_stream() -> None:
    with pytest.raises(ProtocolError) as e:
        Decoder().feed(b"\x00\x01\x09" + bytes(10))
    assert e.value.status is Status.ADDRESS


def test_a_bad_name_drops_one_frame_and_keeps_the_stream() -> None:
    """`a..b` is well framed: that frame is dropped, the next one still arrives."""
    bad = b"\x00\x03" + b"\x03\x04a..b\x00\x35" + b"xyz"
    good = encode(Address.parse("192.0.2.1:53"), b"ok")
    events = Decoder().feed(bad + good)
    assert isinstance(events[0], Dropped) and events[0].size == 3
    assert events[1] == Datagram(Address.parse("192.0.2.1:53"), b"ok")


@pytest.mark.parametrize("mode", [WireMode.PLAIN, WireMode.ENCRYPTED])
def test_udp_request_round_trip_with_early_frames(mode: WireMode) -> None:
    """Type 0x04 carries the mode and the first frames; the server hands them out, answers,
    and both ends derive the same bulk keys."""
    frames = encode(Address.parse("192.0.2.1:53"), b"q1") + encode(Address.parse("x.test:9"), b"")
    c = ClientHandshake(PSK, CIPHER, CHECK_TARGET, mode, kind=TYPE_UDP)
    flight = c.first_flight(frames)
    s = ServerHandshake(PSK, CIPHER, ReplayGuard(60, 100))
    for i in range(len(flight)):  # byte at a time
        s.receive_data(flight[i : i + 1])
        event = s.next_event()
    assert isinstance(event, UdpRequest)
    assert event.mode is mode and event.early_data == frames
    c.receive_data(s.respond(ConnectStatus.SUCCEEDED))
    assert c.next_event() == Response(ConnectStatus.SUCCEEDED)
    assert c.bulk_keys() == s.bulk_keys()


def test_udp_request_with_a_bad_mode_fails() -> None:
    c = ClientHandshake(
        PSK, CIPHER, CHECK_TARGET, WireMode.PLAIN, kind=TYPE_UDP, padding=lambda n: 0
    )
    flight = bytearray(c.first_flight())
    # The variable part is sealed: a changed byte fails authentication, never parses.
    flight[-17] ^= 1
    s = ServerHandshake(PSK, CIPHER, ReplayGuard(60, 100))
    s.receive_data(bytes(flight))
    with pytest.raises(ProtocolError) as e:
        s.next_event()
    assert e.value.status is Status.AUTH
