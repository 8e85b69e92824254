"""The health-check request: the machine (check, unknown types, replay) and `probe_server`
against a real server process (answered at once, counted as a check, "server too old")."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fuzz.targets import NOW as FUZZ_NOW
from fuzz.targets import sealed_request, server_handshake
from mptun.client.health import HealthMonitor, HealthSettings, UplinkState
from mptun.client.probe import ProbeFailure, probe_server
from mptun.common.address import Address
from mptun.common.crypto import CIPHERS, generate_key
from mptun.common.drive import drive
from mptun.common.errors import ProtocolError, Status, UsageError
from mptun.common.handshake import (
    CHECK_TARGET,
    TYPE_CHECK,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    CheckRequest,
    ClientHandshake,
    ConnectStatus,
    Response,
    ServerHandshake,
    Unsupported,
    WireMode,
)
from mptun.common.replay import ReplayGuard
from mptun.common.sockets import Transport
from tests.helpers import ServerProcess, closed_port, load_key_file, run_mptun

NOW = 1_800_000_000.0
PSK = bytes(range(32))
AES = CIPHERS["aes-256-gcm"]


def _client(kind: int, psk: bytes = PSK) -> ClientHandshake:
    return ClientHandshake(psk, AES, CHECK_TARGET, WireMode.ENCRYPTED, clock=lambda: NOW, kind=kind)


def _server(guard: ReplayGuard | None = None) -> ServerHandshake:
    return ServerHandshake(PSK, AES, ReplayGuard() if guard is None else guard, clock=lambda: NOW)


def _feed_byte_at_a_time(machine, data: bytes):
    """Every proper prefix needs more data; the whole flight gives one event."""
    for i, b in enumerate(data):
        assert machine.bytes_needed() > 0, i
        machine.receive_data(bytes([b]))
        event = machine.next_event()
        if i < len(data) - 1:
            assert event.__class__.__name__ == "NeedData", i
    assert machine.bytes_needed() == 0
    return event


def test_check_round_trip_byte_at_a_time() -> None:
    c, s = _client(TYPE_CHECK), _server()
    assert _feed_byte_at_a_time(s, c.first_flight()) == CheckRequest(int(NOW))
    resp = s.respond(ConnectStatus.SUCCEEDED)
    assert _feed_byte_at_a_time(c, resp) == Response(ConnectStatus.SUCCEEDED)
    with pytest.raises(UsageError):
        s.bulk_keys()  # a check carries no bulk data


@pytest.mark.parametrize("kind", [0x00, 0x05, 0x7F, 0xFF])  # 0x04 is UDP
def test_unknown_type_authenticates_and_is_answered_unsupported(kind: int) -> None:
    c, s = _client(kind), _server()
    c_flight = c.first_flight(b"a future request body")
    assert _feed_byte_at_a_time(s, c_flight) == Unsupported(kind, int(NOW))
    assert _feed_byte_at_a_time(c, s.respond(ConnectStatus.UNSUPPORTED)) == Response(
        ConnectStatus.UNSUPPORTED
    )


@pytest.mark.parametrize("kind", [TYPE_CHECK, 0x7F])
def test_check_and_unknown_types_are_replay_protected_and_authenticated(kind: int) -> None:
    guard = ReplayGuard()
    flight = _client(kind).first_flight()
    s = _server(guard)
    s.receive_data(flight)
    assert not isinstance(s.next_event(), ProtocolError)
    again = _server(guard)
    again.receive_data(flight)
    with pytest.raises(ProtocolError) as e:
        again.next_event()
    assert e.value.status == Status.REPLAY
    stranger = _server()
    stranger.receive_data(_client(kind, psk=bytes(32)).first_flight())
    with pytest.raises(ProtocolError) as e:
        stranger.next_event()
    assert e.value.status == Status.AUTH


def test_response_type_is_no_request_type() -> None:
    with pytest.raises(UsageError):
        _client(TYPE_RESPONSE)


def _probe(port: int, psk: bytes, **kw) -> object:
    async def run():
        loop = asyncio.get_running_loop()
        return await probe_server(
            Address(ipaddress.ip_address("127.0.0.1"), port),
            psk,
            AES,
            transport=Transport(want_mptcp=False),
            deadline=loop.time() + kw.pop("timeout", 5.0),
            **kw,
        )

    return asyncio.run(run())


@pytest.fixture
def server(tmp_path: Path, key_file: Path):
    srv = ServerProcess(tmp_path, key_file)
    yield srv
    srv.stop()


def test_probe_is_answered_at_once_and_counted_as_a_check(server: ServerProcess) -> None:
    results = [_probe(server.port, server.psk, source="127.0.0.2") for _ in range(5)]
    for r in results:
        assert r.ok and r.answered and r.status == ConnectStatus.SUCCEEDED, r
        assert r.failure == ProbeFailure.NONE and r.rtt is not None and r.mptcp is None
    counters = server.wait_counter("check", 5)
    assert counters["check"] == 5
    assert not {"policy", "auth", "replay", "connect"} & set(counters), counters
    # Five checks, one log line (health probes send several a second).
    info = [line for line in server.log().splitlines() if " INFO " in line]
    assert sum("check from 127.0.0.2" in line for line in info) == 1, info


def test_old_check_form_is_still_answered(server: ServerProcess) -> None:
    async def run() -> Response | None:
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setblocking(False)
        try:
            hs = ClientHandshake(server.psk, AES, CHECK_TARGET, WireMode.ENCRYPTED)
            await loop.sock_sendall(sock, hs.first_flight())
            return await drive(loop, sock, hs, loop.time() + 5)
        finally:
            sock.close()

    assert asyncio.run(run()) == Response(ConnectStatus.NOT_ALLOWED)
    counters = server.wait_counter("check", 1)
    assert "policy" not in counters, counters


def test_unknown_type_gets_unsupported_not_silence(server: ServerProcess) -> None:
    async def run() -> Response | None:
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setblocking(False)
        try:
            hs = ClientHandshake(server.psk, AES, CHECK_TARGET, kind=0x7F)
            await loop.sock_sendall(sock, hs.first_flight())
            return await drive(loop, sock, hs, loop.time() + 5)
        finally:
            sock.close()

    assert asyncio.run(run()) == Response(ConnectStatus.UNSUPPORTED)
    assert server.wait_counter("unsupported", 1)["unsupported"] == 1
    assert "type 0x7f unsupported" in server.log()


def test_probe_failures_are_told_apart(server: ServerProcess, tmp_path: Path) -> None:
    wrong = _probe(server.port, bytes.fromhex(generate_key_hex()))
    assert not wrong.ok and wrong.failure == ProbeFailure.SILENT and wrong.received == 0, wrong
    with closed_port() as port:
        closed = _probe(port, server.psk)
    assert closed.failure == ProbeFailure.UNREACHABLE and "cannot reach" in closed.reason
    bad_source = _probe(server.port, server.psk, source="not-an-address")
    assert bad_source.failure == ProbeFailure.UNREACHABLE and "no IP address" in bad_source.reason


def test_connect_request_still_needs_type_0x01() -> None:
    """The connect request is unchanged: type 0x01, parsed as before."""
    c = ClientHandshake(PSK, AES, CHECK_TARGET, WireMode.PLAIN, clock=lambda: NOW)
    s = _server()
    s.receive_data(c.first_flight())
    event = s.next_event()
    assert event.target == CHECK_TARGET and TYPE_REQUEST == 0x01


def generate_key_hex() -> str:
    """A random key other than the server's, as hex."""
    return base64.b64decode(generate_key()).hex()


