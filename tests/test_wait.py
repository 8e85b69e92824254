"""mptun.lab.wait: ports without a bind-close-rebind race, and waiting on conditions, with real
sockets and processes; and mptun listening on port 0 and saying where."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mptun.lab.wait import (
    ReservedPort,
    closed_port,
    logged_listeners,
    start_listener,
    wait_owned,
    wait_until,
)
from tests.helpers import ClientProcess, MptunProcess, ServerProcess, run_mptun

# A listener that binds with SO_REUSEADDR (as mptun, iperf3 and ss-server do), then waits.
LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "time.sleep(60)\n"
)


def listener(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LISTEN, str(port)], stderr=subprocess.PIPE)


def test_wait_until_returns_the_value_and_names_what_it_waited_for() -> None:
    t0 = time.monotonic()
    assert wait_until(lambda: time.monotonic() - t0 > 0.1 and "done", 10) == "done"
    with pytest.raises(TimeoutError, match="waiting for the moon"):
        wait_until(lambda: False, 0.2, "the moon")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(RuntimeError, match="exited with 0 before a listener"):
        wait_until(lambda: False, 30, "a listener", proc=proc)


def test_closed_port_refuses_and_no_one_else_can_take_it() -> None:
    with closed_port() as port:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
        with socket.socket() as other, pytest.raises(OSError) as e:
            other.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE


def test_a_reserved_port_goes_to_its_listener_and_no_one_else() -> None:
    held = ReservedPort()
    proc = listener(held.port)
    try:
        with socket.socket() as thief, pytest.raises(OSError) as e:
            thief.bind(("127.0.0.1", held.port))  # without SO_REUSEADDR, as most programs
        assert e.value.errno == errno.EADDRINUSE
        wait_owned(proc, held.port)  # the program's own SO_REUSEADDR bind went through
        held.release()
        with socket.create_connection(("127.0.0.1", held.port), timeout=5):
            pass
    finally:
        held.release()
        proc.kill()
        proc.wait()


def test_wait_owned_is_not_fooled_by_another_listener_on_the_port() -> None:
    """Something else listening on the port is not the started program listening."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            with pytest.raises(TimeoutError):
                wait_owned(proc, port, timeout=0.5)
        finally:
            proc.kill()
            proc.wait()


def test_start_listener_starts_again_when_the_port_was_taken() -> None:
    """The race itself: the first port is taken between the kernel handing it out and the
    program's bind (here by the start function, on purpose); the program exits, and starts
    again on another port, which it is proven to hold."""
    tried: list[int] = []
    thieves: list[socket.socket] = []
    procs: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        tried.append(port)
        if len(tried) == 1:
            thieves.append(socket.create_server(("127.0.0.1", port)))  # no SO_REUSEADDR
        procs.append(listener(port))
        return procs[-1]

    try:
        proc, port = start_listener(start)
        assert len(tried) == 2 and port == tried[1] != tried[0]
        assert procs[0].wait(10) != 0 and b"in use" in procs[0].stderr.read()
        assert proc is procs[1] and proc.poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for t in thieves:
            t.close()


def test_logged_listeners_reads_the_ports_mptun_logs() -> None:
    log = (
        "2026-01-01 00:00:00,000 WARNING mptun.server: MPTCP unavailable on this kernel: "
        "listening with plain TCP\n"
        "2026-01-01 00:00:00,001 INFO mptun.server: listening on [::1]:40001 (TCP, ...)\n"
        "2026-01-01 00:00:00,002 INFO mptun.client: socks listening on 127.0.0.1:40002\n"
        "2026-01-01 00:00:00,003 INFO mptun.client: dns (tcp) listening on 127.0.0.1:53\n"
    )
    assert logged_listeners(log) == [
        ("", "::1", 40001),
        ("socks", "127.0.0.1", 40002),
        ("dns (tcp)", "127.0.0.1", 53),
    ]


def test_port_0_listeners_log_the_ports_they_got(tmp_path: Path, key_file: Path) -> None:
    """`--listen`, `--socks`, `--redir` and `--forward` take port 0: the kernel picks, the log
    says which, and those ports are the process's own listeners."""
    with ServerProcess(tmp_path, key_file, stats=False) as srv:  # --listen 127.0.0.1:0
        assert srv.port != 0
        wait_owned(srv.proc, srv.port)
        with ClientProcess(
            tmp_path, key_file, srv.port, "--forward", "127.0.0.1:0=192.0.2.1:80",
            "--forward", "127.0.0.1:0=192.0.2.2:80", "--redir", "[::1]:0", stats=False,
        ) as cli:  # fmt: skip
            forwards = cli.ports("forward", 2)
            (redir,) = cli.ports("redir")
            ports = [cli.socks_port, *forwards, redir]
            assert len(set(ports)) == 4 and 0 not in ports
            for port in ports:
                wait_owned(cli.proc, port)


def test_port_0_is_refused_where_it_means_nothing(key_file: Path) -> None:
    """--dns binds UDP and TCP on one port (port 0 would give two); a server to reach needs
    its real port."""
    base = ["client", "--key-file", str(key_file), "--control", "none"]
    for args in (
        ["--server", "127.0.0.1:1", "--dns", "127.0.0.1:0", "--dns-upstream", "192.0.2.53"],
        ["--server", "127.0.0.1:0", "--socks", "127.0.0.1:0"],
    ):
        r = run_mptun(*base, *args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "port must be 1-65535" in r.stderr, r.stderr


def test_a_taken_port_is_one_line_not_a_retry(tmp_path: Path, key_file: Path) -> None:
    """Port 0 changes nothing for a given port: in use, mptun says so and exits."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        p = MptunProcess(
            ["server", "--listen", f"127.0.0.1:{port}", "--key-file", str(key_file)],
            tmp_path / "s.log",
        )
        assert p.proc.wait(20) == 2
        p.stop()
        assert "in use" in p.log()
