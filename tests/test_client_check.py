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
    closed_port,
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
    counters = server.wait_counter("check", 1)  # counted as a check, not a policy refusal
    assert counters["check"] == 1 and "policy" not in counters, counters


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
    with closed_port() as port:  # held, never listening: the connection is refused
        r = check(port, key_file)
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
    for bind in ("0.0.0.0:0", "[::]:0"):  # (a public address: no such here)
        r = run_mptun(
            "client", "--server", "127.0.0.1:1", "--key-file", str(key_file), "--socks", bind,
            timeout=30,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "open proxy" in r.stderr and "Traceback" not in r.stderr


# Inside the namespace: greet from one LAN address until the limit, then free a slot.
_PER_CLIENT_GREETER = """
import socket, sys, time
port = int(sys.argv[1])
held = []
def greet():
    s = socket.socket()
    s.settimeout(5)
    s.bind(("192.0.2.2", 0))
    s.connect(("192.0.2.1", port))
    try:
        s.sendall(b"\\x05\\x01\\x00")
        if s.recv(2) == b"\\x05\\x00":
            held.append(s)
            return True
    except ConnectionResetError:
        pass
    s.close()
    return False
assert all(greet() for _ in range(3)), "the first 3 were not served"
assert not greet(), "the 4th was served"
held.pop().close()
deadline = time.monotonic() + 10
while not greet():  # the slot frees once the client sees the close
    assert time.monotonic() < deadline, "the slot never freed"
print("ok")
"""


@pytest.mark.root
@pytest.mark.netns
def test_socks_per_client_limit(tmp_path: Path, key_file: Path) -> None:
    """Over --socks-per-client, a LAN address's extra connections are reset and counted (from a
    LAN address in a namespace: loopback, every local program's source, has no such cap)."""
    from mptun.lab.netns import Netns
    from tests.helpers import MptunProcess

    stats = tmp_path / "client-stats.json"
    with Netns("perclient") as ns:
        ns.ip("addr", "add", "192.0.2.1/24", "dev", "lo")
        ns.ip("addr", "add", "192.0.2.2/24", "dev", "lo")
        args = ["client", "--server", "127.0.0.1:1", "--key-file", str(key_file), "--socks",
                "192.0.2.1:0", "--socks-per-client", "3", "--stats-file", str(stats),
                "--control", "none"]  # fmt: skip
        with MptunProcess(args, tmp_path / "c.log", prefix=ns.prefix()) as client:
            (port,) = client.ports("socks")
            r = ns.exec(sys.executable, "-c", _PER_CLIENT_GREETER, str(port), check=False,
                        timeout=60)  # fmt: skip
            assert r.stdout.strip() == "ok", (r.stdout, r.stderr, client.log()[-2000:])
            counters = read_stats_after_usr1(client.pid, stats)["counters"]
            assert counters["socks-per-client"] >= 1


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
        # one line from the tunnels (the first of a burst), one from the server checks when they
        # find the server down (new tunnels are then refused at once: --when-down)
        advice = [
            ln
            for ln in cli.log().splitlines()
            if "clock" in ln and ("same key" in ln or "wrong key" in ln)
        ]
        assert 1 <= len(advice) <= 2, advice
        counters = cli.stats()["counters"]
        assert counters.get("timeout", 0) + counters.get("all-servers-down", 0) == 3
    finally:
        cli.stop()
