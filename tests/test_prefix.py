"""`--prefix`: the client's first flight starts with chosen bytes (docs/PROTOCOL.md, "Prefix").

The prefix replaces the first bytes of salt_c, so the server needs no setting; at least 16 salt
bytes stay random. Sans-I/O: parsing the option's escapes, the flight's first bytes, the server
accepting it, a replay refused. Real processes: a tunnel with a prefix carries traffic, and a
relay between client and server shows that the wire starts with the prefix; the captured flight
replayed to the server is refused; bad values are one-line errors from every layer.
"""

from __future__ import annotations

import hashlib
import math
import socket
import threading
import time
from pathlib import Path

import pytest

from mptun.common.address import Address, ip_or_name
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name
from mptun.common.errors import ConfigError, ProtocolError, Status
from mptun.common.handshake import (
    MAX_PREFIX_LEN,
    SALT_LEN,
    ClientHandshake,
    NeedData,
    Request,
    ServerHandshake,
    WireMode,
    parse_prefix,
)
from mptun.common.replay import ReplayGuard
from tests.helpers import ClientProcess, ServerProcess, curl, need, run_mptun
from tests.peers import http_server, sha256_of_stream

PSK = bytes(range(32))
CIPHER = cipher_by_name(DEFAULT_CIPHER)
NOW = 1_800_000_000
TARGET = Address(ip_or_name("192.0.2.1"), 443)
ALLOW = ("--allow-target", "127.0.0.0/8")


