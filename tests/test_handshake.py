"""The handshake machine: round trips, byte-at-a-time, every prefix, flipped bytes, replay."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket

import pytest

from mptun.common.address import Address
from mptun.common.crypto import CIPHERS
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError, Status
from mptun.common.handshake import (
    NEED_DATA,
    SALT_LEN,
    ClientHandshake,
    ConnectStatus,
    Request,
    Response,
    ServerHandshake,
    WireMode,
)
from mptun.common.replay import ReplayGuard

NOW = 1_800_000_000.0
PSK = bytes(range(32))
TARGETS = [
    Address(ipaddress.ip_address("203.0.113.7"), 443),
    Address(ipaddress.ip_address("2001:db8::1"), 8080),
    Address("example.com", 80),
]


def make_pair(cipher="aes-256-gcm", target=TARGETS[0], mode=WireMode.PLAIN, guard=None):
    c = ClientHandshake(PSK, CIPHERS[cipher], target, mode, clock=lambda: NOW)
    s = ServerHandshake(
        PSK, CIPHERS[cipher], guard or ReplayGuard() if guard is None else guard, clock=lambda: NOW
    )
    return c, s


def feed_all(machine, data: bytes):
    machine.receive_data(data)
    return machine.next_event()


@pytest.mark.parametrize("cipher", list(CIPHERS))
@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("early", [b"", b"GET / HTTP/1.1\r\n\r\n", os.urandom(16 * 1024)])
def test_round_trip(cipher, target, early):
    c, s = make_pair(cipher, target)
    flight = c.first_flight(early)
    req = feed_all(s, flight)
    assert req == Request(target, WireMode.PLAIN, int(NOW), early)
    assert s.bytes_needed() == 0 and s.trailing_data == b""
    resp = s.respond(ConnectStatus.CONNECTION_REFUSED)
    assert feed_all(c, resp) == Response(ConnectStatus.CONNECTION_REFUSED)
    assert c.bulk_keys() == s.bulk_keys()


def test_bulk_keys_differ_per_direction_and_connection():
    keys = []
    for _ in range(2):
        c, s = make_pair()
        feed_all(s, c.first_flight())
        feed_all(c, s.respond(ConnectStatus.SUCCEEDED))
        k = c.bulk_keys()
        assert k.c2s_key != k.s2c_key and k.c2s_iv != k.s2c_iv
        keys.append(k)
    assert keys[0] != keys[1]


def test_byte_at_a_time_gives_same_events_and_reads_exactly():
    c, s = make_pair(target=TARGETS[2])
    flight = c.first_flight(b"hello")
    events = []
    pos = 0
    while pos < len(flight):
        need = s.bytes_needed()
        assert need > 0
        s.receive_data(flight[pos : pos + 1])
        pos += 1
        ev = s.next_event()
        if ev is not NEED_DATA:
            events.append(ev)
    assert events == [Request(TARGETS[2], WireMode.PLAIN, int(NOW), b"hello")]
    resp = s.respond(ConnectStatus.SUCCEEDED)
    got = []
    for i in range(len(resp)):
        c.receive_data(resp[i : i + 1])
        ev = c.next_event()
        if ev is not NEED_DATA:
            got.append(ev)
            assert i == len(resp) - 1
    assert got == [Response(ConnectStatus.SUCCEEDED)]


def test_bytes_needed_never_overreads():
    """Reading exactly bytes_needed() each time consumes the flight and nothing after it."""
    c, s = make_pair()
    stream = c.first_flight(b"x" * 100) + b"BULK DATA THAT MUST STAY IN THE KERNEL"
    pos = 0
    while True:
        ev = s.next_event()
        if ev is not NEED_DATA:
            break
        n = s.bytes_needed()
        s.receive_data(stream[pos : pos + n])
        pos += n
    assert stream[pos:] == b"BULK DATA THAT MUST STAY IN THE KERNEL"
    assert s.trailing_data == b""


def test_every_proper_prefix_needs_more_data():
    c, _ = make_pair(target=TARGETS[1])
    flight = c.first_flight(b"early")
    for n in range(len(flight)):
        _, s = make_pair()
        s.receive_data(flight[:n])
        assert s.next_event() is NEED_DATA, n
        assert s.bytes_needed() > 0


def test_every_flipped_byte_after_the_salt_is_auth_and_salt_flip_is_auth():
    c, _ = make_pair()
    flight = c.first_flight(b"abc")
    for i in range(len(flight)):
        _, s = make_pair()
        bad = bytearray(flight)
        bad[i] ^= 0x01
        s.receive_data(bytes(bad))
        with pytest.raises(ProtocolError) as e:
            s.next_event()
        assert e.value.status is Status.AUTH, i


def test_error_is_sticky():
    _, s = make_pair()
    s.receive_data(os.urandom(200))
    with pytest.raises(ProtocolError):
        s.next_event()
    with pytest.raises(ProtocolError):
        s.next_event()


def test_replayed_first_flight_is_replay():
    guard = ReplayGuard()
    c, s = make_pair(guard=guard)
    flight = c.first_flight(b"pay")
    assert isinstance(feed_all(s, flight), Request)
    _, s2 = make_pair(guard=guard)
    with pytest.raises(ProtocolError) as e:
        feed_all(s2, flight)
    assert e.value.status is Status.REPLAY


def test_stale_or_future_timestamp_is_clock():
    for skew in (-61, 61):
        c = ClientHandshake(PSK, CIPHERS["aes-256-gcm"], TARGETS[0], clock=lambda s=skew: NOW + s)
        s = ServerHandshake(PSK, CIPHERS["aes-256-gcm"], ReplayGuard(60), clock=lambda: NOW)
        with pytest.raises(ProtocolError) as e:
            feed_all(s, c.first_flight())
        assert e.value.status is Status.CLOCK


def test_wrong_key_or_cipher_is_auth():
    c, _ = make_pair()
    flight = c.first_flight()
    other = ServerHandshake(bytes(32), CIPHERS["aes-256-gcm"], ReplayGuard(), clock=lambda: NOW)
    with pytest.raises(ProtocolError) as e:
        feed_all(other, flight)
    assert e.value.status is Status.AUTH
    _, s = make_pair(cipher="chacha20-poly1305")
    with pytest.raises(ProtocolError) as e:
        feed_all(s, flight)
    assert e.value.status is Status.AUTH


def test_reflected_response_is_rejected_by_both_ends():
    c, s = make_pair()
    flight = c.first_flight()
    feed_all(s, flight)
    resp = s.respond(ConnectStatus.SUCCEEDED)
    # the response sent to the server as a request
    _, s2 = make_pair()
    s2.receive_data(resp + os.urandom(64))
    with pytest.raises(ProtocolError) as e:
        s2.next_event()
    assert e.value.status is Status.AUTH
    # the client's own request reflected back as its response
    c2, _ = make_pair()
    own = c2.first_flight()
    c2.receive_data(own)
    with pytest.raises(ProtocolError) as e:
        c2.next_event()
    assert e.value.status is Status.AUTH


def test_response_for_another_request_is_rejected():
    c1, s1 = make_pair()
    c2, _ = make_pair()
    feed_all(s1, c1.first_flight())
    c2.first_flight()
    c2.receive_data(s1.respond(ConnectStatus.SUCCEEDED))
    with pytest.raises(ProtocolError) as e:
        c2.next_event()
    assert e.value.status is Status.AUTH


def test_flights_look_random_and_vary_in_length():
    """No fixed bytes: the salt is random and the rest is ciphertext; padding varies lengths."""
    lengths = set()
    firsts = set()
    for _ in range(50):
        c, _ = make_pair()
        f = c.first_flight()
        lengths.add(len(f))
        firsts.add(f[SALT_LEN])
    assert len(lengths) > 20
    assert len(firsts) > 20


def test_encrypted_mode_is_carried():
    c, s = make_pair(mode=WireMode.ENCRYPTED)
    assert feed_all(s, c.first_flight()).mode is WireMode.ENCRYPTED


def test_unknown_response_status_maps_to_general_failure():
    """Forward compatibility: a status this client does not know is a failure, not a crash."""
    c, s = make_pair()
    feed_all(s, c.first_flight())
    resp = s.respond(200)  # type: ignore[arg-type]  # a status from a future server
    assert feed_all(c, resp).status is ConnectStatus.GENERAL_FAILURE


def test_replay_guard_refuses_when_full_and_expires_after_twice_the_window():
    g = ReplayGuard(window=10, capacity=2)
    g.accept(b"a", NOW, NOW)
    g.accept(b"b", NOW, NOW)
    with pytest.raises(ProtocolError) as e:
        g.accept(b"c", NOW, NOW)
    assert e.value.status is Status.REPLAY_FULL
    # still remembered just before expiry, even at the window's edge
    with pytest.raises(ProtocolError) as e:
        g.accept(b"a", NOW + 10, NOW + 19)
    assert e.value.status is Status.REPLAY
    g.accept(b"c", NOW + 21, NOW + 21)  # a and b expired (kept up to and including NOW + 20)
    assert len(g) == 1


def test_drive_reads_exactly_the_handshake_and_names_eof_and_deadline():
    """The socket driver both ends use: bytes after the handshake stay in the kernel."""
    c, s = make_pair()
    flight = c.first_flight(b"early")

    async def run(sent: bytes):
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            b.sendall(sent)
            if len(sent) < len(flight):
                b.shutdown(socket.SHUT_WR)  # EOF before a whole request
            machine = ServerHandshake(PSK, CIPHERS["aes-256-gcm"], ReplayGuard(), clock=lambda: NOW)
            return await drive(loop, a, machine, loop.time() + 5), a.recv(100)

    request, after = asyncio.run(run(flight + b"bulk bytes"))
    assert isinstance(request, Request) and request.early_data == b"early"
    assert after == b"bulk bytes"
    assert asyncio.run(run(flight[:40]))[0] is None

    async def silent():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        with a, b:
            await drive(loop, a, s, loop.time() + 0.05)

    with pytest.raises(TimeoutError):
        asyncio.run(silent())
