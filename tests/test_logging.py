"""Where log lines go and at which priority, with real mptun processes.

- journald: stderr is the stream JOURNAL_STREAM names -> `<N>` priority prefixes, no timestamp;
- `--log-syslog`: datagrams to /dev/log (a socket of the test's, mounted there in a private
  mount namespace) at each line's own priority, facility daemon, never err for ordinary lines;
- per-connection lines (`connected in`, `closed after`) at debug unless `--log-connections`;
  failures stay at info.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptun.common.logutil import syslog_priority
from mptun.lab.wait import wait_logged_listeners, wait_until
from tests.helpers import ROOT, curl, need
from tests.peers import http_server, sha256_of_stream

STAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
DAEMON = 3 << 3  # syslog facility daemon (RFC 5424 6.2.1)


class Proc:
    """`python -m mptun GROUP_ARGS COMMAND ...`, stderr and stdout into a file."""

    def __init__(
        self,
        log: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        journal: bool = False,
    ) -> None:
        self.path = log
        self._f = open(log, "wb")  # noqa: SIM115 (closed in stop())
        full = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal:  # what systemd does: the stream's device and inode (systemd.exec(5))
            st = os.fstat(self._f.fileno())
            full["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        full.update(env or {})
        full["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "mptun", *args],
            stdout=self._f,
            stderr=subprocess.STDOUT,
            env=full,
            cwd=ROOT,
        )

    def log(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.path.read_text(errors="replace")

    def port(self, kind: str = "") -> int:
        found = wait_logged_listeners(self.log, 1, self.proc, 20)
        assert found[0][0] == kind, found
        return found[0][2]

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


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def test_priorities_follow_levels() -> None:
    assert [syslog_priority(lv) for lv in (50, 40, 30, 20, 10, 5)] == [3, 3, 4, 6, 7, 7]


def test_journal_stream_gets_priority_prefixes(
    tmp_path: Path, key_file: Path, procs: list[Proc]
) -> None:
    """Under systemd every line starts with its priority and carries no second timestamp."""
    server = Proc(
        tmp_path / "server.log",
        ["--log-level", "debug", "server", "--listen", "127.0.0.1:0", "--key-file", str(key_file)],
        journal=True,
    )
    procs.append(server)
    port = server.port()
    # a connection that ends before its handshake: a debug line
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\x00" * 10)
    wait_until(lambda: "<7>" in server.log(), 10, "a debug line")
    server.stop()
    lines = server.log().splitlines()
    assert lines and all(re.match(r"<[3467]>mptun", line) for line in lines), lines
    assert any(line.startswith("<6>") and "listening on" in line for line in lines), lines
    assert any(line.startswith("<6>") and line.endswith("stopped") for line in lines), lines
    assert not [line for line in lines if STAMP.search(line) or " INFO " in line], lines


def test_inherited_journal_stream_of_another_file_is_ignored(
    tmp_path: Path, key_file: Path, procs: list[Proc]
) -> None:
    """A child whose stderr was redirected keeps JOURNAL_STREAM but is not on the journal."""
    server = Proc(
        tmp_path / "server.log",
        ["server", "--listen", "127.0.0.1:0", "--key-file", str(key_file)],
        env={"JOURNAL_STREAM": "8:12345"},
    )
    procs.append(server)
    server.port()
    server.stop()
    first = server.log().splitlines()[0]
    assert STAMP.match(first) and " INFO mptun" in first, first


@pytest.mark.root
def test_syslog_gets_real_priorities(tmp_path: Path, key_file: Path, procs: list[Proc]) -> None:
    """`--log-syslog`: one datagram per line to /dev/log, `<PRI>mptun[PID]: name: message`,
    info as daemon.info (30), debug as daemon.debug (31); no daemon.err for ordinary lines."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a private mount namespace for /dev/log)")
    need("unshare")
    sock_path = tmp_path / "log.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(10)
    # /dev/log inside: a tmpfs over /dev (this namespace only) and our socket bound onto a file
    wrap = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs tmpfs /dev && touch /dev/log && mount --bind "$0" /dev/log && exec "$@"',
        str(sock_path),
    ]
    args = ["--log-syslog", "--log-level", "debug", "server", "--listen", "127.0.0.1:0"]
    server = Proc(tmp_path / "server.log", [*args, "--key-file", str(key_file)], prefix=wrap)
    procs.append(server)
    got: list[str] = []
    try:
        while not any("listening on" in m for m in got):
            got.append(rx.recv(65536).decode())
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(got)).group(1))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\x00" * 10)
        while not any(m.startswith(f"<{DAEMON + 7}>") for m in got):
            got.append(rx.recv(65536).decode())
        assert server.stop() == 0
        rx.setblocking(False)  # it has exited: every line it sent is queued here
        while True:
            try:
                got.append(rx.recv(65536).decode())
            except BlockingIOError:
                break
    finally:
        rx.close()
    assert server.log() == "", "with --log-syslog nothing goes to stderr"
    for m in got:
        assert re.match(rf"<(\d+)>mptun\[{server.proc.pid}\]: mptun", m), m
    pris = {int(re.match(r"<(\d+)>", m).group(1)) for m in got}
    assert DAEMON + 6 in pris and DAEMON + 7 in pris, got
    assert DAEMON + 3 not in pris, got
    assert any(m.endswith("mptun: stopped") for m in got), got