# ---- the option's text -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", b""),
        ("POST /", b"POST /"),
        (r"\x16\x03\x01", b"\x16\x03\x01"),
        (r"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n"),
        (r"a\\b\t\n\xFF\x00", b"a\\b\t\n\xff\x00"),
        ("x" * MAX_PREFIX_LEN, b"x" * MAX_PREFIX_LEN),
        (r"\x00" * MAX_PREFIX_LEN, bytes(MAX_PREFIX_LEN)),
    ],
)
def test_parse_prefix(text: str, want: bytes) -> None:
    assert parse_prefix(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("x" * (MAX_PREFIX_LEN + 1), "17 bytes; at most 16"),
        (r"\x00" * (MAX_PREFIX_LEN + 1), "17 bytes; at most 16"),
        (r"\q", r"unknown escape '\q'"),
        (r"\x1", r"'\x1': \x takes two hex digits"),
        (r"\xzz", r"'\xzz': \x takes two hex digits"),
        ("ab\\", "ends in a lone"),
        ("é", "'é': write bytes other than printable ASCII as \\xHH"),
        ("a\tb", "write bytes other than printable ASCII"),
    ],
)
def test_parse_prefix_refuses(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_prefix(text)
    assert why in str(info.value) and "\n" not in str(info.value)


# ---- the handshake ---------------------------------------------------------------------------


def feed(machine, data: bytes):
    """Feed one byte at a time; the first event that is not NeedData."""
    for i in range(len(data)):
        machine.receive_data(data[i : i + 1])
        event = machine.next_event()
        if not isinstance(event, NeedData):
            assert i == len(data) - 1
            return event
    raise AssertionError("no event after the whole flight")


@pytest.mark.parametrize("prefix", [b"P", b"POST /", b"\x16\x03\x01", b"Z" * MAX_PREFIX_LEN])
def test_prefixed_flight_is_accepted_once(prefix: bytes) -> None:
    guard = ReplayGuard()
    flights = []
    for _ in range(2):
        hs = ClientHandshake(
            PSK, CIPHER, TARGET, WireMode.ENCRYPTED, clock=lambda: NOW, prefix=prefix
        )
        flight = hs.first_flight(b"hello")
        assert flight.startswith(prefix) and hs.salt.startswith(prefix)
        assert len(hs.salt) == SALT_LEN
        server = ServerHandshake(PSK, CIPHER, guard, clock=lambda: NOW)
        request = feed(server, flight)
        assert isinstance(request, Request)
        assert (request.target, request.early_data) == (TARGET, b"hello")
        flights.append(flight)
    # The rest of the salt is random: two flights share the prefix and nothing after it.
    a, b = (f[len(prefix) : SALT_LEN] for f in flights)
    assert a != b
    replayed = ServerHandshake(PSK, CIPHER, guard, clock=lambda: NOW)
    with pytest.raises(ProtocolError) as info:
        feed(replayed, flights[0])
    assert info.value.status == Status.REPLAY


def test_a_longer_prefix_is_refused_by_the_handshake() -> None:
    with pytest.raises(ConfigError, match="at most 16"):
        ClientHandshake(PSK, CIPHER, TARGET, prefix=b"x" * (MAX_PREFIX_LEN + 1))


def test_the_prefix_is_authenticated() -> None:
    """The prefix is part of the salt that keys the request: a changed prefix byte fails."""
    hs = ClientHandshake(PSK, CIPHER, TARGET, clock=lambda: NOW, prefix=b"POST /")
    flight = bytearray(hs.first_flight())
    flight[0] ^= 0x20  # "pOST /"
    server = ServerHandshake(PSK, CIPHER, ReplayGuard(), clock=lambda: NOW)
    with pytest.raises(ProtocolError) as info:
        feed(server, bytes(flight))
    assert info.value.status == Status.AUTH


# ---- real processes --------------------------------------------------------------------------


class CapturingRelay:
    """A TCP relay in front of the server that keeps every byte each client connection sent:
    what an observer on the path sees of the client's side."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.sent: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with self._lock:
            self.sent.append(buf)
        with conn, socket.create_connection(("127.0.0.1", self.upstream)) as up:
            back = threading.Thread(target=_pump, args=(up, conn, None), daemon=True)
            back.start()
            _pump(conn, up, buf)
            back.join(30)

    def flights(self) -> list[bytes]:
        with self._lock:
            return [bytes(b) for b in self.sent if b]

    def close(self) -> None:
        self.srv.close()


def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
    try:
        while data := src.recv(65536):
            if record is not None:
                record += data
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def next_second() -> None:
    """Wait for the next whole second: a server refuses flights stamped no later than the second
    it started in (its replay cache is new; docs/PROBING.md, "Replay")."""
    time.sleep(math.floor(time.time()) + 1.01 - time.time())


@pytest.mark.parametrize(
    ("how", "text", "prefix"),
    [("option", "POST /", b"POST /"), ("env", r"\x16\x03\x01", b"\x16\x03\x01")],
)
def test_prefixed_tunnel_end_to_end(
    tmp_path: Path, key_file: Path, how: str, text: str, prefix: bytes
) -> None:
    """Traffic flows; every tunnel the relay saw starts with the prefix and differs after it;
    the captured flight sent again is refused (counted `replay`, no byte back)."""
    need("curl")
    with ServerProcess(tmp_path, key_file, *ALLOW) as srv:
        relay = CapturingRelay(srv.port)
        args = ("--prefix", text) if how == "option" else ()
        env = {"MPTUN_PREFIX": text} if how == "env" else None
        try:
            with (
                ClientProcess(
                    tmp_path, key_file, relay.port, "--transport", "tcp", *args, env=env
                ) as cli,
                http_server() as (_, port),
            ):
                next_second()
                for seed in (1, 2):
                    r = curl("--socks5", cli.socks, f"http://127.0.0.1:{port}/bytes/200000/{seed}")
                    assert r.returncode == 0, r.stderr + cli.log()[-2000:].encode()
                    assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(200000, seed)
        finally:
            relay.close()
        flights = relay.flights()
        # the two tunnels, and the client's server checks (replay-protected flights too)
        assert len(flights) >= 2, [f[:8] for f in flights]
        assert all(f.startswith(prefix) for f in flights), [f[:8] for f in flights]
        assert flights[0][len(prefix) : SALT_LEN] != flights[1][len(prefix) : SALT_LEN]

        before = srv.counters().get("replay", 0)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(flights[0])
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""  # closed without a byte: absorbed like any failed flight
        assert srv.wait_counter("replay", before + 1).get("replay") == before + 1


def test_check_with_a_prefix(tmp_path: Path, key_file: Path) -> None:
    """`--check` sends the same kind of first flight as the tunnels: prefixed, and accepted."""
    with ServerProcess(tmp_path, key_file, stats=False) as srv:
        relay = CapturingRelay(srv.port)
        next_second()
        try:
            r = run_mptun(
                "client",
                "--server",
                f"127.0.0.1:{relay.port}",
                "--key-file",
                str(key_file),
                "--transport",
                "tcp",
                "--prefix",
                r"GET /\x20",
                "--check",
            )
        finally:
            relay.close()
    assert r.returncode == 0, r.stderr
    assert relay.flights() and relay.flights()[0].startswith(b"GET / ")


@pytest.mark.parametrize(
    ("layer", "value", "why"),
    [
        ("option", "x" * 17, "at most 16"),
        ("option", r"\q", r"unknown escape '\q'"),
        ("env", r"\x1", r"\x takes two hex digits"),
        ("toml", r"\x16\x03\x01" * 6, "18 bytes; at most 16"),
        ("uci", "é", r"write bytes other than printable ASCII as \xHH"),
    ],
)
def test_bad_prefix_is_one_line(tmp_path: Path, key_file: Path, layer: str, value: str, why: str):
    args = ["client", "--server", "127.0.0.1:1", "--key-file", str(key_file), "--check"]
    env = {}
    if layer == "option":
        args += ["--prefix", value]
    elif layer == "env":
        env["MPTUN_PREFIX"] = value
    elif layer == "toml":
        cfg = tmp_path / "client.toml"
        cfg.write_text(f"[client]\nprefix = '{value}'\n", encoding="utf-8")
        args += ["--config", str(cfg)]
    else:
        cfg = tmp_path / "mptun"
        cfg.write_text(f"config client 'main'\n\toption prefix '{value}'\n", encoding="utf-8")
        args += ["--uci", str(cfg)]
    r = run_mptun(*args, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mptun: error: "), r.stderr
    assert "prefix" in lines[0] and why in lines[0], lines[0]
