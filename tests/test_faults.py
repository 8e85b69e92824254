"""Faults: unreachable targets, a server that dies or restarts, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.crypto import generate_key
from tests.helpers import ClientProcess, ServerProcess, closed_port, wait_listening
from tests.peers import StreamTarget, read_until_end, socks_open

CONNECT_TIMEOUT = 1.0


def resolv_prefix(tmp: Path) -> list[str]:
    """Run the server in a mount namespace whose resolver asks 127.0.0.1:53, where nothing is."""
    resolv = tmp / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(resolv)]


@pytest.fixture
def silent_target():
    """A listener whose accept queue is full: further SYNs are dropped, connects time out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    fillers = []
    while True:  # fill the queue until a connect no longer completes
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(srv.getsockname())
        except TimeoutError:
            s.close()
            break
        fillers.append(s)
        assert len(fillers) < 16
    yield srv.getsockname()[1]
    for s in fillers:
        s.close()
    srv.close()


@pytest.mark.root
@pytest.mark.timing
def test_verified_replies_come_quickly(tmp_path: Path, key_file: Path, silent_target: int):
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    srv = ServerProcess(
        tmp_path, key_file, "--allow-private", "--connect-timeout", str(CONNECT_TIMEOUT),
        prefix=resolv_prefix(tmp_path),
    )  # fmt: skip
    cli = ClientProcess(tmp_path, key_file, srv.port, "--reply", "verified")
    try:
        with closed_port() as refused:  # held, never listening: connection refused
            cases = {
                "refused": (Address.parse(f"127.0.0.1:{refused}"), 5),
                "timeout": (Address.parse(f"127.0.0.1:{silent_target}"), 6),  # TTL expired
                "dns": (Address.parse("no-such-name.test:80"), 4),  # host unreachable
            }
            for name, (target, code) in cases.items():
                t0 = time.monotonic()
                s, reply = socks_open(cli.socks_port, target, timeout=20)
                took = time.monotonic() - t0
                s.close()
                assert reply == code, name
                assert took < CONNECT_TIMEOUT + 2.5, f"{name}: {took:.1f} s"
                print(f"{name}: SOCKS reply {reply} after {took * 1000:.0f} ms")
    finally:
        cli.stop()
        srv.stop()


@pytest.mark.parametrize("bulk", ["plain", "auto"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_server_restart_resets_the_lan_side(tmp_path: Path, key_file: Path, sig, bulk):
    """Open transfers end with RST at the application (never a FIN that looks complete), also
    when idle at the moment of death; new connections work as soon as the server is back."""
    srv = ServerProcess(
        tmp_path, key_file, "--allow-private", "--drain-timeout", "1", "--bulk", bulk
    )
    cli = ClientProcess(tmp_path, key_file, srv.port, "--bulk", bulk)
    busy, idle = StreamTarget(interval=0.01), StreamTarget(interval=60)
    socks: list[socket.socket] = []
    try:
        for target in (busy, idle, busy, idle):
            s, reply = socks_open(cli.socks_port, target.address)
            assert reply == 0
            assert s.recv(100)
            socks.append(s)
        srv.stop(sig)
        ends = [read_until_end(s, 15)[1] for s in socks]
        assert ends == ["reset"] * 4
        with ServerProcess(tmp_path, key_file, "--allow-private", "--bulk", bulk, port=srv.port):
            s, reply = socks_open(cli.socks_port, busy.address)
            assert reply == 0 and s.recv(100)
            s.close()
    finally:
        for s in socks:
            s.close()
        busy.close()
        idle.close()
        cli.stop()
        srv.stop()


@pytest.mark.timing
def test_sigterm_stops_accepting_drains_then_exits_0(tmp_path: Path, key_file: Path):
    drain = 3.0
    srv = ServerProcess(tmp_path, key_file, "--allow-private", "--drain-timeout", str(drain))
    cli = ClientProcess(tmp_path, key_file, srv.port)
    total = 2 * 1024 * 1024  # 1 s at 128 x 16 KiB per second: ends inside the drain
    finite, endless = StreamTarget(total=total), StreamTarget()
    try:
        a, ra = socks_open(cli.socks_port, finite.address)
        b, rb = socks_open(cli.socks_port, endless.address)
        assert ra == rb == 0 and a.recv(1) and b.recv(1)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        deadline = t0 + 2
        while True:  # the listener closes at once: new connections are refused by the kernel
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", srv.port)) != 0:
                    break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.02)
        got, end = read_until_end(a, 15)
        assert (got + 1, end) == (total, "eof")  # the finite transfer completes
        assert read_until_end(b, 15)[1] == "reset"  # the endless one is reset at the deadline
        assert srv.proc.wait(15) == 0
        took = time.monotonic() - t0
        assert drain - 0.2 < took < drain + 3, took
    finally:
        finite.close()
        endless.close()
        cli.stop()
        srv.stop()


@pytest.mark.timing
def test_sighup_reloads_the_key_without_dropping_connections(tmp_path: Path, key_file: Path):
    srv = ServerProcess(tmp_path, key_file, "--allow-private")
    old_client = ClientProcess(
        tmp_path, key_file, srv.port, "--reply", "verified", "--handshake-timeout", "2"
    )
    target = StreamTarget(interval=0.02)
    try:
        s, reply = socks_open(old_client.socks_port, target.address)
        assert reply == 0 and s.recv(1)
        new_key = tmp_path / "new-key"
        new_key.write_text(generate_key() + "\n")
        new_key.chmod(0o600)
        os.replace(new_key, key_file)  # the same path, a new key
        os.kill(srv.proc.pid, signal.SIGHUP)
        assert srv.wait_counter("reload", 1)["reload"] == 1
        # The open connection still flows after the reload ...
        s.settimeout(5)
        got = 0
        t_end = time.monotonic() + 10.0
        while got == 0 and time.monotonic() < t_end:  # bytes, however late a loaded machine is
            got += len(s.recv(65536))
        assert got > 0
        # ... new tunnels with the old key are refused (silently: the client times out) ...
        s2, reply2 = socks_open(old_client.socks_port, target.address, timeout=20)
        s2.close()
        assert reply2 == 1
        # ... and a client with the new key gets through.
        with ClientProcess(tmp_path, key_file, srv.port, "--reply", "verified") as new_client:
            s3, reply3 = socks_open(new_client.socks_port, target.address)
            assert reply3 == 0 and s3.recv(1)
            s3.close()
        target.stop.set()  # the first connection ends cleanly, unharmed by the reload
        assert read_until_end(s, 15)[1] == "eof"
        s.close()
    finally:
        target.close()
        old_client.stop()
        srv.stop()


def test_bad_config_on_sighup_keeps_running(tmp_path: Path, key_file: Path):
    conf = tmp_path / "server.toml"
    conf.write_text("[server]\nallow-private = true\n")
    with ServerProcess(tmp_path, key_file, "--config", str(conf)) as srv:
        conf.write_text("[server]\nno-such-key = 1\n")
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in srv.log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert srv.proc.poll() is None
        wait_listening("127.0.0.1", srv.port)
        assert srv.counters().get("reload", 0) == 0
