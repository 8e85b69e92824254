"""Target names: what a name may be (RFC 1035 lengths, letters, digits, `-`, `_`), refused at
every door with a status instead of an uncaught IDNA error in the server's lookup.

Sans-I/O: the name check, the address codec, the server's handshake (an authenticated request
for `a..b` is answered "host unreachable" and its salt is spent) and the SOCKS codec (which refuses
such a name before anything is sent). End to end: a real server answers every such request and
logs no error; a real client refuses them at its SOCKS listener and sends nothing.
"""

from __future__ import annotations

import math
import socket
import struct
import time
from pathlib import Path

import pytest

from mptun.client import socks5
from mptun.common import address
from mptun.common.address import Address, InvalidName, name_problem
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name
from mptun.common.errors import ProtocolError, Status, UsageError
from mptun.common.handshake import (
    BadTarget,
    ClientHandshake,
    ConnectStatus,
    NeedData,
    Response,
    ServerHandshake,
    WireMode,
)
from mptun.common.replay import ReplayGuard
from tests.helpers import ClientProcess, ServerProcess

PSK = bytes(range(32))
CIPHER = cipher_by_name(DEFAULT_CIPHER)
NOW = 1_800_000_000

LONGEST = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
GOOD = [
    "example.com",
    "example.com.",  # absolute form
    "_sip._tcp.example.com",  # underscores resolve today and keep working
    "a-b.c_d.example",
    "-lead.example",
    "xn--bcher-kva.example",
    "EXAMPLE.Com",
    "1.2.3.4",  # IP literals sent as names, as some SOCKS clients do
    "::1",
    "a" * 63 + ".example",
    LONGEST,
    LONGEST + ".",
]
BAD = [
    (b"a..b", "empty label"),
    (b".a", "empty label"),
    (b"a..", "empty label"),
    (b".", "empty name"),
    (b"", "empty name"),
    (b"a" * 64 + b".com", "label of 64 characters"),
    (b"a" * 64, "label of 64 characters"),
    (LONGEST.encode() + b"a", "254 characters"),
    (b"a b", "character ' '"),
    (b"a\x00b", "character '\\x00'"),
    (b"a/b", "character '/'"),
    (b"fe80::1%lo", "character ':'"),
    (b"caf\xc3\xa9.example", "not ASCII"),
]


class RawTarget:
    """Stands in for an Address in ClientHandshake: its wire form as given, valid or not, so a
    test can send what a client of another implementation might."""

    def __init__(self, name: bytes, port: int = 80) -> None:
        self.wire = bytes([address.ATYP_DOMAIN, len(name)]) + name + struct.pack(">H", port)

    def encode(self) -> bytes:
        return self.wire


def client_for(name: bytes, psk: bytes = PSK, clock=lambda: NOW) -> ClientHandshake:
    return ClientHandshake(psk, CIPHER, RawTarget(name), WireMode.ENCRYPTED, clock=clock)  # type: ignore[arg-type]


# ---- the check and the codec -----------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass_and_round_trip(name: str) -> None:
    assert name_problem(name) is None
    a = Address(name, 443)
    enc = a.encode()
    assert address.decode(enc + b"tail") == (a, len(enc))


@pytest.mark.parametrize(("name", "why"), BAD, ids=lambda v: repr(v)[:24])
def test_bad_names_are_refused_by_the_codec(name: bytes, why: str) -> None:
    enc = bytes([address.ATYP_DOMAIN, len(name)]) + name + b"\x01\xbb"
    for n in range(len(enc)):  # a proper prefix is still "need more bytes", never an error
        assert address.decode(enc[:n]) is None
    with pytest.raises(InvalidName) as info:
        address.decode(b"\x00" + enc + b"tail", 1)
    e = info.value
    assert why in str(e) and why in e.why
    assert (e.port, e.end, e.status) == (443, 1 + len(enc), Status.ADDRESS)
    assert e.name.isprintable()


@pytest.mark.parametrize(("name", "why"), [(n, w) for n, w in BAD if n.isascii()], ids=repr)
def test_bad_names_are_refused_as_addresses(name: bytes, why: str) -> None:
    with pytest.raises(UsageError, match="invalid host name"):
        Address(name.decode(), 80)
    if name and b":" not in name and b"/" not in name and b" " not in name:
        with pytest.raises(UsageError) as info:
            Address.parse(name.decode() + ":80")
        assert "\n" not in str(info.value) and why in str(info.value)


def test_international_names_go_to_idna_or_are_refused() -> None:
    assert Address("bücher.example", 80).encode()[2:-2] == b"xn--bcher-kva.example"
    with pytest.raises(UsageError, match="invalid host name"):
        Address("ü..example", 80)


# ---- the server's handshake --------------------------------------------------------------------


def feed(machine, data: bytes):
    """Feed one byte at a time; the first event that is not NeedData."""
    for i in range(len(data)):
        machine.receive_data(data[i : i + 1])
        event = machine.next_event()
        if not isinstance(event, NeedData):
            assert i == len(data) - 1, "an event before the whole flight"
            return event
    raise AssertionError("no event after the whole flight")


