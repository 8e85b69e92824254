"""Hardening-test plumbing: an mptun server process with readable counters, and first flights."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mptun.common.address import Address
from mptun.common.crypto import DEFAULT_CIPHER, cipher_by_name, load_key_file
from mptun.common.handshake import ClientHandshake, NeedData, Response, WireMode
from mptun.common.stats import read_stats
from tests.helpers import MptunProcess, free_port, wait_listening

# The statuses a failed first flight is counted under (server/service.py, common/errors.py).
HANDSHAKE_STATUSES = ("auth", "replay", "clock", "replay-full", "timeout", "incomplete", "protocol")


class ServerProcess:
    """`mptun server` on loopback with `--stats-file`; `stats()` asks for a fresh dump."""

    def __init__(
        self,
        tmp: Path,
        key_file: Path,
        *args: str,
        env: dict | None = None,
        port: int | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.key_file = key_file
        self.stats_path = tmp / f"stats-{self.port}.json"
        self.stats_path.unlink(missing_ok=True)  # a dump of an earlier process would mislead
        self.proc = MptunProcess(
            [
                "server",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--key-file",
                str(key_file),
                "--stats-file",
                str(self.stats_path),
                *args,
            ],
            tmp / f"server-{self.port}-{time.monotonic_ns()}.log",
            env,
            prefix,
        )
        wait_listening("127.0.0.1", self.port, proc=self.proc.proc)
        # wait_listening's own connection ends as INCOMPLETE: let it land before tests count.
        self.wait_counter("incomplete", 1)

    @property
    def psk(self) -> bytes:
        return load_key_file(self.key_file)

    def stats(self, timeout: float = 10.0) -> dict:
        """Send SIGUSR1 and wait for the dump it causes."""
        return read_stats_after_usr1(self.proc.pid, self.stats_path, timeout, self.proc)

    def counters(self) -> dict[str, int]:
        return self.stats()["counters"]

    def wait_counter(self, name: str, value: int, timeout: float = 10.0) -> dict[str, int]:
        """Poll the counters until `name` reaches `value` (for effects that land asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.counters()
            if c.get(name, 0) >= value or time.monotonic() > deadline:
                return c
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.proc.stop(sig)


def read_stats_after_usr1(
    pid: int, path: Path, timeout: float = 10.0, proc: MptunProcess | None = None
) -> dict:
    """Send SIGUSR1 to `pid` and wait for the dump it causes (its `seq` is larger than the last)."""
    before = read_stats(path)
    seq = before["seq"] if before else 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = read_stats(path)
        if now and now["seq"] > seq:
            return now
        time.sleep(0.02)
    raise TimeoutError(f"no stats dump after SIGUSR1:\n{proc.log()[-3000:] if proc else ''}")


def delta(after: dict[str, int], before: dict[str, int], keys=HANDSHAKE_STATUSES) -> dict:
    """Counter increments between two dumps, restricted to `keys`, zeros left out."""
    out = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k: v for k, v in out.items() if v}


def flight(psk: bytes, target: Address, clock=time.time, early: bytes = b"") -> ClientHandshake:
    """A client handshake whose first flight has no padding (short and deterministic in size)."""
    # Encrypted: the mode a default server accepts (plain only with --bulk plain).
    hs = ClientHandshake(
        psk,
        cipher_by_name(DEFAULT_CIPHER),
        target,
        WireMode.ENCRYPTED,
        clock=clock,
        padding=_no_pad,
    )
    return hs


def _no_pad(_: int) -> int:
    return 0


def exchange(port: int, data: bytes, hs: ClientHandshake, timeout: float = 10.0) -> bytes:
    """Send a first flight, read the whole authenticated response; returns its raw bytes."""
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while True:
            event = hs.next_event()
            if isinstance(event, Response):
                return raw
            assert isinstance(event, NeedData)
            chunk = s.recv(hs.bytes_needed())
            assert chunk, "server closed before its response"
            raw += chunk
            hs.receive_data(chunk)


def connect_status(port: int, psk: bytes, target: Address, timeout: float = 15.0):
    """One tunnel request to `target`: the server's ConnectStatus."""
    hs = flight(psk, target)
    data = hs.first_flight()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while not isinstance(event := hs.next_event(), Response):
            chunk = s.recv(hs.bytes_needed())
            assert chunk, "server closed before its response"
            hs.receive_data(chunk)
    return event.status


@contextmanager
def closing_target() -> Iterator[int]:
    """A loopback TCP target that accepts and closes at once; yields its port."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join()
        srv.close()


def socks_open(
    socks_port: int, target: Address, timeout: float = 10.0
) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT through the client; returns the socket and the reply code."""
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00" + target.encode())
    head = b""
    while len(head) < 4:  # VER REP RSV ATYP, then an address whose length ATYP gives
        c = s.recv(4 - len(head))
        if not c:
            return s, -1
        head += c
    rest = {1: 4 + 2, 4: 16 + 2}.get(head[3], 0)
    while rest:
        rest -= len(s.recv(rest))
    return s, head[1]


class ClientProcess:
    """`mptun client` with a SOCKS listener on loopback."""

    def __init__(self, tmp: Path, key_file: Path, server_port: int, *args: str) -> None:
        self.socks_port = free_port()
        self.stats_path = tmp / f"client-stats-{self.socks_port}.json"
        self.proc = MptunProcess(
            [
                "client",
                "--server",
                f"127.0.0.1:{server_port}",
                "--key-file",
                str(key_file),
                "--socks",
                f"127.0.0.1:{self.socks_port}",
                "--stats-file",
                str(self.stats_path),
                *args,
            ],
            tmp / f"client-{self.socks_port}.log",
        )
        wait_listening("127.0.0.1", self.socks_port, proc=self.proc.proc)

    def stats(self) -> dict:
        return read_stats_after_usr1(self.proc.pid, self.stats_path, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.proc.stop(sig)


class StreamTarget:
    """A loopback target that streams `chunk`-sized pieces every `interval` s until told or
    broken; `ends` collects how each connection ended ("eof", "reset", "stopped")."""

    def __init__(self, chunk: int = 16384, interval: float = 0.01, total: int | None = None):
        self.chunk, self.interval, self.total = chunk, interval, total
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.stop = threading.Event()
        self.ends: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> Address:
        return Address.parse(f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        sent, data = 0, os.urandom(self.chunk)
        try:
            while not self.stop.is_set() and (self.total is None or sent < self.total):
                conn.sendall(data)
                sent += len(data)
                time.sleep(self.interval)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            self.ends.append("eof" if not self.stop.is_set() else "stopped")
        except OSError:
            self.ends.append("reset")
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.srv.close()


def read_until_end(s: socket.socket, timeout: float) -> tuple[int, str]:
    """Read until EOF, reset or `timeout`; (bytes read, "eof" | "reset" | "hang")."""
    s.settimeout(timeout)
    n = 0
    try:
        while chunk := s.recv(65536):
            n += len(chunk)
    except ConnectionResetError:
        return n, "reset"
    except TimeoutError:
        return n, "hang"
    return n, "eof"
