"""SIGHUP reloads the client, as it does the server: real processes, a config file edited
between signals, open connections that must live through it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.common.address import Address
from mptun.common.crypto import generate_key
from mptun.lab.wait import wait_logged_listeners, wait_until
from tests.helpers import ROOT
from tests.peers import socks_open


class Proc:
    """`python -m mptun --log-level debug ARGS`, its log in a file."""

    def __init__(self, log: Path, args: list[str]) -> None:
        self.path = log
        self._f = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mptun", "--log-level", "debug", *args],
            stdout=self._f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("MPTUN_")},
        )

    def log(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.path.read_text(errors="replace")

    def listeners(self, count: int = 1) -> list[tuple[str, str, int]]:
        return wait_logged_listeners(self.log, count, self.proc, 20)

    def hup_and_wait(self, what: str = "reload") -> str:
        """SIGHUP, then the new line the reload logged (`reloaded: ...` or the failure)."""
        before = len(re.findall(what, self.log()))
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(re.findall(what, self.log())) > before, 10, what, proc=self.proc)
        return [x for x in self.log().splitlines() if re.search(what, x)][-1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()
        return self.proc.returncode


class Echo:
    """A loopback TCP echo target, one thread per connection."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.address = Address.parse(f"127.0.0.1:{self.srv.getsockname()[1]}")
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass


def roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _tunnel_ok(bed: dict) -> bool:
    s, status = socks_open(bed["socks"], bed["echo"].address)
    s.close()
    if status != 0:
        time.sleep(0.2)  # one attempt per 0.2 s while waiting
    return status == 0


def key(path: Path) -> Path:
    path.write_text(generate_key() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[dict]:
    """A server and a client, each reading a TOML config it is told to reload, and an echo."""
    k1, k2 = key(tmp_path / "k1"), key(tmp_path / "k2")
    sconf = tmp_path / "server.toml"
    sconf.write_text(f'[server]\nlisten = "127.0.0.1:0"\nkey-file = "{k1}"\nallow-private = true\n')
    server = Proc(tmp_path / "server.log", ["server", "--config", str(sconf)])
    procs = [server]
    try:
        ((_, _, port),) = server.listeners()
        cconf = tmp_path / "client.toml"
        client_conf = (
            f'[client]\nserver = "127.0.0.1:{port}"\nreply = "verified"\nsocks = "127.0.0.1:0"\n'
            # a tunnel whose key the server does not know gets no answer: fail it in 2 s, well
            # within socks_open's 10 s (the server checks may not have marked it down yet)
            "handshake-timeout = 2\n"
        )
        cconf.write_text(client_conf + f'key-file = "{k1}"\n')
        client = Proc(tmp_path / "client.log", ["client", "--config", str(cconf)])
        procs.append(client)
        ((_, _, socks),) = client.listeners()
        yield {
            "server": server,
            "client": client,
            "k1": k1,
            "k2": k2,
            "sconf": sconf,
            "cconf": cconf,
            "client_conf": client_conf,
            "socks": socks,
            "echo": Echo(),
        }
    finally:
        for p in reversed(procs):
            p.stop()


def test_hup_changes_the_key_and_keeps_open_connections(bed: dict) -> None:
    client, server, echo = bed["client"], bed["server"], bed["echo"]
    old, status = socks_open(bed["socks"], echo.address)
    assert status == 0
    assert roundtrip(old, b"before") == b"before"

    bed["cconf"].write_text(bed["client_conf"] + f'key-file = "{bed["k2"]}"\n')
    line = client.hup_and_wait("reloaded:")
    assert "key changed" in line and "need a restart" not in line, line
    assert client.proc.poll() is None
    # the open connection lives on, through its old tunnel
    assert roundtrip(old, b"after the client's reload") == b"after the client's reload"
    # a new tunnel uses the new key, which the server does not know yet: refused
    new, status = socks_open(bed["socks"], echo.address)
    new.close()
    assert status != 0
    # the server learns it too: new tunnels work again, the old connection still does
    bed["sconf"].write_text(bed["sconf"].read_text().replace(str(bed["k1"]), str(bed["k2"])))
    assert "key changed" in server.hup_and_wait("reloaded:")
    # the refused tunnel may have marked the server down: new connections are refused until
    # the client's next check (every 2 s) finds it up with the new key
    wait_until(lambda: _tunnel_ok(bed), 15, "a tunnel with the new key", proc=client.proc)
    new, status = socks_open(bed["socks"], echo.address)
    with new:
        assert status == 0
        assert roundtrip(new, b"new key") == b"new key"
    assert roundtrip(old, b"still here") == b"still here"
    old.close()


def test_hup_rebinds_changed_listeners(bed: dict) -> None:
    client, echo = bed["client"], bed["echo"]
    old, status = socks_open(bed["socks"], echo.address)
    assert status == 0
    forward = f"127.0.0.1:0={echo.address}"
    bed["cconf"].write_text(
        bed["client_conf"].replace('socks = "127.0.0.1:0"', 'socks = "127.0.0.2:0"')
        + f'key-file = "{bed["k1"]}"\nforward = ["{forward}"]\nsocks-per-client = 8\n'
    )
    line = client.hup_and_wait("reloaded:")
    assert "socks-per-client" in line, line
    assert "socks on 127.0.0.1:0 closed" in line, line
    assert re.search(r"socks on 127\.0\.0\.2:\d+ opened", line), line
    assert re.search(r"forward on 127\.0\.0\.1:\d+ opened", line), line
    found = {k: (h, p) for k, h, p in client.listeners(3)[1:]}
    # the old SOCKS port is closed; the connection accepted on it goes on
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", bed["socks"]), timeout=5).close()
    assert roundtrip(old, b"old socks") == b"old socks"
    old.close()
    host, port = found["socks"]
    new, status = socks_open(port, echo.address) if host == "127.0.0.1" else (None, None)
    if new is None:  # socks_open dials 127.0.0.1: do it by hand on 127.0.0.2
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00" + echo.address.encode())
        reply = s.recv(10)
        assert reply[1] == 0, reply
        new = s
    with new:
        assert roundtrip(new, b"new socks") == b"new socks"
    with socket.create_connection(found["forward"], timeout=10) as f:
        assert roundtrip(f, b"forwarded") == b"forwarded"


def test_hup_with_a_broken_config_keeps_running(bed: dict) -> None:
    client, echo = bed["client"], bed["echo"]
    bed["cconf"].write_text(bed["client_conf"] + 'key-file = "/nonexistent/key"\n')
    line = client.hup_and_wait("reload failed")
    assert "keeping the running configuration" in line and "/nonexistent/key" in line, line
    assert " ERROR " in line
    s, status = socks_open(bed["socks"], echo.address)
    with s:
        assert status == 0
        assert roundtrip(s, b"unchanged") == b"unchanged"


def test_hup_names_what_needs_a_restart(bed: dict) -> None:
    client, echo = bed["client"], bed["echo"]
    bed["cconf"].write_text(
        bed["client_conf"] + f'key-file = "{bed["k1"]}"\ntransport = "tcp"\nidle-timeout = 30\n'
    )
    line = client.hup_and_wait("reloaded:")
    assert "idle-timeout changed" in line, line
    assert "transport need a restart" in line, line
    s, status = socks_open(bed["socks"], echo.address)
    with s:
        assert status == 0
    # a second reload compares with what is in force: the transport is still reported as kept
    line = client.hup_and_wait("reloaded:")
    assert line.split("reloaded: ")[1].startswith("nothing changed; transport"), line
