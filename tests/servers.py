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

    def __init__(self, tmp: Path, key_file: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.key_file = key_file
        self.stats_path = tmp / f"stats-{self.port}.json"
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
            tmp / f"server-{self.port}.log",
            env,
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