def test_check_says_server_too_old(tmp_path: Path, key_file: Path) -> None:
    """A server that answers the check "unsupported" (as any type it does not know): exit 6."""
    psk = load_key_file(key_file)
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            hs = ServerHandshake(psk, AES, ReplayGuard())
            while not isinstance(event := hs.next_event(), CheckRequest):
                hs.receive_data(conn.recv(hs.bytes_needed()))
            assert event
            conn.sendall(hs.respond(ConnectStatus.UNSUPPORTED))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = subprocess.run(
            [
                *(sys.executable, "-m", "mptun", "client", "--server", f"127.0.0.1:{port}"),
                *("--key-file", str(key_file), "--handshake-timeout", "5", "--check"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        lsock.close()
        t.join(10)
    assert r.returncode == 6, r.stdout + r.stderr
    assert "server too old" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fuzz_target_takes_checks_and_unknown_types() -> None:
    """Authenticated flights of any type reach the fuzz target's server without an assertion."""
    for kind, want in ((TYPE_CHECK, CheckRequest), (0x42, Unsupported)):
        fixed = bytes([kind]) + FUZZ_NOW.to_bytes(8, "big") + (0).to_bytes(2, "big")
        assert isinstance(server_handshake(sealed_request(fixed, b"")), want)


def test_health_monitor_probes_through_an_uplink_and_writes_the_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The prober's loop against a real server: loopback as the one uplink (its address, bound
    to `lo`): up within a few rounds, the file written, removed at close."""
    path = tmp_path / "health.json"

    async def run() -> tuple[list[dict], dict]:
        monitor = HealthMonitor(
            ["lo"],
            lambda: Address(ipaddress.ip_address("127.0.0.1"), server.port),
            server.psk,
            AES,
            HealthSettings(interval=0.2, dead_after=1.0),
            str(path),
            addresses=lambda names: {"lo": [ipaddress.ip_address("127.0.0.1")]},
        )
        monitor.start(asyncio.get_running_loop())
        try:
            for _ in range(100):
                if monitor.healths()[0].state == UplinkState.UP:
                    break
                await asyncio.sleep(0.05)
            return monitor.snapshot(), json.loads(path.read_text())
        finally:
            monitor.close()

    snapshot, written = asyncio.run(run())
    assert snapshot[0]["state"] == "up" and snapshot[0]["addresses"] == ["127.0.0.1"]
    assert written["withdrawn"] == [] and written["uplinks"]["lo"]["state"] == "up"
    assert not path.exists()  # removed at close: nothing stays withdrawn
    assert server.wait_counter("check", 3)["check"] >= 3


def test_uplink_options_are_checked_in_one_line(key_file: Path) -> None:
    base = ["client", "--server", "127.0.0.1:1", "--key-file", str(key_file)]
    base += ["--socks", "127.0.0.1:0", "--uplink", "wan1"]
    r = run_mptun(*base, "--uplink-check-interval", "1", "--uplink-dead-after", "1.5")
    assert r.returncode == 2 and "at least twice --uplink-check-interval" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_mptun(*base, "--uplink-degraded-loss", "0")
    assert r.returncode == 2 and "--uplink-degraded-loss" in r.stderr
    assert "Traceback" not in r.stderr
