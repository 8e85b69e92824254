"""The close after a failed or unfinished first flight takes the same code path whatever arrived
before the peer's FIN: the server's system calls from the FIN to the close are the same for 0,
31, 32, 58, 59 and more bytes (the 32-byte salt and the 59-byte authentication boundaries used
to take different paths, and a prober measured the difference: medians 93-192 us).

Checked at the mechanism, not by timing: strace records the server's calls while the FIN
arrives; their sequence (names, the connection's fd, results) must not depend on the length.
tests/tools/close_timing.py measures the reaction times themselves.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from mptun.common.crypto import TAG_LEN
from mptun.common.handshake import REQUEST_FIXED_LEN, SALT_LEN
from tests.helpers import ServerProcess, need, wait_until

AUTH_AT = SALT_LEN + REQUEST_FIXED_LEN + TAG_LEN  # 59: the first authentication
LENGTHS = [0, 1, SALT_LEN - 1, SALT_LEN, SALT_LEN + 1, AUTH_AT - 1, AUTH_AT, AUTH_AT + 1, 221]
TRACED = "trace=recvfrom,recvmsg,read,close,shutdown,sendto"
_CLOSED = re.compile(r"close\(\d+\)\s*=\s*0", re.M)
_CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((\d+)?[^=]*=\s*(-?\d+)")


def recv_q(port: int) -> int | None:
    """Bytes waiting unread in the server's end of the one connection to `port` (ss Recv-Q)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]) if out else None


def calls_after_fin(srv: ServerProcess, data: bytes, trace: Path) -> list[str]:
    """Send `data`, let the server read it all, then trace its calls while the FIN arrives."""
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        if data:
            s.sendall(data)
        if data:  # the server reads all of it (whatever it needs, and after a failure the rest)
            wait_until(lambda: recv_q(srv.port) == 0, 10, "the server to read the probe")
        # (With nothing sent, the kernel hands the server the connection only with the FIN.)
        strace = subprocess.Popen(
            ["strace", "-f", "-p", str(srv.pid), "-o", str(trace), "-e", TRACED],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert strace.stderr is not None
            for line in strace.stderr:  # "Process PID attached" for the event loop's thread
                if f"Process {srv.pid} attached" in line:
                    break
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            assert s.recv(1) == b"", "the server sent a byte"
            wait_until(lambda: recv_q(srv.port) is None, 10, "the server's close")
            # The socket leaves `established` while close() runs: let strace log its return
            # before detaching (else the line ends "<detached ...>").
            wait_until(lambda: _CLOSED.search(trace.read_text()), 10, "strace to log the close")
        finally:
            strace.terminate()
            strace.wait(10)
    calls = [m.groups() for line in trace.read_text().splitlines() if (m := _CALL.match(line))]
    closed = [fd for name, fd, _ in calls if name == "close"]
    assert closed, f"no close() traced: {trace.read_text()[-2000:]}"
    fd = closed[-1]
    # The connection's calls, with their results; sizes and buffers left out.
    return [f"{name}(conn)={ret}" for name, cfd, ret in calls if cfd == fd]


@pytest.mark.root
def test_the_close_after_a_fin_is_one_path_for_every_length(tmp_path: Path, key_file: Path) -> None:
    need("strace")
    if os.geteuid() != 0:
        pytest.skip("strace -p needs root (ptrace)")
    with ServerProcess(tmp_path, key_file, "--handshake-timeout", "30") as srv:
        paths = {n: calls_after_fin(srv, os.urandom(n), tmp_path / f"trace-{n}") for n in LENGTHS}
    first = paths[LENGTHS[0]]
    assert first[-1] == "close(conn)=0" and "recvfrom(conn)=0" in first, first
    differ = {n: p for n, p in paths.items() if p != first}
    assert not differ, f"0 bytes: {first}; differs: {differ}"
