"""`mptun client --check` tells key/clock trouble from an unreachable server; SOCKS-side limits."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mptun.common.crypto import generate_key
from tests.helpers import (
    ClientProcess,
    ServerProcess,
    free_port,
    read_stats_after_usr1,
    run_mptun,
)
from tests.peers import socks_open


def check(port: int, key_file: Path, *extra: str, prefix: tuple = (), env: dict | None = None):
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "mptun",
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--key-file",
            str(key_file),
            "--handshake-timeout",
            "2",
            "--check",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def server(tmp_path: Path, key_file: Path):
    srv = ServerProcess(tmp_path, key_file)
    yield srv
    srv.stop()


def test_check_ok(server: ServerProcess, key_file: Path) -> None:
    r = check(server.port, key_file)
    assert r.returncode == 0, r.stderr
    assert "key, cipher and clock accepted" in r.stdout
    assert server.wait_counter("policy", 1)["policy"] == 1  # the probe target is refused


def test_check_wrong_key_says_key_and_clock(server: ServerProcess, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text(generate_key() + "\n")
    other.chmod(0o600)
    r = check(server.port, other)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "same key" in r.stderr and "clock" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert server.wait_counter("auth", 1)["auth"] == 1


def test_check_clock_an_hour_behind(server: ServerProcess, key_file: Path) -> None:
    """A router that booted in the past: the real process really runs with a wrong clock."""
    if shutil.which("faketime") is None:
        pytest.skip("faketime is not installed (make test installs it)")
    r = check(
        server.port,
        key_file,
        prefix=("faketime", "-f", "-3600s"),
        env={"FAKETIME_DONT_FAKE_MONOTONIC": "1"},
    )
    assert r.returncode == 4, r.stdout + r.stderr
    assert "clock" in r.stderr
    assert server.wait_counter("clock", 1)["clock"] == 1


def test_check_unreachable(key_file: Path) -> None:
    r = check(free_port(), key_file)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "cannot reach" in r.stderr


def test_check_not_mptun(key_file: Path) -> None:
    """Something else on the port (here: a server that sends 200 random bytes) is not 'silent'."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(os.urandom(200))
        time.sleep(1)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = check(port, key_file)
    finally:
        t.join()
        srv.close()
    assert r.returncode == 5, r.stdout + r.stderr


def test_socks_refuses_wildcard_without_auth(key_file: Path) -> None:
    port = free_port()
    for bind in (f"0.0.0.0:{port}", f"[::]:{port}"):  # (a public address: no such here)
        r = run_mptun(
            "client", "--server", "127.0.0.1:1", "--key-file", str(key_file), "--socks", bind,
            timeout=30,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "open proxy" in r.stderr and "Traceback" not in r.stderr


def test_socks_per_client_limit(tmp_path: Path, key_file: Path, mptun_pair) -> None:
    """Over --socks-per-client, a LAN address's extra connections are reset and counted."""
    stats = tmp_path / "client-stats.json"
    pair = mptun_pair(client_args=("--socks-per-client", "3", "--stats-file", str(stats)))
    deadline = time.monotonic() + 10
    while read_stats_after_usr1(pair.client.pid, stats)["active"]:  # wait_listening's probe
        assert time.monotonic() < deadline

    def greet() -> bool:
        """Open a SOCKS connection: True if served, False if reset by the limit."""
        s = socket.create_connection(("127.0.0.1", pair.socks_port), timeout=5)
        try:
            s.sendall(b"\x05\x01\x00")
            if s.recv(2) == b"\x05\x00":
                held.append(s)
                return True
        except ConnectionResetError:
            pass
        s.close()
        return False

    held: list[socket.socket] = []
    try:
        assert all(greet() for _ in range(3))
        assert not greet()
        held.pop().close()
        while not greet():  # the slot frees once the client sees the close
            assert time.monotonic() < deadline + 10, "the slot never freed"
        counters = read_stats_after_usr1(pair.client.pid, stats)["counters"]
        assert counters["socks-per-client"] >= 1
    finally:
        for s in held:
            s.close()


def test_running_client_logs_key_and_clock_advice_once(tmp_path: Path, server: ServerProcess):
    """Tunnels the server never answers: one log line naming key and clock, not one per tunnel."""
    from mptun.common.address import Address

    other = tmp_path / "other"
    other.write_text(generate_key() + "\n")
    other.chmod(0o600)
    cli = ClientProcess(
        tmp_path, other, server.port, "--reply", "verified", "--handshake-timeout", "1"
    )
    try:
        for _ in range(3):
            s, reply = socks_open(cli.socks_port, Address.parse("192.0.2.1:80"), timeout=20)
            s.close()
            assert reply == 1
        advice = [ln for ln in cli.log().splitlines() if "same key" in ln and "clock" in ln]
        assert len(advice) == 1, advice
        assert cli.stats()["counters"]["timeout"] == 3
    finally:
        cli.stop()