@pytest.mark.parametrize(("name", "why"), BAD, ids=lambda v: repr(v)[:24])
def test_server_answers_a_bad_name_and_spends_the_salt(name: bytes, why: str) -> None:
    guard = ReplayGuard()
    client = client_for(name)
    flight = client.first_flight(b"early")
    server = ServerHandshake(PSK, CIPHER, guard, clock=lambda: NOW)
    event = feed(server, flight)
    assert isinstance(event, BadTarget)
    assert why in event.why and event.target.endswith(":80") and event.mode == WireMode.ENCRYPTED
    answer = server.respond(ConnectStatus.HOST_UNREACHABLE)
    assert feed(client, answer) == Response(ConnectStatus.HOST_UNREACHABLE)
    again = ServerHandshake(PSK, CIPHER, guard, clock=lambda: NOW)
    with pytest.raises(ProtocolError) as info:
        feed(again, flight)
    assert info.value.status == Status.REPLAY


def test_unauthenticated_bytes_with_a_bad_name_stay_silent() -> None:
    """Only an authenticated request is answered: the same flight under another key is not."""
    flight = client_for(b"a..b", psk=bytes(32)).first_flight()
    server = ServerHandshake(PSK, CIPHER, ReplayGuard(), clock=lambda: NOW)
    with pytest.raises(ProtocolError) as info:
        feed(server, flight)
    assert info.value.status == Status.AUTH


# ---- the client's SOCKS codec --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "why"), BAD[:8], ids=lambda v: repr(v)[:24])
def test_socks_refuses_a_bad_name_before_the_tunnel(name: bytes, why: str) -> None:
    hs = socks5.Socks5Handshake(None)
    hs.receive_data(b"\x05\x01\x00")
    assert isinstance(hs.next_event(), socks5.Send)
    hs.receive_data(b"\x05\x01\x00" + RawTarget(name).encode())
    with pytest.raises(socks5.SocksError) as info:
        hs.next_event()
    assert why in str(info.value)
    assert info.value.response == socks5.reply(socks5.Reply.HOST_UNREACHABLE)


# ---- real processes ------------------------------------------------------------------------------


def next_second() -> None:
    """Wait for the next whole second: a server refuses flights stamped no later than the second
    it started in (its replay cache is new; docs/PROBING.md, "Replay")."""
    time.sleep(math.floor(time.time()) + 1.01 - time.time())


def tunnel_status(port: int, psk: bytes, name: bytes) -> ConnectStatus:
    hs = client_for(name, psk=psk, clock=time.time)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hs.first_flight())
        while not isinstance(event := hs.next_event(), Response):
            chunk = s.recv(hs.bytes_needed())
            assert chunk, "the server closed without answering"
            hs.receive_data(chunk)
    return event.status


def test_server_answers_bad_names_without_an_error(tmp_path: Path, key_file: Path) -> None:
    """The requests that raised an uncaught IDNA error in the connection handler (an ERROR line,
    and silence the client blamed on key or clock) now get "host unreachable"."""
    names = [name for name, _ in BAD]
    with ServerProcess(tmp_path, key_file) as srv:
        next_second()
        for name in names:
            assert tunnel_status(srv.port, srv.psk, name) == ConnectStatus.HOST_UNREACHABLE
        counters = srv.wait_counter("address", len(names))
        log = srv.log()
    assert counters.get("address") == len(names), counters
    for bad in ("ERROR", "Traceback", "internal error", "UnicodeError"):
        assert bad not in log, log[-3000:]
    # Refusals are logged once per burst: the first one names its reason.
    assert "a..b:80: host unreachable (invalid name: empty label)" in log, log[-3000:]


@pytest.mark.parametrize("reply", ["optimistic", "verified"])
def test_client_refuses_bad_names_at_socks(tmp_path: Path, key_file: Path, reply: str) -> None:
    with (
        ServerProcess(tmp_path, key_file) as srv,
        ClientProcess(tmp_path, key_file, srv.port, "--reply", reply) as cli,
    ):

        def tunnels() -> dict:
            """The server's counters but its health checks (the client checks it meanwhile)."""
            return {k: v for k, v in srv.counters().items() if k != "check"}

        before = tunnels()
        for name, _ in BAD[:6]:
            with socket.create_connection(("127.0.0.1", cli.socks_port), timeout=10) as s:
                s.sendall(b"\x05\x01\x00")
                assert s.recv(2) == b"\x05\x00"
                s.sendall(b"\x05\x01\x00" + RawTarget(name).encode())
                assert s.recv(3)[:2] == b"\x05\x04"  # host unreachable, at once
        assert cli.stats()["counters"].get("socks-refused") == 6
        assert tunnels() == before  # no tunnel was opened for them
        log = cli.log()
    assert "invalid target name 'a..b': empty label" in log, log[-3000:]
    assert "same key" not in log, log[-3000:]  # nothing blamed on key, cipher or clock
