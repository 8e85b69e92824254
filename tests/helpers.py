"""Test plumbing, one place for each thing:

- tests/helpers.py (this module): ports and waiting (from mptun.lab.wait, the one copy shared with
  the lab and the benchmark: `wait_until`, `closed_port`, `start_listener`), connected loopback
  socket pairs, mptun processes (`MptunProcess`, and on top of it `ServerProcess` and
  `ClientProcess`, which `mptun_pair` in tests/conftest.py starts too; they listen on port 0 and
  read their ports from their logs), stats dumps, `curl`, `need`;
- tests/peers.py: what a test puts at either end of mptun: HTTP, stream, closing and DNS peers, a
  SOCKS5 client and hand-made tunnel first flights; `python -m tests.peers` runs peers inside
  test-bed namespaces;
- tests/isolated.py: an isolated root (mount and network namespaces) for running installers;
- tests/tools/: scripts a test runs as their own processes (an echo target, a DNS flip driver);
- tests/conftest.py: fixtures only (`key_file`, `mptun_pair`, `needs_mptcp_testbed`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptun.common.address import Address, ip_or_name
from mptun.common.crypto import load_key_file
from mptun.common.stats import read_stats
from mptun.lab.wait import (
    SLOWDOWN,
    ReservedPort,
    closed_port,
    logged_listeners,
    start_listener,
    wait_listening,
    wait_until,
)


def loopback_pair(
    proto: int = 0, listener_proto: int | None = None, blocking: bool = True
) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair on 127.0.0.1: real TCP, so resets are real RSTs.

    `proto` is the client socket's (IPPROTO_MPTCP for MPTCP), `listener_proto` the listener's
    (the same by default: 0 with an MPTCP client is a peer that does not speak MPTCP).
    """
    with socket.socket(
        socket.AF_INET, socket.SOCK_STREAM, proto if listener_proto is None else listener_proto
    ) as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        client.connect(ls.getsockname())
        server, _ = ls.accept()
    for s in (client, server):
        s.setblocking(blocking)
    return client, server


__all__ = [
    "ROOT",
    "SLOWDOWN",
    "ClientProcess",
    "MptunProcess",
    "ReservedPort",
    "ServerProcess",
    "closed_port",
    "curl",
    "need",
    "read_stats_after_usr1",
    "run_mptun",
    "start_listener",
    "wait_listening",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (make test installs it)")


def run_mptun(
    *args: str, env: dict | None = None, timeout: float | None = 20
) -> subprocess.CompletedProcess:
    """`python -m mptun ARGS` to completion (output captured as text); `env` adds variables."""
    return subprocess.run(
        [sys.executable, "-m", "mptun", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def curl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 10,
    )


def host_port(host: str, port: int) -> str:
    """`127.0.0.1:PORT` or `[::1]:PORT`, as mptun's options take them."""
    return str(Address(ip_or_name(host), port))


class MptunProcess:
    """`python -m mptun ...` as a child process, its log in a file, stopped by PID (`stop()`, or
    leaving a `with` block)."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "mptun", "--log-level", "debug", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def ports(self, kind: str = "", count: int = 1, timeout: float = 10.0) -> list[int]:
        """The ports of this process's first `count` listeners of `kind` ("" the server's;
        "socks", "forward", "redir", "dns (tcp)", ...), from its `listening on` log lines, once
        logged: how a listener started on port 0 is found."""

        def mine() -> list[int]:
            ports = [port for k, _, port in logged_listeners(self.log()) if k == kind]
            return ports[:count] if len(ports) >= count else []

        what = f"{count} {kind or 'server'} listener(s)"
        try:
            return wait_until(mine, timeout, what, proc=self.proc)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{e}; its log ends:\n{self.log()[-3000:]}") from None

    def _ready(self, host: str, kind: str, port: int | None = None) -> int:
        """Wait for this process's listener of `kind` (its port read from the log when it was
        started on port 0) and return its port; stop the process if it never comes."""
        try:
            if port is None:
                (port,) = self.ports(kind)
            wait_listening(host, port, proc=self.proc)  # the probe connection tests count on
        except BaseException:
            self.stop()
            raise
        return port

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(MptunProcess):
    """`mptun server --listen HOST:PORT --key-file KEY ARGS`, started and listening.

    With `stats` (the default) it also writes `--stats-file`, and `stats()` asks for a fresh dump;
    the start then waits until the listening probe's connection has been counted (INCOMPLETE), so
    tests count from a settled server.
    """

    def __init__(
        self,
        tmp: Path,
        key_file: Path,
        *args: str,
        env: dict | None = None,
        port: int | None = None,
        prefix: list[str] | None = None,
        host: str = "127.0.0.1",
        stats: bool = True,
    ) -> None:
        self.host = host
        self.key_file = key_file
        started = time.monotonic_ns()
        self.stats_path = tmp / f"stats-{started}.json"
        stats_args: list[str] = []
        if stats:
            self.stats_path.unlink(missing_ok=True)  # a dump of an earlier process would mislead
            stats_args = ["--stats-file", str(self.stats_path)]
        # Port 0 unless told: the kernel picks, the log says which (no port picked ahead).
        listen = ["--listen", host_port(host, port or 0), "--key-file", str(key_file)]
        super().__init__(
            ["server", *listen, *stats_args, *args], tmp / f"server-{started}.log", env, prefix
        )
        self.port = self._ready(host, "", port)
        if stats:
            # wait_listening's own connection ends as INCOMPLETE: let it land before tests count.
            self.wait_counter("incomplete", 1)

    @property
    def psk(self) -> bytes:
        return load_key_file(self.key_file)

    def stats(self, timeout: float = 10.0) -> dict:
        """Send SIGUSR1 and wait for the dump it causes."""
        return read_stats_after_usr1(self.pid, self.stats_path, timeout, self)

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


class ClientProcess(MptunProcess):
    """`mptun client --server HOST:PORT --key-file KEY --socks 127.0.0.1:PORT ARGS`, listening.

    With `stats` (the default) it also writes `--stats-file`, read by `stats()`.
    """

    def __init__(
        self,
        tmp: Path,
        key_file: Path,
        server_port: int,
        *args: str,
        env: dict | None = None,
        prefix: list[str] | None = None,
        server_host: str = "127.0.0.1",
        stats: bool = True,
    ) -> None:
        started = time.monotonic_ns()
        self.stats_path = tmp / f"client-stats-{started}.json"
        stats_args = ["--stats-file", str(self.stats_path)] if stats else []
        super().__init__(
            [
                "client",
                "--server",
                host_port(server_host, server_port),
                "--key-file",
                str(key_file),
                "--socks",
                "127.0.0.1:0",  # the kernel picks; the log says which
                *stats_args,
                *args,
            ],
            tmp / f"client-{started}.log",
            env,
            prefix,
        )
        self.socks_port = self._ready("127.0.0.1", "socks")

    @property
    def socks(self) -> str:
        return f"127.0.0.1:{self.socks_port}"

    def stats(self) -> dict:
        return read_stats_after_usr1(self.pid, self.stats_path, proc=self)


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