def test_syslog_without_a_socket_is_one_line(tmp_path: Path) -> None:
    if Path("/dev/log").exists():
        pytest.skip("this machine has a /dev/log")
    r = subprocess.run(
        [sys.executable, "-m", "mptun", "--log-syslog", "genkey"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "mptun: error: --log-syslog: cannot reach the syslog socket /dev/log: "
        "No such file or directory"
    )


def _tunnel(
    tmp: Path, key_file: Path, procs: list[Proc], *extra: str, allow_private: bool = True
) -> tuple[Proc, Proc, int]:
    """Server and client at the default log level (info), `extra` given to both."""
    server_args = ["server", "--listen", "127.0.0.1:0", "--key-file", str(key_file), *extra]
    if allow_private:
        server_args.append("--allow-private")
    server = Proc(tmp / f"server{len(procs)}.log", server_args)
    procs.append(server)
    port = server.port()
    client_args = ["client", "--server", f"127.0.0.1:{port}", "--key-file", str(key_file)]
    client = Proc(
        tmp / f"client{len(procs)}.log",
        [*client_args, "--socks", "127.0.0.1:0", *extra],
    )
    procs.append(client)
    return server, client, client.port("socks")


@pytest.mark.parametrize("log_connections", [False, True])
def test_connection_lines_only_with_log_connections(
    tmp_path: Path, key_file: Path, procs: list[Proc], log_connections: bool
) -> None:
    need("curl")
    extra = ("--log-connections",) if log_connections else ()
    server, client, socks = _tunnel(tmp_path, key_file, procs, *extra)
    with http_server() as (host, http_port):
        r = curl(
            "--socks5-hostname",
            f"127.0.0.1:{socks}",
            f"http://{host}:{http_port}/bytes/1000/3",
            "-o",
            str(tmp_path / "body"),
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        target = f"{host}:{http_port}"
        assert hashlib.sha256((tmp_path / "body").read_bytes()).hexdigest() == sha256_of_stream(
            1000, 3
        )
        # the closing lines come after the relay ends
        if log_connections:
            for p in (server, client):
                wait_until(lambda p=p: "closed after" in p.log(), 10, "a closed line")
    server.stop()
    client.stop()
    for p in (server, client):
        text = p.log()
        for what in ("connected in", "closed after", target):
            assert (what in text) == log_connections, (what, text)
        if log_connections:
            line = next(x for x in text.splitlines() if "connected in" in x)
            assert " INFO " in line, line


def test_failures_stay_at_info(tmp_path: Path, key_file: Path, procs: list[Proc]) -> None:
    """A refused target is logged at info by both ends without --log-connections."""
    need("curl")
    server, client, socks = _tunnel(tmp_path, key_file, procs, allow_private=False)
    r = curl("--socks5-hostname", f"127.0.0.1:{socks}", "http://127.0.0.1:9/", timeout=20)
    assert r.returncode != 0
    wait_until(lambda: "not allowed" in client.log(), 10, "the client's refusal line")
    wait_until(lambda: "not allowed" in server.log(), 10, "the server's refusal line")
    for p in (server, client):
        line = next(x for x in p.log().splitlines() if "not allowed" in x)
        assert " INFO " in line or " WARNING " in line, line
    assert logging.INFO == 20  # the level names above are logging's own
    assert shutil.which("curl")
