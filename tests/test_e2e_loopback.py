"""mptun server + client as real processes on loopback, driven by curl and raw SOCKS clients."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ClientProcess, ServerProcess, curl, need
from tests.peers import deterministic_bytes, http_server, sha256_of_stream

ALLOW = ("--allow-target", "127.0.0.0/8", "--allow-target", "::1/128")
SIZE = 50 * 1024 * 1024


def socks_connect(socks_port: int, host: str, port: int, timeout: float = 10):
    """A raw SOCKS5 CONNECT (domain form); returns (socket, reply code)."""
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    name = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", port))
    rep = b""
    while len(rep) < 10:
        c = s.recv(10 - len(rep))
        if not c:
            break
        rep += c
    return s, rep[1] if len(rep) > 1 else None


@pytest.fixture(params=["splice", "copy"])
def relay(request) -> str:
    return request.param


def test_download_50mib_sha256(mptun_pair, relay):
    need("curl")
    pair = mptun_pair(server_args=(*ALLOW, "--relay", relay), client_args=("--relay", relay))
    with http_server() as (_, port):
        r = curl(
            "--socks5-hostname", pair.socks, f"http://localhost:{port}/bytes/{SIZE}/7", "-o", "-"
        )
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(SIZE, 7)
    assert "relay " + relay in pair.server.log()


def test_upload_50mib_sha256(mptun_pair, tmp_path: Path):
    need("curl")
    pair = mptun_pair(server_args=ALLOW)
    f = tmp_path / "up.bin"
    with open(f, "wb") as out:
        for c in deterministic_bytes(SIZE, 9):
            out.write(c)
    with http_server() as (_, port):
        r = curl("--socks5", pair.socks, "-T", str(f), f"http://127.0.0.1:{port}/up")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == sha256_of_stream(SIZE, 9)


def test_ipv6_target(mptun_pair):
    need("curl")
    pair = mptun_pair(server_args=ALLOW)
    with http_server("::1") as (_, port):
        r = curl("--socks5", pair.socks, f"http://[::1]:{port}/bytes/100000/3", "-o", "-")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(100000, 3)


def test_tunnel_over_ipv6(tmp_path: Path, key_file: Path):
    """Server listening on [::1], client dialing it by its IPv6 address."""
    need("curl")
    with (
        ServerProcess(tmp_path, key_file, *ALLOW, host="::1", stats=False) as srv,
        ClientProcess(tmp_path, key_file, srv.port, server_host="::1", stats=False) as cli,
    ):
        with http_server() as (_, port):
            r = curl(
                "--socks5-hostname",
                cli.socks,
                f"http://localhost:{port}/bytes/1000000/4",
                "-o",
                "-",
            )
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == sha256_of_stream(1000000, 4)


class ScriptedTarget:
    """A TCP target on loopback whose behaviour per connection is a function."""

    def __init__(self, behave) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.behave = behave
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                self.behave(conn)
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while c := s.recv(65536):
        out += c
    return bytes(out)


def test_half_close_reply_after_shutdown(mptun_pair):
    """The client sends, shuts down its write side, and still receives the full reply."""
    reply = os.urandom(3 * 1024 * 1024)

    def behave(conn: socket.socket) -> None:
        data = recv_all(conn)  # returns only once the client's FIN crossed the tunnel
        conn.sendall(hashlib.sha256(data).digest() + reply)

    target = ScriptedTarget(behave)
    pair = mptun_pair(server_args=ALLOW)
    try:
        s, code = socks_connect(pair.socks_port, "127.0.0.1", target.port)
        assert code == 0
        request = os.urandom(1024 * 1024)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
        s.close()
    finally:
        target.close()
    assert not target.errors
    assert got[:32] == hashlib.sha256(request).digest()
    assert got[32:] == reply


def test_abnormal_end_resets_the_other_leg(mptun_pair):
    """The target resets mid-transfer: the SOCKS client sees a reset, not a clean EOF."""

    def behave(conn: socket.socket) -> None:
        conn.sendall(os.urandom(256 * 1024))
        time.sleep(0.3)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    target = ScriptedTarget(behave)
    pair = mptun_pair(server_args=ALLOW)
    try:
        s, code = socks_connect(pair.socks_port, "127.0.0.1", target.port)
        assert code == 0
        s.settimeout(10)
        with pytest.raises(ConnectionResetError):
            recv_all(s)
        s.close()
    finally:
        target.close()


@pytest.mark.parametrize(
    ("server_args", "host_port", "code"),
    [
        (ALLOW, "refused", 5),  # connection refused
        ((), "127.0.0.1", 2),  # not allowed by the default policy
        (ALLOW, "name.invalid", 4),  # DNS failure -> host unreachable
    ],
)
@pytest.mark.timing
def test_verified_mode_reports_the_servers_status(mptun_pair, server_args, host_port, code):
    pair = mptun_pair(server_args=server_args, client_args=("--reply", "verified"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, not listening: connect is refused
        host = "127.0.0.1" if host_port == "refused" else host_port
        t0 = time.monotonic()
        s, got = socks_connect(pair.socks_port, host, closed_port)
        s.close()
    assert got == code
    assert time.monotonic() - t0 < 8


def test_optimistic_mode_resets_on_refusal(mptun_pair):
    pair = mptun_pair(server_args=ALLOW)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        s, code = socks_connect(pair.socks_port, "127.0.0.1", probe.getsockname()[1])
        assert code == 0  # optimistic: success at once
        s.sendall(b"hello")
        s.settimeout(10)
        with pytest.raises(ConnectionResetError):
            recv_all(s)
        s.close()


def test_tunnel_really_is_mptcp(mptun_pair):
    """Both ends see MPTCP (MPTCP_INFO answers) and `ss -M` lists the tunnel's MPTCP sockets."""
    reply_gate = threading.Event()

    def behave(conn: socket.socket) -> None:
        conn.sendall(b"x")
        reply_gate.wait(10)

    target = ScriptedTarget(behave)
    pair = mptun_pair(server_args=ALLOW)
    try:
        s, code = socks_connect(pair.socks_port, "127.0.0.1", target.port)
        assert code == 0 and s.recv(1) == b"x"
        ss = subprocess.run(
            ["ss", "-Mtn", "state", "established"], capture_output=True, text=True
        ).stdout
        reply_gate.set()
        s.close()
    finally:
        target.close()
    assert f":{pair.server_port} " in ss + " ", ss
    assert " mptcp -> " in pair.client.log()
    assert " mptcp -> " in pair.server.log()
